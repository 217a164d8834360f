"""`opsft pairs`: preference pairs for `opsft train --loss dpo|simpo` from an `opsft rewrite`
output (policy self-first): chosen = the verified rewrite or the reference solution, rejected =
the model's own wrong answer (opsft.data.pairs.preference_pairs says what happens to each row).

    opsft pairs --input rewritten.jsonl --output pairs.jsonl
    opsft train --input pairs.jsonl --output-dir runs/dpo --loss dpo --lr 5e-7
"""

from __future__ import annotations

from opsft.cli.common import print_summary


def add_parser(sub) -> None:
    p = sub.add_parser("pairs", help="preference pairs (chosen, rejected) from an `opsft rewrite` output")
    p.add_argument("--input", required=True, help="the rewrite output (JSONL or Parquet)")
    p.add_argument("--output", required=True, help="pair rows to write (JSONL or Parquet, by extension)")
    p.set_defaults(run=run)


def run(args) -> int:
    from opsft.data.corpus import check_corpus_paths, read_rows, write_rows
    from opsft.data.pairs import preference_pairs

    check_corpus_paths(args.input, [args.output])
    rows = read_rows(args.input)
    if rows and not any("self_verified" in r for r in rows):
        raise ValueError(f"{args.input}: no row has 'self_verified'; expected the output of `opsft rewrite` "
                         "with policy self-first")
    pairs, counts = preference_pairs(rows)
    write_rows(pairs, args.output)
    print_summary("pairs", {**counts, "output": args.output})
    return 0
