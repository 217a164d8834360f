"""`opsft pairs`: preference pairs for `opsft train --loss dpo|simpo` from an `opsft rewrite`
output (policy self-first): chosen = the verified rewrite or the reference solution, rejected =
the model's own wrong answer. Every input row gives one output row: a pair, or a row that says
why there is none (`no_pair`, and `error` so that training counts and skips it); rows out ==
rows in (opsft.data.pairs.pair_rows says what happens to each row). Streamed: the corpus is
never held whole. A pair whose prompt and either side do not fit the model (--model, its
context; --max-length) is `too_long`.

    opsft pairs --input rewritten.jsonl --output pairs.jsonl
    opsft train --input pairs.jsonl --output-dir runs/dpo --loss dpo --lr 5e-7
"""

from __future__ import annotations

from opsft.cli.common import print_summary


def add_parser(sub) -> None:
    p = sub.add_parser("pairs", help="preference pairs (chosen, rejected) from an `opsft rewrite` output")
    p.add_argument("--input", required=True, help="the rewrite output (JSONL or Parquet, a file or a job's folder)")
    p.add_argument("--output", required=True, help="pair rows to write (JSONL or Parquet, by extension)")
    p.add_argument("--model", help="the model to train (its tokenizer and context bound the pairs; default: the "
                                   "embedded model)")
    p.add_argument("--max-length", type=int, help="tokens of prompt + response a pair side may take (default: the "
                                                  "model's context)")
    p.set_defaults(run=run)


def pair_fits(tokenizer, max_length: int):
    """Whether a pair's prompt with each side fits `max_length` tokens (as training encodes it)."""
    from opsft.data.chat import encode
    from opsft.data.corpus import RowError
    from opsft.data.pairs import parse_pair

    def fits(pair: dict) -> bool:
        messages, chosen, rejected = parse_pair(pair)
        try:
            for side in (chosen, rejected):
                encode(tokenizer, messages, side, include_eos=True, max_length=max_length)
        except RowError:
            return False
        return True

    return fits


def run(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from opsft.data.chat import model_max_length
    from opsft.data.corpus import write_rows_chunked
    from opsft.data.pairs import empty_counts, pair_rows
    from opsft.data.reader import check_corpus_paths, iter_rows
    from opsft.models import resolve_model

    check_corpus_paths(args.input, [args.output])
    first = next(iter_rows(args.input), None)
    if first is not None and not any("self_verified" in r for r in iter_rows(args.input)):
        raise ValueError(f"{args.input}: no row has 'self_verified'; expected the output of `opsft rewrite` "
                         "with policy self-first")
    model = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    limit = model_max_length(AutoConfig.from_pretrained(model), tokenizer)
    if args.max_length is not None:
        if args.max_length < 8:
            raise ValueError(f"--max-length must be at least 8, got {args.max_length}")
        limit = min(limit, args.max_length)
    fits = pair_fits(tokenizer, limit)
    runs: list[dict] = []

    def rows():  # each pass of the writer counts afresh; the last pass's counts are the file's
        runs.append(empty_counts())
        return pair_rows(iter_rows(args.input), runs[-1], fits)

    written = write_rows_chunked(rows, args.output)
    counts = runs[-1]
    if counts["rows"] != written:
        raise RuntimeError(f"{args.output}: {written} rows written for {counts['rows']} read")
    print_summary("pairs", {**counts, "max_length": limit, "output": args.output})
    return 0
