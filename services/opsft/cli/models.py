"""`opsft models path`: the local folder of the embedded default model (prepared on first use)."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("models", help="the embedded default model")
    parser.add_argument("action", choices=["path"], help="path: print the model folder, preparing it if needed")
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft.models import default_model_dir

    print(default_model_dir())
    return 0
