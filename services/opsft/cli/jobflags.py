"""Flags of the commands that can run as Ray Data jobs (score, rewrite): where to run and the
engine actor pool. They override the config's `distributed`, `address` and `pool.*`."""

from __future__ import annotations

from opsft.config import PoolConfig


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


def add_job_flags(parser, flags) -> None:
    """The Ray Data job's flags; `flags`: the command's Settings (opsft.cli.common), which gives each flag's
    type and default from the config."""
    group = parser.add_argument_group("Ray Data job")
    flags.add(group, "distributed", "--ray", help="run as a Ray Data job (output: a folder of part files; resumes "
                                                  "by id)")
    flags.add(group, "address", help="Ray cluster address (implies --ray; default RAY_ADDRESS or local)")
    group.add_argument("--actors", help=f"engine actors: N or MIN-MAX (default {PoolConfig().min_size})")
    flags.add(group, "pool.num_gpus", "--gpus")
    flags.add(group, "pool.num_cpus", "--cpus", help="CPUs per actor")
    flags.add(group, "pool.batch_size", "--rows-per-batch")
    flags.add(group, "rows_per_part")


def job_overrides(args) -> dict:
    """--actors as the pool's sizes (the other job flags are the command's Settings)."""
    low, high = parse_actors(args.actors) if args.actors else (None, None)
    return {"pool.min_size": low, "pool.max_size": high}
