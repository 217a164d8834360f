"""The rewrite's engine stages as a job runs them, in this process (opsft.commands.rewrite_file) or as
a Ray Data job (opsft.jobs.pipeline.rewrite_spec): each stage's engine and actor pool with the
config's per-stage overrides, and the check, before any job starts, that every stage's engine can
do the stage and fits its actors. Plain data in, plain data out (no engine is built here).

    for stage, engine, pool in engine_stages(cfg): ...
    check_stages(cfg)       # ValueError, one line, naming the stage
"""

from __future__ import annotations

from opsft.config import EngineConfig, PoolConfig, RewriteConfig, check_placement
from opsft.engines.base import require
from opsft.recipe_plan import STAGE_NEEDS, stages_for


def engine_stages(cfg: RewriteConfig, engine: EngineConfig | None = None,
                  pool: PoolConfig | None = None) -> list[tuple[str, EngineConfig, PoolConfig]]:
    """(stage, its engine, its pool) of every engine stage the policy runs, in order; `engine` / `pool`
    replace cfg.engine / cfg.pool as the base the stage overrides apply to (the realignment cycle's)."""
    return [(stage, cfg.stage_engine(stage, engine), cfg.stage_pool(stage, pool))
            for stage in stages_for(cfg.policy) if STAGE_NEEDS[stage] is not None]


def stage_pools(cfg: RewriteConfig, pool: PoolConfig | None = None) -> list[PoolConfig]:
    """The actor pool of each engine stage the policy runs."""
    return [stage_pool for _, _, stage_pool in engine_stages(cfg, pool=pool)]


def check_stages(cfg: RewriteConfig, engine: EngineConfig | None = None, pool: PoolConfig | None = None) -> None:
    """Refuse (ValueError, one line) a stage whose engine cannot do it, or whose actors cannot hold its
    engine, before any job starts."""
    for stage, stage_engine, stage_pool in engine_stages(cfg, engine, pool):
        require(stage_engine.kind, STAGE_NEEDS[stage], stage)
        check_placement(stage_engine, stage_pool, stage)
