"""The `opsft` command line. Each subcommand lives in its own module with
`add_parser(subparsers)` and `run(args) -> int`.

    opsft models path
    opsft score --input corpus.jsonl --output scored.parquet
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `opsft --help` lists them.
COMMANDS = ["models", "plan", "score", "rewrite", "pairs", "report", "train", "eval", "serve", "realign", "schedule",
            "submit"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsft", description="On-policy SFT: CLL scoring, IDFT, Hinted Decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"opsft.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from opsft.faults import EngineFault, JobFailed

    try:
        return int(args.run(args) or 0)
    except (OSError, ValueError) as exc:  # bad input, flags, config, paths, an unreachable cluster
        if args.verbose:
            raise
        print(f"opsft {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (JobFailed, EngineFault) as exc:  # engines kept failing: the cause, in one line; a rerun resumes
        if args.verbose:
            raise
        print(f"opsft {args.command}: failed: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: Exception) -> str:
    """An error for the terminal: a pydantic validation error as `key: what is wrong`, and never
    more than one line."""
    from pydantic import ValidationError

    from opsft.config import describe_errors

    text = describe_errors(exc) if isinstance(exc, ValidationError) else str(exc)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
