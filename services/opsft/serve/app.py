"""Build and run the CLL scoring application from a ServeConfig.

    build_app(cfg)                   # a serve.Application (ingress + scorer + registry)
    opsft.serve.app:app_builder      # import path for `serve run` / `serve deploy` (args = ServeConfig fields)
    run_local(cfg)                   # serve.start on cfg.host:cfg.port, then serve.run; returns the URL

Replicas, autoscaling, max_ongoing_requests and GPUs of the scorer come from the config. The
keys are read where the ingress runs (opsft.serve.auth); `run_local` and `app_builder` read them
first too, so a service without an API key (and without allow_open) is refused before it deploys.
"""

from __future__ import annotations

import os

from ray import serve

from opsft.config import ServeConfig
from opsft.serve.auth import read_keys
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
    """The ingress reads the API and admin keys from its environment. A local run passes the
    caller's along; on a cluster the containers carry them (e.g. from a Kubernetes secret)."""
    named = [(cfg.api_key_env, cfg.api_key_file), (cfg.admin_key_env, cfg.admin_key_file)]
    env = {name: os.environ[name] for name, file in named if name and not file and os.environ.get(name)}
    if forward_key and env:
        return {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}}}
    return {}


def build_app(cfg: ServeConfig, engine_factory=None, forward_key: bool = False) -> serve.Application:
    config = cfg.model_dump()
    registry = ModelRegistry.bind(cfg.engine.model, cfg.current_link)
    scorer = Scorer.options(**scorer_options(cfg)).bind(config, registry, engine_factory)
    return ScoreAPI.options(**ingress_options(cfg, forward_key)).bind(config, scorer, registry)


def app_builder(args: dict) -> serve.Application:
    """For `serve run opsft.serve.app:app_builder` and the `import_path` of deploy/serve_config.yaml."""
    from opsft.plan import preflight

    cfg = ServeConfig.model_validate(args or {})
    read_keys(cfg)  # no API key (and not allow_open): refused at deploy time, naming the variable
    preflight(cfg)  # a replica that cannot fit its GPU is refused at deploy time, not at model load
    return build_app(cfg)


def run_local(cfg: ServeConfig, engine_factory=None, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app; returns its base URL."""
    read_keys(cfg)  # the keys this process forwards to the ingress: refused here, before Serve starts
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, engine_factory, forward_key=True), name=cfg.app_name, route_prefix=cfg.route_prefix,
              blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
