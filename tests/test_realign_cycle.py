"""A realignment cycle end to end on local Ray with the real embedded model (tiny corpus,
tiny budgets): crash in every stage and resume, the result equals an uninterrupted cycle;
unchanged inputs do no work twice; promotion reaches a service."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opsft.config import EngineConfig, PoolConfig, RealignConfig, RewriteConfig, SelectConfig, TrainConfig
from opsft.data.corpus import write_rows
from opsft.data.reader import read_rows
from opsft.realign.cycle import FAIL_ENV, STAGES, Cycle, InjectedCrash
from train_helpers import max_weight_diff, weights

pytestmark = pytest.mark.slow


def corpus_rows():
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i + 2}?", "answer": str(2 * i + 2),
             "response": f"Adding them: {i} + {i + 2} = {2 * i + 2}. The answer is {2 * i + 2}."} for i in range(5)]
    rows.append({"id": "bad", "prompt": "What is 1 plus 1?", "response": ""})  # an error row travels along
    return rows


class Recorder(BaseHTTPRequestHandler):
    calls: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.calls.append((self.path, body, self.headers.get("Authorization")))
        payload = json.dumps({"model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def service():
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def make_cfg(tmp_path, name, model, corpus, promote_url=None, **overrides):
    settings = dict(
        corpus=corpus, output_dir=str(tmp_path / name), model=model, promote_url=promote_url,
        # a quarter CPU per engine actor: the rewrite's four stage pools and the light tasks fit the
        # session's 2-CPU Ray (a cycle that starts its own local Ray sizes it: pipeline.local_num_cpus)
        engine=EngineConfig(max_batch_size=8), pool=PoolConfig(batch_size=8, num_cpus=0.25),
        select=SelectConfig(mode="quantile", quantile=0.6),
        rewrite=RewriteConfig(max_new_tokens=10, hint_max_new_tokens=10, temperature=0.0, batch_size=4),
        train=TrainConfig(global_batch_size=4, micro_batch_size=2, max_steps=2, lr=1e-4, max_length=128,
                          overlong="truncate", warmup_ratio=0.0))
    return RealignConfig(**{**settings, **overrides})


def test_crash_in_every_stage_resumes_to_the_uninterrupted_result(tmp_path, model_dir, ray_local, service,
                                                                  monkeypatch):
    model = model_dir
    corpus = str(tmp_path / "corpus.jsonl")
    write_rows(corpus_rows(), corpus)
    monkeypatch.setenv("OPSFT_ADMIN_KEY", "secret")  # promote_api_key_env: a reload needs the admin key

    reference = Cycle(make_cfg(tmp_path, "ref", model, corpus, service)).run()
    assert reference["status"] == "completed" and reference["stages"] == list(STAGES)

    cfg = make_cfg(tmp_path, "crashy", model, corpus, service)
    for k, stage in enumerate(STAGES):
        monkeypatch.setenv(FAIL_ENV, stage)
        with pytest.raises(InjectedCrash):
            Cycle(cfg).run()
        state = json.loads((tmp_path / "crashy" / "cycles" / "v0001" / "state.json").read_text())
        assert state["stages"] == list(STAGES[:k]) and not state.get("complete")
    monkeypatch.delenv(FAIL_ENV)
    resumed = Cycle(cfg).run()
    assert resumed["status"] == "completed" and len(list((tmp_path / "crashy" / "cycles").iterdir())) == 1

    ref_dir, new_dir = tmp_path / "ref" / "cycles" / "v0001", tmp_path / "crashy" / "cycles" / "v0001"
    ref_rows, new_rows = read_rows(ref_dir / "corpus.parquet"), read_rows(new_dir / "corpus.parquet")
    assert len(new_rows) == 6 and [r["id"] for r in new_rows] == [r["id"] for r in ref_rows]
    assert [(r["response"], r["source"]) for r in new_rows] == [(r["response"], r["source"]) for r in ref_rows]
    assert next(r for r in new_rows if r["id"] == "bad")["error"]
    assert resumed["outputs"]["select"]["selected"] == 3  # 60% of the 5 scored rows
    assert max_weight_diff(weights(resumed["outputs"]["train"]["checkpoint"]),
                           weights(reference["outputs"]["train"]["checkpoint"])) < 1e-6
    for key in ("cll_before", "cll_after"):
        assert resumed["outputs"]["report"][key] == pytest.approx(reference["outputs"]["report"][key], abs=1e-4)
    assert (new_dir / "report" / "cll_hist.png").exists()
    # The real model trained on its own corpus: the re-scored corpus is a valid CLL table.
    assert -5 < resumed["outputs"]["report"]["cll_after"] < 1

    # Promotion: the service was asked to load the new checkpoint, with the admin key as bearer token
    # (retries and refusals: tests/test_realign_promote.py).
    path, body, auth = Recorder.calls[-1]
    assert path == "/v1/models/reload" and body == {"model": resumed["outputs"]["train"]["checkpoint"]}
    assert auth == "Bearer secret"

    # Unchanged inputs (same corpus, same starting model, same config): nothing runs, no new version.
    same_start = cfg.model_copy(update={"start_from": "model"})
    again = Cycle(same_start).run()
    assert again["status"] == "up-to-date" and again["cycle"] == resumed["cycle"]
    assert len(list((tmp_path / "crashy" / "cycles").iterdir())) == 1
    # By default the next cycle fine-tunes the newest checkpoint: new inputs, so it would be new work.
    assert Cycle(cfg).current_model() == resumed["outputs"]["train"]["checkpoint"]
    assert Cycle(cfg).fingerprint(Cycle(cfg).current_model()) != resumed["fingerprint"]


def test_a_training_worker_killed_inside_a_cycle_resumes_to_the_uninterrupted_weights(tmp_path, tiny_dir, ray_local):
    """Two Ray Train workers (float64), one SIGKILLed after step 2 of 4 inside the cycle's train stage:
    Ray Train restarts the group from the step-2 checkpoint (train.max_failures, default 3) and the
    cycle completes with the weights of the same training never interrupted (run on the cycle's own
    corpus; float64: within 1e-9, far above float64 reduction noise and far below any real difference)."""
    from opsft.train.ray_job import run_ray

    corpus = str(tmp_path / "corpus.jsonl")
    write_rows(corpus_rows() * 2, corpus)  # 12 rows (the ids repeat: rows are numbered, not looked up by id)
    train = TrainConfig(global_batch_size=4, micro_batch_size=1, max_steps=4, lr=1e-3, max_length=128,
                        overlong="truncate", warmup_ratio=0.0, dtype="float64", checkpoint_every=1,
                        scaling={"num_workers": 2}, fail_after_step=2, fail_mode="kill")
    killed = Cycle(make_cfg(tmp_path, "killed", tiny_dir, corpus, train=train)).run()
    folder = tmp_path / "killed" / "cycles" / "v0001"
    assert (folder / "train" / ".fail_after_step_done").exists()  # the kill did happen
    assert killed["status"] == "completed" and killed["outputs"]["train"]["final_metrics"]["step"] == 4
    clean = run_ray(train.model_copy(update={"input": str(folder / "corpus.parquet"), "model": tiny_dir,
                                             "output_dir": str(tmp_path / "clean"), "fail_after_step": None}))
    a, b = weights(clean["checkpoint"]), weights(killed["outputs"]["train"]["checkpoint"])
    assert max_weight_diff(a, b) < 1e-9
    assert max_weight_diff(a, weights(tiny_dir)) > 1e-4  # training moved the weights
