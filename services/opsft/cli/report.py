"""`opsft report`: the DDT report (CLL distributions, token phi, AUROC of CLL vs mean log p).

    opsft report --input original=scored.parquet --input own=own.parquet --output report/
"""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("report", help="DDT report of scored corpora: CLL plots and AUROC")
    parser.add_argument("--input", action="append", required=True, metavar="[LABEL=]PATH",
                        help="a scored corpus (file or job output folder); repeat for each source")
    parser.add_argument("--output", required=True, help="folder for summary.json and the PNG plots")
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft.cli.common import print_summary
    from opsft.data.corpus import refuse_overwrite
    from opsft.report import parse_input, report_from_paths

    refuse_overwrite([args.output], [parse_input(spec)[1] for spec in args.input])
    summary = report_from_paths(args.input, args.output)
    print_summary("report", {"output": args.output, "plots": summary["plots"], "pairs": summary["pairs"]})
    return 0
