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
from opsft.serve.core import Job, prepare_job, score_jobs
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
    from opsft.data.chat import encode
    from opsft.data.corpus import parse_row

    ex = parse_row(ROWS[1])
    enc = encode(tiny_engine.tokenizer, ex.messages, ex.response)
    lp, ent = brute_force_logprobs(tiny_model, enc.input_ids, enc.response_start)
    tokens = answers[0]["results"][1]["tokens"]
    assert [t["id"] for t in tokens] == enc.input_ids[enc.response_start:]
    assert "".join(t["token"] for t in tokens) == ex.response
    assert [t["logprob"] for t in tokens] == pytest.approx(lp, abs=1e-4)
    assert [t["entropy"] for t in tokens] == pytest.approx(ent, abs=1e-4)
    assert sum(t["phi"] for t in tokens) == pytest.approx(answers[0]["results"][1]["cll_sum"], abs=1e-6)


def check_job(engine, job):
    return prepare_job(engine, job)[1]


def test_prepare_job_names_the_item_the_model_cannot_score(tiny_engine):
    too_long = {"prompt": "x", "response": "word " * 600}  # the tiny model takes 512 positions
    assert check_job(tiny_engine, Job(ROWS)) is None
    bad = check_job(tiny_engine, Job([ROWS[0], too_long]))
    assert bad["status"] == 422 and bad["detail"].startswith("items[1]: too long for the model")
    ends_with_assistant = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                           "response": "c"}
    assert "end with a user turn" in check_job(tiny_engine, Job([ends_with_assistant]))["detail"]
    assert "'response' is empty" in check_job(tiny_engine, Job([{"prompt": "a", "response": "  "}]))["detail"]


class CountingTokenizer:
    """The engine's tokenizer, counting the texts it encodes (each item's response is one)."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_request_is_tokenised_once_and_scores_as_score_rows(tiny_model, tokenizer):
    counting = CountingTokenizer(tokenizer)
    engine = HFEngine(device="cpu", model_and_tokenizer=(tiny_model, counting))
    jobs = []
    score_rows(ROWS[:1], engine)
    per_item = counting.calls  # encoding one item (its response; a prompt too without a chat template)
    calls = per_item * (len(ROWS) + 1)
    counting.calls = 0
    for rows in (ROWS, ROWS[:1]):
        job, error = prepare_job(engine, Job(rows))
        assert error is None
        jobs.append(job)
    assert counting.calls == calls  # the check tokenised each item once
    answers = score_jobs(engine, jobs)
    assert counting.calls == calls  # ... and scoring did not tokenise again
    plain = HFEngine(device="cpu", model_and_tokenizer=(tiny_model, tokenizer))
    for job, answer in zip(jobs, answers, strict=True):
        expected = score_rows(job.rows, plain)
        for got, want in zip(answer["results"], expected, strict=True):
            assert got["n_tokens"] == want["n_tokens"]
            assert got["cll"] == pytest.approx(want["cll"], abs=1e-5)  # batched vs alone: float32 matmul noise
    # a job prepared on another engine (before a reload) is tokenised again by the engine that scores it
    assert score_jobs(plain, jobs[1:])[0]["results"][0]["n_tokens"] == answers[1]["results"][0]["n_tokens"]


class InProcessService:
    """What the Serve ingress does, without Ray: check, then score on the tiny engine."""

    def __init__(self, engine):
        self.engine = engine

    async def score(self, job):
        job, error = prepare_job(self.engine, job)
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
    return build_http_app(InProcessService(tiny_engine), Limits(max_items=3, max_body_bytes=4096, allow_open=True))


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


# ---------------------------------------------------------------------------- hostile bodies


def strict_json(text: str):
    """JSON as the RFC has it: NaN / Infinity are not JSON (Python's json would accept them)."""
    def refuse(name):
        raise ValueError(f"{name} in a response body")

    return json.loads(text, parse_constant=refuse)


GOOD = json.dumps({"items": ROWS[:1]}).encode()
NESTED = b"[" * 1900 + b"]" * 1900  # deeper than Python's json recursion limit, inside the 4096-byte limit


@pytest.mark.parametrize("name, body, status, says", [
    ("deep nesting", b'{"items": ' + NESTED + b"}", 400, "error parsing the body"),
    ("deep nesting in a field", b'{"items": [{"prompt": "a", "response": "b", "id": ' + b'{"a": ' * 400 + b"1"
     + b"}" * 400 + b"}]}", 422, "items.0.id: Input should be a valid string"),
    ("NaN", b'{"items": [{"prompt": "a", "response": "b"}], "return_tokens": NaN}', 422, "return_tokens"),
    ("Infinity", b'{"items": [{"prompt": Infinity, "response": "b"}]}', 422, "items.0.prompt"),
    ("-Infinity", b'{"items": -Infinity}', 422, "items: Input should be a valid list"),
    ("a number of 5000 digits", b'{"items": [{"prompt": "a", "response": ' + b"9" * 5000 + b"}]}", 413,
     "limit is 4096"),
    ("a number of 4000 digits", b'{"items": [{"prompt": "a", "response": ' + b"9" * 4000 + b"}]}", 422,
     "items.0.response: Input should be a valid string"),
    ("1e999", b'{"items": [{"prompt": "a", "response": 1e999}]}', 422, "items.0.response"),
    ("invalid UTF-8", b'{"items": [{"prompt": "\xff\xfe", "response": "b"}]}', 400, "error parsing the body"),
    ("lone surrogate", b'{"items": [{"prompt": "a\\ud800", "response": "b"}]}', 422,
     "items[0]: 'prompt' is not valid Unicode text"),
    ("a long unknown key", json.dumps({"items": ROWS[:1], "k" * 3000: 1}).encode(), 422, "Extra inputs"),
    ("hundreds of unknown keys", json.dumps({"items": ROWS[:1], **{f"k{i}": 0 for i in range(300)}}).encode(), 422,
     "(+295 more)"),
    ("JSON then garbage", GOOD + b"garbage", 400, "malformed JSON"),
    ("a top-level string", b'"items"', 422, "valid dictionary"),
    ("no body", b"", 422, "body: Field required"),
])
def test_hostile_bodies_get_a_4xx_that_says_why(app, name, body, status, says):
    r = call(app, "POST", "/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, (name, r.text[:300])
    answer = strict_json(r.text)
    assert says in answer["detail"], (name, answer["detail"][:300])
    assert len(r.content) < 4096, name  # a 4 kB body never gets a bigger answer
    assert len(answer.get("errors") or []) <= 20
    assert call(app, "POST", "/v1/score", content=GOOD, headers={"content-type": "application/json"}
                ).status_code == 200  # and the service still answers


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml", "*/*", "json"])
def test_a_body_not_declared_json_is_415(app, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    for path in ("/v1/score", "/v1/models/reload"):
        r = call(app, "POST", path, content=GOOD, headers=headers)
        assert r.status_code == 415, r.text
        assert "Content-Type: application/json" in r.json()["detail"]
    for ok in ("application/json", "application/json; charset=utf-8", "Application/JSON", "application/ld+json"):
        assert call(app, "POST", "/v1/score", content=GOOD, headers={"content-type": ok}).status_code == 200, ok
    assert call(app, "POST", "/nope", content=GOOD, headers=headers).status_code == 404  # unknown routes stay 404


# ---------------------------------------------------------------------------- a scorer replica that dies


def test_a_request_whose_replica_dies_is_sent_again_and_only_then():
    from opsft.serve.deployments import SCORE_ATTEMPTS, retry_if_replica_died
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    def calls(*outcomes):
        made = []

        async def call():
            outcome = outcomes[len(made)]
            made.append(outcome)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return call, made

    call, made = calls(ActorDiedError(), ActorUnavailableError("network", None), {"results": []})
    assert asyncio.run(retry_if_replica_died(call)) == {"results": []} and len(made) == 3 == SCORE_ATTEMPTS
    call, made = calls(*[ActorDiedError()] * 3)
    with pytest.raises(ActorDiedError):
        asyncio.run(retry_if_replica_died(call))
    assert len(made) == 3  # gives up after SCORE_ATTEMPTS
    wrapped = RayTaskError("score", "Traceback ...", ActorDiedError())  # a died actor seen through a task
    call, made = calls(wrapped, {"results": [1]})
    assert asyncio.run(retry_if_replica_died(call)) == {"results": [1]} and len(made) == 2
    for error in (ValueError("a bug"), RayTaskError("score", "Traceback ...", ValueError("a bug"))):
        call, made = calls(error, {"results": []})
        with pytest.raises(type(error)):
            asyncio.run(retry_if_replica_died(call))
        assert len(made) == 1  # an error the scorer raised is not sent again


# ---------------------------------------------------------------------------- a reload frees the old engine


class ClosingEngine:
    """The tiny engine, with a close() that records when it ran and a first scoring call that
    waits for `release` (a request still running on the old engine when the reload swaps)."""

    def __init__(self, engine, log: list, release=None):
        self.engine, self.log, self.release = engine, log, release
        self.model_id = engine.model_id

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def score_tokens(self, *args, **kwargs):
        if self.release is not None:
            self.log.append("old engine: call started")
            assert self.release.wait(60), "the test never released the call"
            self.release = None
            self.log.append("old engine: call done")
        return self.engine.score_tokens(*args, **kwargs)

    def close(self):
        self.log.append(f"closed {self.model_id}")


def test_a_reload_closes_the_old_engine_after_its_last_call(tiny_engine):
    """Scorer.load swaps engines at once, and closes the old one (vLLM frees its device memory only
    then) when the calls that started on it are done, never under them."""
    import threading

    from opsft.serve.deployments import Scorer

    log, release = [], threading.Event()

    class Registry:
        class current:
            @staticmethod
            async def remote():
                return {"model": "first", "version": 0}

    def factory(model):
        return ClosingEngine(tiny_engine, log, release if model == "first" else None)

    async def scenario():
        cls = Scorer.func_or_class
        scorer = cls.__new__(cls)  # Serve awaits the async __init__ itself
        await scorer.__init__({"batching": False}, Registry(), factory)
        job = Job(rows=[dict(ROWS[0])], return_tokens=False, include_eos=False)
        pending = asyncio.create_task(scorer.score(job))
        while "old engine: call started" not in log:
            await asyncio.sleep(0.01)
        await scorer.load({"model": "second", "version": 1})
        assert scorer.info()["version"] == 1
        await asyncio.sleep(0.3)
        assert "closed" not in " ".join(log)  # the old engine is still scoring: not closed under it
        release.set()
        answer = await pending
        while scorer.retiring:
            await asyncio.sleep(0.01)
        return answer

    answer = asyncio.run(scenario())
    assert answer["model_version"] == 0 and answer["results"][0]["n_tokens"] > 0  # finished on the old engine
    assert log == ["old engine: call started", "old engine: call done", f"closed {tiny_engine.model_id}"]


# ---------------------------------------------------------------------------- an engine that fails


class FailingEngine:
    """The tiny engine whose score_tokens raises a plain RuntimeError (no CUDA words) once it has made
    `healthy_calls` calls, as a process whose device faulted does; or, with `poison`, raises for any
    sequence holding that token id only (a request the engine cannot score; the engine stays healthy)."""

    def __init__(self, engine, healthy_calls: int | None = None, poison: int | None = None):
        self.engine, self.left, self.poison = engine, healthy_calls, poison
        self.model_id = engine.model_id

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def close(self):
        pass  # the tiny engine is the module's: it stays open

    def score_tokens(self, sequences, *args, **kwargs):
        if self.left is not None:
            if self.left <= 0:
                raise RuntimeError("device lost")
            self.left -= 1
        if self.poison is not None and any(self.poison in s for s in sequences):
            raise ValueError("cannot score this sequence")
        return self.engine.score_tokens(sequences, *args, **kwargs)


def _scorer(factory, batching=False):
    from opsft.serve.deployments import Scorer

    class Registry:
        class current:
            @staticmethod
            async def remote():
                return {"model": "first", "version": 0}

    async def make():
        cls = Scorer.func_or_class
        scorer = cls.__new__(cls)
        await scorer.__init__({"batching": batching}, Registry(), factory)
        return scorer

    return make


def test_a_dead_engine_answers_503_and_fails_the_health_check_never_422(tiny_engine):
    make = _scorer(lambda model: FailingEngine(tiny_engine, healthy_calls=1) if model == "first" else tiny_engine)

    async def scenario():
        scorer = await make()
        job = Job(rows=[dict(ROWS[0])])
        first = await scorer.score(job)
        scorer.check_health()  # healthy
        second = await scorer.score(job)  # the engine died: its check (a known-good request) fails too
        third = await scorer.score(Job(rows=[dict(ROWS[1])]))
        with pytest.raises(RuntimeError, match="engine fault"):
            scorer.check_health()  # Serve replaces this replica
        await scorer.load({"model": "second", "version": 1})  # a new engine: healthy again
        scorer.check_health()
        return first, second, third, await scorer.score(job)

    first, second, third, after = asyncio.run(scenario())
    assert "results" in first and "results" in after
    for answer in (second, third):
        assert answer["status"] == 503 and answer["engine_fault"] and "device lost" in answer["detail"]


def test_a_request_the_engine_cannot_score_is_422_and_the_others_in_its_batch_are_scored(tiny_engine):
    from opsft.data.chat import response_ids

    poison = response_ids(tiny_engine.tokenizer, " zebra")[-1]
    make = _scorer(lambda model: FailingEngine(tiny_engine, poison=poison))

    async def scenario():
        scorer = await make()
        good, bad = Job(rows=[dict(ROWS[0])]), Job(rows=[{"prompt": "Name an animal.", "response": "A zebra"}])
        answers = await scorer._run([good, bad])  # one merged call: it raises, then each job alone
        scorer.check_health()  # the engine passed its check: not an engine fault
        return answers

    good, bad = asyncio.run(scenario())
    assert good["results"][0]["cll"] == pytest.approx(score_rows([ROWS[0]], tiny_engine)[0]["cll"], abs=1e-5)
    assert bad["status"] == 422 and "cannot score this sequence" in bad["detail"]


def test_the_ingress_sends_a_request_again_when_a_scorer_engine_failed():
    from opsft.serve.deployments import SCORE_ATTEMPTS, retry_engine_faults

    dead = {"status": 503, "engine_fault": True, "detail": "the scorer's engine failed"}

    def calls(*answers):
        made = []

        async def call():
            made.append(answers[len(made)])
            return made[-1]

        return call, made

    call, made = calls(dead, {"results": [1]})
    assert asyncio.run(retry_engine_faults(call)) == {"results": [1]} and len(made) == 2
    call, made = calls(*[dead] * SCORE_ATTEMPTS)
    assert asyncio.run(retry_engine_faults(call))["status"] == 503 and len(made) == SCORE_ATTEMPTS
    call, made = calls({"status": 422, "detail": "items[0]: bad"})
    assert asyncio.run(retry_engine_faults(call))["status"] == 422 and len(made) == 1  # a 4xx is not sent again
