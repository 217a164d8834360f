"""What training did to a model: accuracy on verifiable tasks, and retention on general text.

    items = task_items("gsm_symbolic", 50, seed=1234, exclude=train_rows)  # held-out questions
    acc = task_accuracy(engine, items, max_new_tokens=256)                 # greedy, batched
    ret = text_retention(engine, text_passages(engine.tokenizer, 16, 256)) # NLL and CLL per token
    result = evaluate_model(engine, [EvalTask("gsm_symbolic", 50)], family={"gsm_symbolic"})

Accuracy: every item is the task's question as the only user turn (the chat template, as in
training), answered greedily by the engine (batched) and checked by reasoning-gym's own checker
on the final answer opsft.data.verify extracts (\\boxed{}, "#### x", "the answer is x", else the last
number). Items come from reasoning-gym with a fixed seed; questions that occur in `exclude`
(the training corpora) are skipped and replaced by later items, so evaluation never sees a
training question. A Wilson 95% interval goes with every accuracy: at a few dozen items the
interval is wide and the table says so.

Retention: the standard library's Python reference text (`pydoc_data.topics`, ~465k characters
of general technical English that no opsft corpus contains) cut into fixed token windows; per
token -log p (NLL) and phi = log p + H (CLL) under the model, token means. Fine-tuning that
damages general language modelling raises the NLL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from opsft.data.chat import end_of_turn_id, prompt_ids
from opsft.data.corpus import RowError, question_text, row_messages
from opsft.data.datasets import question_key, task_corpus
from opsft.data.verify import ReasoningGymVerifier, extract_final_answer
from opsft.engines.base import GenerationParams

DEFAULT_SEED = 1234  # opsft's own training corpora (opsft.data.datasets) use seed 0


@dataclass(frozen=True)
class EvalTask:
    name: str
    n: int = 50
    max_new_tokens: int = 256
    config: dict = field(default_factory=dict)  # the task's generator settings (reasoning_gym.create_dataset)
    label: str | None = None                    # the name in results and tables (default: name)

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"bad task {self.name!r}: n and max_new_tokens must be >= 1")

    @property
    def key(self) -> str:
        return self.label or self.name

    @classmethod
    def from_spec(cls, spec) -> EvalTask:
        """A 'name[:n[:max_new_tokens]]' string, a mapping of the fields, or a config model of them."""
        if isinstance(spec, EvalTask):
            return spec
        if isinstance(spec, str):
            return cls.parse(spec)
        return cls(**(spec.model_dump() if hasattr(spec, "model_dump") else dict(spec)))

    @classmethod
    def parse(cls, spec: str, n: int = 50, max_new_tokens: int = 256) -> EvalTask:
        """'name', 'name:n' or 'name:n:max_new_tokens'."""
        parts = spec.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"bad task {spec!r}: expected name[:n[:max_new_tokens]]")
        try:
            values = [int(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"bad task {spec!r}: n and max_new_tokens must be integers") from None
        values += [n, max_new_tokens][len(values):]
        return cls(parts[0], values[0], values[1])


def check_task(name: str) -> None:
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = sorted(k for k in DATASETS if name.split("_")[0] in k)[:8]
        raise ValueError(f"unknown reasoning-gym task {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))


def row_question(row: dict) -> str | None:
    """The question of a corpus row (its prompt, or the last user turn of its messages); None for
    a row that has none (an invalid row cannot exclude anything)."""
    try:
        return question_text(row_messages(row))
    except RowError:
        return None


def task_items(task: str, n: int, seed: int = DEFAULT_SEED, exclude: Iterable[dict] = (),
               config: dict | None = None) -> list[dict]:
    """n items of a reasoning-gym task (rows with id, prompt, answer, task), none of whose
    questions occurs among the `exclude` rows' prompts; deterministic for (task, seed, exclude,
    config). `config`: the task's generator settings (e.g. {"max_terms": 2} for chain_sum)."""
    check_task(task)
    seen = {question_key(q) for q in map(row_question, exclude) if q is not None}
    items, offset, skipped = [], 0, 0
    while len(items) < n:
        batch = task_corpus(task, max(n - len(items), 8), seed, offset, config)
        offset += len(batch)
        for row in batch:
            key = question_key(row["prompt"])
            if key in seen:
                skipped += 1
                continue
            if len(items) < n:
                seen.add(key)
                items.append({k: row[k] for k in ("id", "prompt", "answer", "task")})
        if skipped > 10 * n + 100:
            raise ValueError(f"{task}: cannot find {n} questions outside the excluded ones")
    return items


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def task_accuracy(engine, items: list[dict], max_new_tokens: int = 256, verifier: Callable | None = None
                  ) -> tuple[dict, list[dict]]:
    """(summary, per-item records) of greedy answers to `items` (all of one task)."""
    if not items:
        raise ValueError("no items to evaluate")
    task = items[0]["task"]
    verifier = verifier or ReasoningGymVerifier(task)
    tok = engine.tokenizer
    eos = end_of_turn_id(tok)
    prompts = [prompt_ids(tok, [{"role": "user", "content": item["prompt"]}]) for item in items]
    start = time.perf_counter()
    outputs = engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                        stop_token_ids=(eos,)))
    seconds = time.perf_counter() - start
    records = []
    for item, tokens in zip(items, outputs, strict=True):
        text = tok.decode(tokens, skip_special_tokens=True).strip()
        records.append({**item, "output": text, "extracted": extract_final_answer(text),
                        "correct": bool(verifier(text, item["answer"], item)), "tokens": len(tokens),
                        "finished": bool(tokens) and tokens[-1] == eos})
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, len(records))
    generated = sum(r["tokens"] for r in records)
    summary = {"task": task, "n": len(records), "correct": correct, "accuracy": correct / len(records),
               "ci95": [low, high], "mean_tokens": generated / len(records),
               "finished": sum(r["finished"] for r in records) / len(records), "max_new_tokens": max_new_tokens,
               "seconds": seconds, "tokens_per_s": generated / max(seconds, 1e-9)}
    return summary, records


def general_text(source: str = "pydoc") -> str:
    """The general-text corpus: 'pydoc' (the standard library's pydoc_data.topics, topics in
    sorted order) or a path to a UTF-8 text file."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    with open(source, encoding="utf-8") as fh:
        return fh.read()


def text_passages(tokenizer, n_passages: int = 16, tokens_per_passage: int = 256, source: str = "pydoc"
                  ) -> list[list[int]]:
    """The first n_passages consecutive windows of tokens_per_passage tokens of the text."""
    if n_passages < 1 or tokens_per_passage < 2:
        raise ValueError("need n_passages >= 1 and tokens_per_passage >= 2")
    ids = tokenizer(general_text(source), add_special_tokens=False)["input_ids"]
    if len(ids) < n_passages * tokens_per_passage:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {n_passages} x {tokens_per_passage}")
    return [ids[i * tokens_per_passage:(i + 1) * tokens_per_passage] for i in range(n_passages)]


def text_retention(engine, passages: list[list[int]]) -> dict:
    """Token means over the passages (every token but the first of each): nll = -log p,
    cll = log p + H; plus the passage count and token count."""
    scores = engine.score_tokens(passages, [1] * len(passages))
    logp = np.concatenate([s.logprob for s in scores])
    ent = np.concatenate([s.entropy for s in scores])
    return {"nll": float(-logp.mean()), "cll": float((logp + ent).mean()), "passages": len(passages),
            "tokens": int(logp.size), "exact_entropy": all(s.exact_entropy for s in scores)}


def evaluate_model(engine, tasks: list[EvalTask], *, family: Iterable[str] = (), seed: int = DEFAULT_SEED,
                   exclude: list[dict] = (), passages: int = 16, tokens_per_passage: int = 256,
                   text_source: str = "pydoc", report: Callable[[str], None] | None = None
                   ) -> tuple[dict, list[dict]]:
    """(result, per-item records): accuracy per task (in_family when the task is in `family`, the
    training family) and retention on general text (skipped when passages == 0)."""
    report = report or (lambda message: None)
    family = set(family)
    result: dict = {"model": getattr(engine, "model_id", None), "seed": seed, "tasks": {}}
    records: list[dict] = []
    for task in tasks:
        if task.key in result["tasks"]:
            raise ValueError(f"task {task.key!r} given twice: give each a different label")
        items = task_items(task.name, task.n, seed, exclude, task.config)
        summary, recs = task_accuracy(engine, items, task.max_new_tokens)
        summary.update(in_family=task.name in family, config=task.config)
        result["tasks"][task.key] = summary
        records += [{**r, "task_label": task.key} for r in recs]
        report(f"{task.key}: {summary['correct']}/{summary['n']} correct ({summary['seconds']:.0f}s)")
    if passages:
        start = time.perf_counter()
        result["general_text"] = {**text_retention(engine, text_passages(engine.tokenizer, passages,
                                                                         tokens_per_passage, text_source)),
                                  "source": text_source}
        report(f"general text: nll {result['general_text']['nll']:.4f} ({time.perf_counter() - start:.0f}s)")
    for scope, flag in (("in_family", True), ("out_of_family", False)):
        chosen = [s for s in result["tasks"].values() if s["in_family"] is flag]
        if chosen and family:
            result[f"{scope}_accuracy"] = sum(s["correct"] for s in chosen) / sum(s["n"] for s in chosen)
    return result, records


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def results_table(results: list[dict], labels: list[str] | None = None) -> str:
    """A markdown table, one line per model: accuracy per task (correct/n), general-text NLL and
    CLL, and the NLL change against the first model (the baseline)."""
    labels = labels or [str(r.get("model")) for r in results]
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    base_nll = (results[0].get("general_text") or {}).get("nll") if results else None
    head = ["model"] + [f"{t}{'' if not results[0]['tasks'].get(t, {}).get('in_family') else ' (in)'}"
                        for t in tasks] + ["text NLL", "text CLL", "dNLL"]
    body = []
    for label, r in zip(labels, results, strict=True):
        cells = [label]
        for t in tasks:
            s = r["tasks"].get(t)
            cells.append("-" if s is None else f"{s['accuracy']:.2f} ({s['correct']}/{s['n']})")
        text = r.get("general_text") or {}
        nll = text.get("nll")
        cells += [_fmt(nll), _fmt(text.get("cll")),
                  _fmt(None if nll is None or base_nll is None else nll - base_nll, 4)]
        body.append(cells)
    return markdown_table(head, body)
