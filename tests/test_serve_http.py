"""The scoring API end to end: Ray Serve on 127.0.0.1, real HTTP (httpx), the real model.

Two applications on one Serve instance: `/open` (the real model, allow_open: no auth) and `/auth`
(a tiny random checkpoint, API key and admin key from files). Checked: answers equal `opsft score` for
the same items (1e-4: concurrent requests share batched forward passes, whose float noise
differs from single-row scoring), 32 concurrent clients, every malformed input -> its 4xx,
auth on and off, a bounded schemathesis fuzz of valid and invalid requests (no 5xx), hostile
bodies and slow clients through the real proxy, a reload while requests are in flight (none
fails; later answers come from the new checkpoint), and a scorer replica killed with a request
on it (the request is answered by the other replica).

    .venv/bin/python -m pytest -q tests/test_serve_http.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from opsft.config import ServeConfig
from opsft.scoring import SCORE_FIELDS
from ray import cloudpickle

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the engine factory below runs in the replicas

TOPICS = ["the moon", "rivers", "prime numbers", "bread", "owls", "glaciers", "chess", "tea"]
ITEMS = [{"prompt": f"Write one sentence about {t}.", "response": f"Here is a fact about {t}: it is {k} times "
          f"more interesting than it looks."} for k, t in enumerate(TOPICS * 4)]  # 32 distinct items
ITEMS[1] = {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "What is the capital of France?"}],
            "response": "The capital of France is Paris."}
KEY = "test-key-123"
ADMIN = "admin-key-456"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """What `opsft score --tokens` writes for ITEMS (the real CLI, in-process)."""
    from opsft.cli import main

    d = tmp_path_factory.mktemp("ref")
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    assert main(["score", "--input", str(d / "in.jsonl"), "--output", str(d / "out.jsonl"), "--model", model_dir,
                 "--tokens"]) == 0
    return [json.loads(line) for line in (d / "out.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(ray_local, model_dir, tiny_dir, tmp_path_factory):
    from opsft.serve.app import build_app
    from ray import serve

    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(KEY + "\n")
    admin_file = key_file.with_name("admin_key")
    admin_file.write_text(ADMIN + "\n")
    roots = sorted({os.path.dirname(model_dir), os.path.dirname(tiny_dir)})  # reloads go between the two
    port = free_port()
    serve.shutdown()  # a Serve left by an earlier module would keep its own port (http_options not applied)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # small CPU reservations: the session cluster has 2 CPUs that other modules' actors may hold
    open_cfg = ServeConfig(engine={"model": model_dir}, num_cpus=0.5, torch_threads=2, max_items=40,
                           max_body_bytes=64 * 1024, allow_open=True, model_roots=roots)
    auth_cfg = ServeConfig(engine={"model": tiny_dir}, num_cpus=0.25, torch_threads=1, max_items=8,
                           api_key_file=str(key_file), admin_key_file=str(admin_file))
    serve.run(build_app(open_cfg), name="open", route_prefix="/open")
    serve.run(build_app(auth_cfg), name="auth", route_prefix="/auth")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def assert_same_scores(got: dict, want: dict, tol: float) -> None:
    for name in SCORE_FIELDS:
        assert got[name] == pytest.approx(want[name], abs=tol), name


def test_answers_equal_opsft_score(base, reference, model_dir):
    with httpx.Client(base_url=base + "/open", timeout=120) as client:
        r = client.post("/v1/score", json={"items": ITEMS[:6], "return_tokens": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == model_dir
        for got, want in zip(body["results"], reference[:6], strict=True):
            assert got["id"] == want["id"]
            assert_same_scores(got, want, 1e-4)
            assert [t["phi"] for t in got["tokens"]] == pytest.approx(want["token_phi"], abs=1e-4)
            assert len(got["tokens"]) == got["n_tokens"]
        assert "".join(t["token"] for t in body["results"][1]["tokens"]) == ITEMS[1]["response"]
        # include_eos scores one more token: the end of turn
        eos = client.post("/v1/score", json={"items": ITEMS[:1], "include_eos": True, "return_tokens": True}).json()
        assert eos["results"][0]["n_tokens"] == reference[0]["n_tokens"] + 1
        assert eos["results"][0]["tokens"][-1]["token"] == "<|im_end|>"


def test_32_concurrent_clients_all_get_their_own_correct_answer(base, reference):
    def one(k: int) -> dict:
        with httpx.Client(base_url=base + "/open", timeout=300) as client:
            r = client.post("/v1/score", json={"items": [ITEMS[k]]})
            assert r.status_code == 200, r.text
            return r.json()["results"][0]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    for got, want in zip(answers, reference, strict=True):
        assert got["id"] == want["id"] and "tokens" not in got
        assert_same_scores(got, want, 1e-4)


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"items": []}', 422, "at least 1 item"),
    (b'{"items": [{"prompt": ["x"], "response": "y"}]}', 422, "items.0.prompt"),
    (b'{"items": [{"prompt": "a", "messages": [{"role": "user", "content": "b"}], "response": "c"}]}', 422,
     "exactly one of 'prompt' or 'messages'"),
    (json.dumps({"items": ITEMS + ITEMS[:9]}).encode(), 413, "too many items: 41 > 40"),
    (json.dumps({"items": [{"prompt": "a", "response": "lorem ipsum " * 6000}]}).encode(), 413, "limit is 65536"),
])
def test_malformed_input_gets_its_4xx(base, body, status, says):
    r = httpx.post(base + "/open/v1/score", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_response_too_long_for_the_model_is_422(base):
    # the tiny checkpoint takes 512 positions; the body stays under the size limit
    r = httpx.post(base + "/auth/v1/score", json={"items": [{"prompt": "a", "response": "go " * 700}]},
                   headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"].startswith("items[0]: too long for the model")


def test_auth_on_and_off(base):
    item = {"items": [{"prompt": "hi", "response": "hello"}]}
    assert httpx.get(base + "/open/docs").status_code == 200  # auth off: everything open
    assert httpx.get(base + "/open/openapi.json").json()["paths"].keys() >= {"/v1/score", "/v1/models/reload"}
    assert httpx.get(base + "/auth/healthz").status_code == 200
    for path in ("/docs", "/v1/models"):
        assert httpx.get(base + "/auth" + path).status_code == 401
    r = httpx.post(base + "/auth/v1/score", json=item, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong API key" in r.json()["detail"]
    r = httpx.post(base + "/auth/v1/score", json=item, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["n_tokens"] >= 1
    r = httpx.post(base + "/auth/v1/score", json=item, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 200  # the admin key scores too


def test_only_the_admin_key_reloads(base, tiny_dir):
    url = base + "/auth/v1/models/reload"
    r = httpx.post(url, json={"model": tiny_dir}, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 403 and "may score but not reload" in r.json()["detail"]
    r = httpx.post(url, json={"model": tiny_dir}, timeout=60)
    assert r.status_code == 401 and "missing admin key" in r.json()["detail"]
    before = httpx.get(base + "/auth/v1/models", headers={"authorization": f"Bearer {KEY}"}).json()["data"][0]
    r = httpx.post(url, json={"model": tiny_dir}, headers={"authorization": f"Bearer {ADMIN}"}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["version"] == before["version"] + 1 and r.json()["data"][0]["model"] == tiny_dir
    # outside the default root (the folder holding the configured checkpoint): refused, nothing changes
    r = httpx.post(url, json={"model": f"{tiny_dir}/../../etc"}, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 403 and "outside the model roots" in r.json()["detail"]


def test_hostile_reload_paths_are_refused_before_any_replica_loads(base, tiny_dir):
    root = os.path.dirname(tiny_dir)
    escape = os.path.join(root, "escape-to-etc")
    os.symlink("/etc", escape)  # a link inside a root to a folder outside every root
    version = httpx.get(base + "/open/v1/models").json()["data"][0]["version"]
    try:
        for model, status, says in [(f"{root}/../../../etc", 403, "outside the model roots"),
                                    (escape, 403, "outside the model roots"), ("relative/ckpt", 400, "relative"),
                                    ("  ", 400, "empty model path"), ("s3://bucket/ckpt", 403, "no model root")]:
            r = httpx.post(base + "/open/v1/models/reload", json={"model": model}, timeout=60)
            assert r.status_code == status and says in r.json()["detail"], (model, r.text)
    finally:
        os.unlink(escape)
    assert httpx.get(base + "/open/v1/models").json()["data"][0]["version"] == version  # nothing was promoted


FUZZ_EXAMPLES = 400  # per generation mode; hypothesis derandomized: the same requests every run


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_5xx(base, mode):
    """Schema-valid requests (positive) and requests that break the schema (negative), from the
    service's own OpenAPI document; the server must answer each with its 2xx or a 4xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    headers = {"authorization": f"Bearer {ADMIN}"}  # the admin key: it may score and reload
    schema = schemathesis.openapi.from_url(base + "/auth/openapi.json", headers=headers)
    seen = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None)
    @given(case=schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def fuzz(case):
        response = case.call(base_url=base + "/auth", headers=headers, timeout=60)
        seen.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

    fuzz()
    assert {path for _, path, _ in seen} >= {"/v1/score", "/v1/models/reload"}
    statuses = {status for method, path, status in seen if method == "POST" and path == "/v1/score"}
    reloads = {status for method, path, status in seen if method == "POST" and path == "/v1/models/reload"}
    if mode == "positive":  # a schema-valid body is never malformed or of the wrong type
        assert statuses <= {200, 413, 422}, statuses
        assert reloads <= {200, 400, 403, 422}, reloads  # 400/403: a relative path or one outside the roots
    else:
        assert 200 not in {status for method, path, status in seen if method == "POST" and path == "/v1/score"}
    assert httpx.get(base + "/auth/healthz").status_code == 200


def test_models_route_says_what_is_served(base, model_dir):
    data = httpx.get(base + "/open/v1/models").json()["data"][0]
    assert data["model"] == model_dir and data["name"] == "SmolLM2-135M-Instruct"
    assert data["source"] == "config" and data["replicas"] and data["loaded_at"].endswith("+00:00")


def test_reload_while_requests_are_in_flight(base, model_dir, tiny_dir, reference):
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows

    tiny_expected = score_rows(ITEMS[:1], HFEngine(tiny_dir, device="cpu"))[0]
    version0 = httpx.get(base + "/open/v1/models").json()["data"][0]["version"]
    answers, stop = [], threading.Event()

    def client_loop():
        with httpx.Client(base_url=base + "/open", timeout=300) as client:
            while not stop.is_set():
                sent = time.monotonic()
                r = client.post("/v1/score", json={"items": ITEMS[:1]})
                answers.append((sent, r.status_code, r.json()))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    flowing = time.monotonic() + 120
    while len(answers) < 4 and time.monotonic() < flowing:  # requests are in flight
        time.sleep(0.1)
    r = httpx.post(base + "/open/v1/models/reload", json={"model": tiny_dir}, timeout=300)
    switched = time.monotonic()
    deadline = switched + 120
    while sum(sent > switched for sent, _, _ in answers) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert r.status_code == 200, r.text
    info = r.json()["data"][0]
    assert info["model"] == tiny_dir and info["version"] == version0 + 1 and info["source"] == "reload"
    assert all(rep["version"] == version0 + 1 for rep in info["replicas"])
    assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
    old = [a for _, _, a in answers if a["model"] == model_dir]
    assert old and all(a["results"][0]["cll"] == pytest.approx(reference[0]["cll"], abs=1e-4) for a in old)
    later = [a for sent, _, a in answers if sent > switched]  # sent after the reload answered
    assert later and all(a["model"] == tiny_dir and a["model_version"] == version0 + 1 for a in later)
    assert all(a["results"][0]["cll"] == pytest.approx(tiny_expected["cll"], abs=1e-4) for a in later)
    # a checkpoint that cannot be loaded (under a root, but no such folder): 422, and the served model stays
    missing = os.path.join(os.path.dirname(tiny_dir), "no-such-checkpoint")
    bad = httpx.post(base + "/open/v1/models/reload", json={"model": missing}, timeout=300)
    assert bad.status_code == 422 and "cannot load model" in bad.json()["detail"]
    assert httpx.get(base + "/open/v1/models").json()["data"][0]["model"] == tiny_dir
    # and back to the real model
    back = httpx.post(base + "/open/v1/models/reload", json={"model": model_dir}, timeout=300)
    assert back.status_code == 200 and back.json()["data"][0]["model"] == model_dir
    again = httpx.post(base + "/open/v1/score", json={"items": ITEMS[:1]}, timeout=60).json()
    assert again["results"][0]["cll"] == pytest.approx(reference[0]["cll"], abs=1e-4)


# ---------------------------------------------------------------------------- hostile clients, real proxy


def raw_request(port: int, path: str, body: bytes, content_type: str = "application/json") -> socket.socket:
    """A connection that has sent a request's headers and none of its body yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = int(next(v for k, _, v in (line.partition(": ") for line in lines[1:]) if k.lower() == "content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def test_hostile_bodies_through_the_proxy_get_a_4xx(base):
    bodies = {  # the HTTP layer's own cases are in test_serve_core.py; these cross the proxy and the scorer
        "deep nesting": (b'{"items": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400),
        "NaN": (b'{"items": [{"prompt": NaN, "response": "b"}]}', 422),
        "lone surrogate in a response": (b'{"items": [{"prompt": "a", "response": "\\udfff"}]}', 422),
        "a huge response, just under the body limit": (json.dumps({"items": [{"prompt": "a", "response": "x " * 32000}]
                                                                   }).encode(), 422),
        "special tokens": (json.dumps({"items": [{"prompt": "<|im_end|>", "response": "<|im_start|>"}]}).encode(), 200),
    }
    with httpx.Client(base_url=base + "/open", timeout=120) as client:
        for name, (body, status) in bodies.items():
            r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.text[:300])
        r = client.post("/v1/score", content=json.dumps({"items": ITEMS[:1]}), headers={"content-type": "text/plain"})
        assert r.status_code == 415
        assert client.post("/v1/score", json={"items": ITEMS[:1]}).status_code == 200  # still serving


def test_slow_clients_hold_no_one_up(base):
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"items": ITEMS[:1]}).encode()
    slow = [raw_request(port, "/open/v1/score", body) for _ in range(8)]
    try:
        for sock in slow:
            sock.sendall(body[:10])  # eight bodies stay half sent while others are served
        r = httpx.post(base + "/open/v1/score", json={"items": ITEMS[1:2]}, timeout=300)
        assert r.status_code == 200 and r.json()["results"][0]["n_tokens"] > 0
        assert httpx.get(base + "/open/healthz").status_code == 200
        for k in range(10, len(body), 8):  # one trickles the rest of its body and gets its answer
            slow[0].sendall(body[k:k + 8])
            time.sleep(0.01)
        status, answer = read_response(slow[0])
        assert status == 200 and answer["results"][0]["n_tokens"] > 0
        for sock in slow[1:4]:
            sock.shutdown(socket.SHUT_WR)  # gives up mid-body
        never = raw_request(port, "/open/v1/score", body)  # headers, then nothing, then gone
        never.close()
    finally:
        for sock in slow:
            sock.close()
    r = httpx.post(base + "/open/v1/score", json={"items": ITEMS[:1]}, timeout=300)
    assert r.status_code == 200  # the server shrugged it all off


# ---------------------------------------------------------------------------- a replica killed mid-request


class Wrapped:
    """Engine factory: an HF engine wrapped in `wrapper(engine, marker)` (a test's engine that misbehaves)."""

    def __init__(self, wrapper, marker: str):
        self.wrapper, self.marker = wrapper, marker

    def __call__(self, model: str | None):
        from opsft.engines.hf import HFEngine

        return self.wrapper(HFEngine(model, device="cpu"), self.marker)


class BlockingEngine:
    def __init__(self, engine, marker: str):
        self.engine, self.marker = engine, marker

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def score_tokens(self, *args, **kwargs):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.engine.score_tokens(*args, **kwargs)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        while True:
            time.sleep(1)  # until the test kills this replica


def test_a_request_on_a_killed_replica_is_answered_by_another(base, tiny_dir, tmp_path):
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows
    from opsft.serve.app import build_app
    from ray import serve

    marker = tmp_path / "blocked"
    cfg = ServeConfig(engine={"model": tiny_dir}, num_replicas=2, num_cpus=0.1, torch_threads=1, allow_open=True)
    # the first scoring call, across all replicas, writes its replica's pid to `marker` and waits to be killed
    serve.run(build_app(cfg, engine_factory=Wrapped(BlockingEngine, str(marker))), name="faulty",
              route_prefix="/faulty")
    try:
        answer = {}
        sent = threading.Thread(target=lambda: answer.update(r=httpx.post(
            base + "/faulty/v1/score", json={"items": ITEMS[:1]}, timeout=300)))
        sent.start()
        deadline = time.monotonic() + 120
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the replica holding the request dies, like an OOM kill
        sent.join()
        r = answer["r"]
        assert r.status_code == 200, r.text  # sent again, to a live replica
        want = score_rows(ITEMS[:1], HFEngine(tiny_dir, device="cpu"))[0]
        assert r.json()["results"][0]["cll"] == pytest.approx(want["cll"], abs=1e-4)
    finally:
        serve.delete("faulty")


# ---------------------------------------------------------------------------- an engine that dies in its replica


class DyingEngine:
    def __init__(self, engine, marker: str):
        self.engine, self.marker = engine, marker
        self.calls, self.doomed = 0, not os.path.exists(marker)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def score_tokens(self, *args, **kwargs):
        self.calls += 1
        if self.doomed and self.calls > 1:
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            raise RuntimeError("device lost (injected)")
        return self.engine.score_tokens(*args, **kwargs)


def test_a_dead_engine_is_a_503_then_a_new_replica_never_a_422(base, tiny_dir, tmp_path):
    from opsft.serve.app import build_app
    from ray import serve

    marker = tmp_path / "died"
    cfg = ServeConfig(engine={"model": tiny_dir}, num_replicas=1, num_cpus=0.1, torch_threads=1, batching=False,
                      allow_open=True)
    # the first replica's engine dies after one call (every later call raises, as a device fault makes it);
    # replicas made after that are healthy
    serve.run(build_app(cfg, engine_factory=Wrapped(DyingEngine, str(marker))), name="dying", route_prefix="/dying")
    try:
        url = base + "/dying/v1/score"
        assert httpx.post(url, json={"items": ITEMS[:1]}, timeout=300).status_code == 200
        dead = httpx.post(url, json={"items": ITEMS[:1]}, timeout=300)  # the engine died under this request
        assert dead.status_code == 503 and "device lost" in dead.json()["detail"], dead.text
        assert dead.headers["retry-after"] == "5"
        deadline, codes = time.monotonic() + 240, []  # a hang guard: Serve's health check replaces the replica
        while time.monotonic() < deadline:
            r = httpx.post(url, json={"items": ITEMS[:1]}, timeout=300)
            codes.append(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(1)
        assert codes[-1] == 200 and set(codes) <= {200, 503}, codes  # never a 4xx on a good request
        assert len(set(marker.read_text().split())) == 1  # one engine died; the one that answered is a new replica's
    finally:
        serve.delete("dying")
