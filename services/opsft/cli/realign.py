"""`opsft realign --config realign.yaml`: run one realignment cycle (see opsft.realign.cycle)."""

from __future__ import annotations

from opsft.cli.common import print_summary


def add_parser(sub) -> None:
    parser = sub.add_parser("realign", help="one realignment cycle: score, select, rewrite, train, rescore, report")
    parser.add_argument("--config", required=True, help="YAML RealignConfig (see workflows/realign.yaml)")
    parser.add_argument("--corpus", help="override: the corpus to realign")
    parser.add_argument("--output-dir", help="override: the versioned output folder")
    parser.add_argument("--model", help="override: the starting model (used until a cycle has completed)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    parser.add_argument("--promote-url", help="scoring service to promote the new checkpoint to")
    parser.add_argument("--wait", action="store_true", help="wait for a running cycle on the same output")
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft.config import RealignConfig, load_config
    from opsft.realign.cycle import Cycle
    from opsft.realign.lock import LockedError

    cfg = load_config(RealignConfig, args.config, {
        "corpus": args.corpus, "output_dir": args.output_dir, "model": args.model, "address": args.address,
        "promote_url": args.promote_url})
    try:
        result = Cycle(cfg).run(wait=args.wait)
    except LockedError as exc:
        print(f"opsft realign: {exc}")
        return 3
    report = result.get("outputs", {}).get("report", {})
    print_summary("realign", {"cycle": result["cycle"], "status": result["status"],
                              "checkpoint": result["outputs"]["train"]["checkpoint"],
                              "cll_before": report.get("cll_before"), "cll_after": report.get("cll_after"),
                              "sources": result["outputs"]["merge"]["sources"]})
    return 0
