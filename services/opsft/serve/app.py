"""Build and run the CLL scoring application from a ServeConfig.

    build_app(cfg)                   # a serve.Application (ingress + scorer + registry)
    opsft.serve.app:app_builder      # import path for `serve run` / `serve deploy` (args = ServeConfig fields)
    run_local(cfg)                   # serve.start on cfg.host:cfg.port, then serve.run; returns the URL

Replicas, autoscaling, max_ongoing_requests and GPUs of the scorer come from the config.
"""

from __future__ import annotations

import os

from ray import serve

from opsft.config import ServeConfig
from opsft.serve.deployments import ModelRegistry, ScoreAPI, Scorer


def scorer_options(cfg: ServeConfig) -> dict:
    """Deployment options of the scorer replicas."""
    opts: dict = {
        "max_ongoing_requests": max(cfg.max_ongoing_requests, cfg.max_batch_requests),
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    }
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def ingress_options(cfg: ServeConfig, forward_key: bool) -> dict:
    """The ingress reads the API key from its environment. A local run passes the caller's
    along; on a cluster the containers carry it (e.g. from a Kubernetes secret)."""
    key = os.environ.get(cfg.api_key_env)
    if forward_key and key and not cfg.api_key_file:
        return {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": {cfg.api_key_env: key}}}}
    return {}


def build_app(cfg: ServeConfig, engine_factory=None, forward_key: bool = False) -> serve.Application:
    config = cfg.model_dump()
    registry = ModelRegistry.bind(cfg.engine.model)
    scorer = Scorer.options(**scorer_options(cfg)).bind(config, registry, engine_factory)
    return ScoreAPI.options(**ingress_options(cfg, forward_key)).bind(config, scorer, registry)


def app_builder(args: dict) -> serve.Application:
    """For `serve run opsft.serve.app:app_builder` and the `import_path` of deploy/serve_config.yaml."""
    from opsft.plan import preflight

    cfg = ServeConfig.model_validate(args or {})
    preflight(cfg)  # a replica that cannot fit its GPU is refused at deploy time, not at model load
    return build_app(cfg)


def run_local(cfg: ServeConfig, engine_factory=None, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app; returns its base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, engine_factory, forward_key=True), name=cfg.app_name, route_prefix=cfg.route_prefix,
              blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
