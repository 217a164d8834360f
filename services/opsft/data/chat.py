"""Turning (messages, response) into token ids with the response span marked.

The prompt is rendered by the tokenizer's chat template with the generation prompt; the
response is tokenized on its own and appended, so the response tokens are exactly the
ids the model would have generated after the prompt (tokenizing prompt + response as one
string could merge tokens across the boundary). The end-of-turn token (the tokenizer's
eos, `<|im_end|>` for ChatML models) follows the response when `include_eos` is set:
scoring leaves it out by default (as the official scorer does), training includes it.
A tokenizer without a chat template gets the plain concatenation of the turns.
TokenText: the text of one token id (memoised), the decoders' view of the generated text.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsft.data.corpus import RowError


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    response_start: int  # index of the first response token in input_ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt, ending with the generation prompt (the assistant header)."""
    if has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def response_ids(tokenizer, response: str) -> list[int]:
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; cannot mark the end of a turn")
    return int(tokenizer.eos_token_id)


def encode(tokenizer, messages: list[dict], response: str, include_eos: bool = False,
           max_length: int | None = None) -> Encoded:
    """Encode one example; raises RowError when it has no response token or is too long."""
    prompt = prompt_ids(tokenizer, messages)
    resp = response_ids(tokenizer, response)
    if include_eos:
        resp = resp + [end_of_turn_id(tokenizer)]
    if not resp:
        raise RowError("response has no tokens")
    ids = prompt + resp
    if max_length is not None and len(ids) > max_length:
        raise RowError(f"too long for the model: {len(ids)} tokens > max length {max_length}")
    return Encoded(input_ids=ids, response_start=len(prompt))


def model_max_length(model_config, tokenizer=None) -> int:
    """The longest sequence the model accepts (its position limit)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**8:
        return limit
    raise ValueError("cannot tell the model's maximum length; pass max_length explicitly")


class TokenText:
    """decode_token (id -> text) for the decoders' text rules (splitter, stop strings, blank
    outputs): the text of one token id by itself, memoised."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]
