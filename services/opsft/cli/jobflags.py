"""Flags of the commands that can run as Ray Data jobs (score, rewrite): where to run and the
engine actor pool. They override the config's `distributed`, `address` and `pool.*`."""

from __future__ import annotations


def parse_actors(text: str) -> tuple[int, int]:
    """'4' -> (4, 4); '2-8' -> (2, 8)."""
    low, _, high = text.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"--actors must be N or MIN-MAX, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"--actors needs 1 <= MIN <= MAX, got {text!r}")
    return pair


def add_job_flags(parser) -> None:
    group = parser.add_argument_group("Ray Data job")
    group.add_argument("--ray", dest="distributed", action="store_true", default=None,
                       help="run as a Ray Data job (output: a folder of part files; resumes by id)")
    group.add_argument("--address", help="Ray cluster address (implies --ray; default RAY_ADDRESS or local)")
    group.add_argument("--actors", help="engine actors: N or MIN-MAX (default 1)")
    group.add_argument("--gpus", type=float, help="GPUs per actor (default 0)")
    group.add_argument("--cpus", type=float, help="CPUs per actor (default 1)")
    group.add_argument("--rows-per-batch", type=int, help="rows handed to an actor per call (default 64)")
    group.add_argument("--rows-per-part", type=int, help="rows per output part file (default 20000)")


def job_overrides(args) -> dict:
    low, high = parse_actors(args.actors) if args.actors else (None, None)
    return {"distributed": args.distributed, "address": args.address, "pool.min_size": low,
            "pool.max_size": high, "pool.num_gpus": args.gpus, "pool.num_cpus": args.cpus,
            "pool.batch_size": args.rows_per_batch, "rows_per_part": args.rows_per_part}
