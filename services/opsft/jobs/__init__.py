"""Ray Data corpus jobs: `opsft score --ray` (and `opsft rewrite`) over JSONL/Parquet, local or
on a cluster, with an actor pool of engines, per-row errors and resume by id.

Light on purpose: importing `opsft.jobs` does not import Ray; `opsft.jobs.pipeline` does.
See docs/data_jobs.md for the design and opsft/jobs/pipeline.py for the entry points.
"""
