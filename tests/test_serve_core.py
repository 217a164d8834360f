"""The scoring API without Ray: request models, merged scoring of several requests (against
opsft.scoring.score_rows per request and a brute-force log_softmax), and the HTTP layer
(limits, auth, error mapping) in-process on the tiny random model.

    .venv/bin/python -m pytest -q tests/test_serve_core.py
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from opsft.engines.hf import HFEngine
from opsft.scoring import SCORE_FIELDS, score_rows
from opsft.serve.core import Job, check_job, score_jobs
from opsft.serve.http import Limits, build_http_app
from opsft.serve.schemas import ScoreItem, ScoreRequest
from pydantic import ValidationError

ROWS = [
    {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "response": "Blue, like the sky on a clear summer day."},
    {"prompt": "Say hi", "response": "Hi!", "id": "mine"},
]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model, tokenizer):
    return HFEngine(device="cpu", model_and_tokenizer=(tiny_model, tokenizer))


def brute_force_logprobs(model, ids: list[int], start: int) -> tuple[list[float], list[float]]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    lp = [float(logp[t - 1, ids[t]]) for t in range(start, len(ids))]
    ent = [float(-(logp[t - 1].exp() * logp[t - 1]).sum()) for t in range(start, len(ids))]
    return lp, ent


def test_request_models_reject_what_the_contract_forbids():
    with pytest.raises(ValidationError, match="exactly one"):
        ScoreItem(prompt="a", messages=[{"role": "user", "content": "b"}], response="c")
    with pytest.raises(ValidationError, match="exactly one"):
        ScoreItem(response="c")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ScoreItem(prompt="a", response="b", answer="c")
    with pytest.raises(ValidationError, match="at least 1"):
        ScoreRequest(items=[])
    with pytest.raises(ValidationError):
        ScoreItem(messages=[{"role": "robot", "content": "x"}], response="c")
    assert ScoreItem(prompt="a", response="b").as_row() == {"prompt": "a", "response": "b"}


def test_merged_jobs_equal_score_rows_per_job_and_brute_force(tiny_engine, tiny_model):
    jobs = [Job(ROWS[:2], include_eos=False, return_tokens=True), Job(ROWS[2:], include_eos=True),
            Job(ROWS[1:], include_eos=False)]
    answers = score_jobs(tiny_engine, jobs)
    for job, answer in zip(jobs, answers, strict=True):
        expected = score_rows(job.rows, tiny_engine, job.include_eos, token_details=True)
        assert len(answer["results"]) == len(job.rows)
        for got, want in zip(answer["results"], expected, strict=True):
            assert got["id"] == want["id"]
            for name in SCORE_FIELDS:
                assert got[name] == pytest.approx(want[name], abs=1e-5), name
            assert ("tokens" in got) == job.return_tokens
    assert answers[1]["results"][0]["id"] == "mine"
    # the per-token answer against an independent full log_softmax of the same sequence
    from opsft.chat import encode
    from opsft.corpus import parse_row

    ex = parse_row(ROWS[1])
    enc = encode(tiny_engine.tokenizer, ex.messages, ex.response)
    lp, ent = brute_force_logprobs(tiny_model, enc.input_ids, enc.response_start)
    tokens = answers[0]["results"][1]["tokens"]
    assert [t["id"] for t in tokens] == enc.input_ids[enc.response_start:]
    assert "".join(t["token"] for t in tokens) == ex.response
    assert [t["logprob"] for t in tokens] == pytest.approx(lp, abs=1e-4)
    assert [t["entropy"] for t in tokens] == pytest.approx(ent, abs=1e-4)
    assert sum(t["phi"] for t in tokens) == pytest.approx(answers[0]["results"][1]["cll_sum"], abs=1e-6)


def test_check_job_names_the_item_the_model_cannot_score(tiny_engine):
    too_long = {"prompt": "x", "response": "word " * 600}  # the tiny model takes 512 positions
    assert check_job(tiny_engine, Job(ROWS)) is None
    bad = check_job(tiny_engine, Job([ROWS[0], too_long]))
    assert bad["status"] == 422 and bad["detail"].startswith("items[1]: too long for the model")
    ends_with_assistant = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                           "response": "c"}
    assert "end with a user turn" in check_job(tiny_engine, Job([ends_with_assistant]))["detail"]
    assert "'response' is empty" in check_job(tiny_engine, Job([{"prompt": "a", "response": "  "}]))["detail"]


class InProcessService:
    """What the Serve ingress does, without Ray: check, then score on the tiny engine."""

    def __init__(self, engine):
        self.engine = engine

    async def score(self, job):
        error = check_job(self.engine, job)
        if error is not None:
            return error
        answer = score_jobs(self.engine, [job])[0]
        return {**answer, "model": "tiny", "model_version": 0}

    async def models(self):
        return {"data": []}

    async def reload(self, model):
        return {"status": 422, "detail": f"cannot load model {model!r}"}


def call(app, method, path, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def app(tiny_engine):
    return build_http_app(InProcessService(tiny_engine), Limits(max_items=3, max_body_bytes=4096))


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"items": []}', 422, "at least 1 item"),
    (b'{"items": [{"prompt": 5, "response": "x"}]}', 422, "items.0.prompt: Input should be a valid string"),
    (b'{"items": [{"prompt": "a"}]}', 422, "items.0.response: Field required"),
    (b'{"items": [{"prompt": "a", "response": "b"}], "return_tokens": "maybe"}', 422, "return_tokens"),
    (b'{"items": [{"prompt": "a", "response": "b"}], "extra": 1}', 422, "extra: Extra inputs are not permitted"),
    (b'[1, 2]', 422, "invalid request"),
    (json.dumps({"items": [{"prompt": "a", "response": "b"}] * 4}).encode(), 413, "too many items: 4 > 3"),
    (json.dumps({"items": [{"prompt": "a", "response": "b " * 600}]}).encode(), 422, "items[0]: too long"),
    (json.dumps({"items": [{"prompt": "a", "response": "b" * 5000}]}).encode(), 413, "limit is 4096"),
])
def test_bad_bodies_get_the_right_4xx(app, body, status, says):
    r = call(app, "POST", "/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_streamed_body_over_the_limit_is_413_without_content_length(app):
    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = call(app, "POST", "/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]


def test_good_request_and_routing_errors(app):
    r = call(app, "POST", "/v1/score", json={"items": ROWS[:1], "return_tokens": True})
    assert r.status_code == 200 and r.json()["results"][0]["n_tokens"] == len(r.json()["results"][0]["tokens"])
    assert call(app, "GET", "/v1/score").status_code == 405
    assert call(app, "GET", "/nope").status_code == 404
    r = call(app, "POST", "/v1/models/reload", json={"model": "/no/such/folder"})
    assert r.status_code == 422 and "cannot load" in r.json()["detail"]


def test_auth_guards_every_route_but_healthz(tiny_engine):
    app = build_http_app(InProcessService(tiny_engine), Limits(api_key="s3cret"))
    body = {"items": ROWS[:1]}
    assert call(app, "GET", "/healthz").status_code == 200
    for path in ("/docs", "/openapi.json", "/v1/models"):
        r = call(app, "GET", path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in call(app, "POST", "/v1/score", json=body).json()["detail"]
    wrong = call(app, "POST", "/v1/score", json=body, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "wrong API key" in wrong.json()["detail"]
    assert call(app, "POST", "/v1/score", json=body, headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert call(app, "GET", "/docs", headers={"authorization": "Bearer s3cret"}).status_code == 200
