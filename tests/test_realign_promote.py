"""The realignment cycle's promote stage against real local HTTP servers (http.server in a thread):
transient failures (503, 429 with Retry-After, a refused connection, a timeout, a dropped
connection) are tried again with bounded exponential backoff; a refusal (400, 401, 403, 422, 500)
fails at once, with the service's reason. No Ray, no model.

    .venv/bin/python -m pytest -q tests/test_realign_promote.py
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from opsft.config import RealignConfig
from opsft.realign.cycle import PromoteError, post_reload, run_promote

CKPT = "/models/realign/cycles/v0002/train/final"


class Script(BaseHTTPRequestHandler):
    """Answers each POST with the next entry of the server's script: (status, headers) or 'hang'
    (wait until the test ends: the client times out) or 'drop' (close without an answer)."""

    def do_POST(self):  # noqa: N802
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.calls.append((self.path, body, self.headers.get("Authorization")))
            step = srv.script[min(len(srv.calls), len(srv.script)) - 1]
        if step == "hang":
            srv.release.wait(30)
            return
        if step == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers = step
        payload = json.dumps({"data": [{"model": body["model"]}]} if status == 200
                             else {"detail": f"scripted {status}"}).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    servers = []

    def start(*script):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Script)
        srv.daemon_threads = True
        srv.script, srv.calls, srv.lock, srv.release = list(script), [], threading.Lock(), threading.Event()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_port}"

    yield start
    for srv in servers:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def promote(url, sleeps, attempts=5, timeout_s=10.0, token="admin-secret", backoff_s=0.5):
    return post_reload(url + "/v1/models/reload", CKPT, token, timeout_s=timeout_s, attempts=attempts,
                       backoff_s=backoff_s, backoff_max_s=3.0, sleep=sleeps.append)


def test_503_twice_then_200_is_retried_with_growing_waits(server):
    srv, url = server((503, {}), (503, {}), (200, {}))
    sleeps = []
    out = promote(url, sleeps)
    assert out["status"] == 200 and out["attempts"] == 3 and out["answer"]["data"][0]["model"] == CKPT
    assert sleeps == [0.5, 1.0]  # backoff_s, then doubled
    assert [c[0] for c in srv.calls] == ["/v1/models/reload"] * 3
    assert all(c[1] == {"model": CKPT} and c[2] == "Bearer admin-secret" for c in srv.calls)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 500])
def test_a_refusal_fails_at_once_with_the_services_reason(server, status):
    srv, url = server((status, {}), (200, {}))
    sleeps = []
    with pytest.raises(PromoteError, match=f"HTTP {status}: scripted {status} \\(not retried\\)"):
        promote(url, sleeps)
    assert len(srv.calls) == 1 and sleeps == []


def test_every_transient_status_is_retried_and_waits_are_capped(server):
    srv, url = server((502, {}), (504, {}), (429, {"Retry-After": "2"}), (503, {"Retry-After": "999"}),
                      (200, {}))
    sleeps = []
    assert promote(url, sleeps, attempts=5, backoff_s=0.25)["attempts"] == 5
    # 0.25, 0.5, then Retry-After 2 beats the backoff's 1.0; then the backoff's 2.0 and Retry-After 999: the cap
    assert sleeps == [0.25, 0.5, 2.0, 3.0]


def test_gives_up_after_the_configured_tries(server):
    srv, url = server((503, {}))
    sleeps = []
    with pytest.raises(PromoteError, match="HTTP 503: scripted 503 \\(gave up after 3 tries\\)"):
        promote(url, sleeps, attempts=3)
    assert len(srv.calls) == 3 and sleeps == [0.5, 1.0]


def test_a_refused_connection_is_retried():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps = []
    with pytest.raises(PromoteError, match="Connection refused.*gave up after 2 tries"):
        promote(f"http://127.0.0.1:{port}", sleeps, attempts=2)
    assert sleeps == [0.5]


def test_a_timeout_and_a_dropped_connection_are_retried(server):
    srv, url = server("hang", "drop", (200, {}))
    sleeps = []
    # the first call never answers (the handler waits for the test's end); the client gives up at 3 s, long
    # enough for the answers that do come on a loaded machine (a 0.5 s limit could time out the 200 too)
    out = promote(url, sleeps, timeout_s=3.0)
    assert out["status"] == 200 and out["attempts"] == 3 and len(srv.calls) == 3 and sleeps == [0.5, 1.0]


def test_run_promote_uses_the_realign_configs_promote_fields(server, tmp_path, monkeypatch):
    srv, url = server((503, {}), (200, {}))
    monkeypatch.setenv("OPSFT_ADMIN_KEY", "the-admin-key")
    monkeypatch.setattr("time.sleep", lambda s: None)
    cfg = RealignConfig(corpus=str(tmp_path / "c.jsonl"), output_dir=str(tmp_path / "out"), promote_url=url + "/",
                        promote_attempts=2, promote_backoff_s=0.0)
    out = run_promote(SimpleNamespace(cfg=cfg), tmp_path, {"outputs": {"train": {"checkpoint": CKPT}}})
    assert out["status"] == 200 and out["attempts"] == 2 and out["url"] == url + "/v1/models/reload"
    assert srv.calls[-1] == ("/v1/models/reload", {"model": CKPT}, "Bearer the-admin-key")  # the admin key
    assert RealignConfig.model_fields["promote_api_key_env"].default == "OPSFT_ADMIN_KEY"
