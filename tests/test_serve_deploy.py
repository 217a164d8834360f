"""The deployment files are valid and say what the code will do: deploy/serve_config.yaml
parses as a Ray Serve deploy config whose args are a valid ServeConfig, the KubeRay
RayService carries the same application, and the scorer gets its GPU, autoscaling and
max_ongoing_requests from that config. No cluster needed.

    .venv/bin/python -m pytest -q tests/test_serve_deploy.py
"""

from __future__ import annotations

from pathlib import Path

import yaml
from opsft.config import ServeConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    assert app.import_path == "opsft.serve.app:app_builder"
    cfg = ServeConfig.model_validate(app.args)
    assert cfg.num_gpus == 1 and cfg.engine.kind == "vllm" and cfg.autoscaling.max_replicas == 4


def test_rayservice_serves_the_same_application():
    docs = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert docs["kind"] == "RayService" and docs["apiVersion"] == "ray.io/v1"
    served = yaml.safe_load(docs["spec"]["serveConfigV2"])["applications"][0]
    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())["applications"][0]
    assert served["import_path"] == local["import_path"]
    assert ServeConfig.model_validate(served["args"]) == ServeConfig.model_validate(local["args"])
    workers = docs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]
               ["containers"])


def test_scorer_options_come_from_the_config():
    from opsft.serve.app import scorer_options

    fixed = scorer_options(ServeConfig(num_replicas=3, num_gpus=0.5, num_cpus=2, max_ongoing_requests=8,
                                       max_batch_requests=16))
    assert fixed == {"num_replicas": 3, "max_ongoing_requests": 16,  # never below one full batch
                     "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5}}
    auto = scorer_options(ServeConfig(autoscaling={"min_replicas": 0, "max_replicas": 5,
                                                   "target_ongoing_requests": 4}))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["max_replicas"] == 5 and auto["autoscaling_config"]["initial_replicas"] == 1
