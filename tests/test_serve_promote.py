"""A promotion outlives the service: real Ray Serve on 127.0.0.1, two scorer replicas, two tiny
checkpoints that score differently. The service starts on what the current link names, a reload
(admin key) promotes the second checkpoint and moves the link, the application is deleted (every
replica and the registry go) and deployed again from the same config: the registry reads the link,
and both new replicas load and score with the promoted checkpoint.

    .venv/bin/python -m pytest -q tests/test_serve_promote.py
"""

from __future__ import annotations

import copy
import os
import socket

import httpx
import pytest
import torch
from opsft.config import ServeConfig

pytestmark = pytest.mark.slow
ITEM = {"prompt": "Write one sentence about owls.", "response": "Owls turn their heads almost all the way round."}
KEY, ADMIN = "score-key", "admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path, tiny_model, tokenizer):
    """models/ckpt-a (the tiny model), models/ckpt-b (the same with noise on every weight),
    models/current -> ckpt-a, and the two key files."""
    models = tmp_path / "models"
    other = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    for name, model in (("ckpt-a", tiny_model), ("ckpt-b", other)):
        model.save_pretrained(models / name)
        tokenizer.save_pretrained(models / name)
    os.symlink(models / "ckpt-a", models / "current")
    (tmp_path / "key").write_text(KEY)
    (tmp_path / "admin").write_text(ADMIN)
    return tmp_path


def expected_cll(model: str) -> float:
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows

    return score_rows([ITEM], HFEngine(model, device="cpu"))[0]["cll"]


def test_a_restarted_service_serves_the_promoted_model_on_every_replica(ray_local, store):
    from opsft.serve.app import build_app
    from ray import serve

    models = store / "models"
    a, b = os.path.realpath(models / "ckpt-a"), os.path.realpath(models / "ckpt-b")
    want = {a: expected_cll(a), b: expected_cll(b)}
    assert abs(want[a] - want[b]) > 1e-2  # the two checkpoints tell apart by their scores
    cfg = ServeConfig(engine={"model": str(models / "current")}, current_link=str(models / "current"),
                      model_roots=[str(models)], num_replicas=2, num_cpus=0.1, torch_threads=1, batching=False,
                      api_key_file=str(store / "key"), admin_key_file=str(store / "admin"))
    user, admin = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {ADMIN}"}
    port = free_port()
    serve.shutdown()  # a Serve left by an earlier module would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/durable"

    def served() -> dict:
        info = httpx.get(url + "/v1/models", headers=user, timeout=60).json()["data"][0]
        assert len(info["replicas"]) == 2 and len({r["replica"] for r in info["replicas"]}) == 2
        return info

    def scores() -> list[tuple[str, float]]:
        answers = [httpx.post(url + "/v1/score", json={"items": [ITEM]}, headers=user, timeout=120).json()
                   for _ in range(6)]
        return [(ans["model"], ans["results"][0]["cll"]) for ans in answers]

    try:
        serve.run(build_app(cfg), name="durable", route_prefix="/durable")
        first = served()
        assert first["model"] == a and first["source"] == "current_link"  # the link's target, resolved
        assert all(r["model"] == a for r in first["replicas"])
        assert all(m == a and cll == pytest.approx(want[a], abs=1e-4) for m, cll in scores())

        r = httpx.post(url + "/v1/models/reload", json={"model": str(models / "ckpt-b")}, headers=admin, timeout=300)
        assert r.status_code == 200, r.text
        assert os.readlink(models / "current") == b  # recorded where a restart reads it

        serve.delete("durable")  # every replica and the registry are gone: nothing of the promotion in memory
        serve.run(build_app(cfg), name="durable", route_prefix="/durable")  # the same config as before
        after = served()
        assert after["model"] == b and after["version"] == 0 and after["source"] == "current_link"
        assert [r["model"] for r in after["replicas"]] == [b, b]  # what each new replica's engine loaded
        assert all(m == b and cll == pytest.approx(want[b], abs=1e-4) for m, cll in scores())
    finally:
        serve.shutdown()
