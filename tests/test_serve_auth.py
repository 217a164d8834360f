"""Auth that fails closed, the admin right to reload, the model roots and the durable current link,
without Ray: the keys (opsft.serve.auth), the HTTP guard in-process, the reload path checks and the
atomic pointer (opsft.serve.current), and the ingress's reload flow against in-process stand-ins of
the registry and the scorer replicas. The same on real Serve: tests/test_serve_promote.py.

    .venv/bin/python -m pytest -q tests/test_serve_auth.py
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from opsft.config import ServeConfig
from opsft.serve.auth import AuthConfigError, read_keys
from opsft.serve.current import ModelPathError, check_model_path, default_roots, point_link, read_link
from opsft.serve.http import Limits, build_http_app

SCORE = {"items": [{"prompt": "hi", "response": "hello"}]}


@pytest.fixture(autouse=True)
def no_keys_in_env(monkeypatch):
    for name in ("OPSFT_API_KEY", "OPSFT_ADMIN_KEY", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------- keys


def test_no_api_key_refuses_to_start_naming_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(AuthConfigError, match="no API key.*environment variable OPSFT_API_KEY.*--allow-open"):
        read_keys(ServeConfig())
    with pytest.raises(AuthConfigError, match="environment variable MY_KEY"):
        read_keys(ServeConfig(api_key_env="MY_KEY"))
    with pytest.raises(AuthConfigError, match=f"cannot read the API key file {tmp_path / 'nope'}"):
        read_keys(ServeConfig(api_key_file=str(tmp_path / "nope")))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(AuthConfigError, match="API key file .*empty"):
        read_keys(ServeConfig(api_key_file=str(tmp_path / "empty")))
    monkeypatch.setenv("OPSFT_API_KEY", "   ")  # blank is no key
    with pytest.raises(AuthConfigError, match="no API key"):
        read_keys(ServeConfig())


def test_keys_from_env_and_files_and_the_explicit_open_mode(tmp_path, monkeypatch):
    keys = read_keys(ServeConfig(allow_open=True))
    assert (keys.api_key, keys.admin_key, keys.allow_open) == (None, None, True)
    monkeypatch.setenv("OPSFT_API_KEY", "user-key")
    monkeypatch.setenv("OPSFT_ADMIN_KEY", "admin-key")
    keys = read_keys(ServeConfig())
    assert (keys.api_key, keys.admin_key, keys.allow_open) == ("user-key", "admin-key", False)
    (tmp_path / "admin").write_text("file-admin\n")
    assert read_keys(ServeConfig(admin_key_file=str(tmp_path / "admin"))).admin_key == "file-admin"  # file wins
    assert read_keys(ServeConfig(admin_key_env=None)).admin_key is None
    monkeypatch.setenv("OPSFT_ADMIN_KEY", "user-key")
    with pytest.raises(AuthConfigError, match="admin key equals the API key"):
        read_keys(ServeConfig())


def test_limits_without_a_key_need_allow_open():
    with pytest.raises(ValueError, match="allow_open"):
        Limits()
    assert Limits(allow_open=True).api_key is None


@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited")
def test_the_ingress_refuses_to_start_without_a_key():
    from opsft.serve.deployments import ScoreAPI

    cls = ScoreAPI.func_or_class
    api = cls.__new__(cls)  # Serve awaits the ingress wrapper's async __init__, which runs ours first
    with pytest.raises(AuthConfigError, match="OPSFT_API_KEY"):
        asyncio.run(api.__init__(ServeConfig().model_dump(), None, None))
    import gc

    del api
    gc.collect()  # the half-made wrapper's async __del__ (never awaited) warns here, under the filter


def test_opsft_serve_without_a_key_fails_before_ray_starts(capsys, monkeypatch):
    import opsft.cluster
    from opsft.cli import main

    def no_ray(*args, **kwargs):  # other tests of the session may have started Ray: watch the call instead
        raise AssertionError("opsft serve connected to Ray without an API key")

    monkeypatch.setattr(opsft.cluster, "connect", no_ray)
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "no API key" in err and "OPSFT_API_KEY" in err and "--allow-open" in err


def test_serve_config_refuses_relative_roots_and_links():
    with pytest.raises(ValueError, match="model_roots"):
        ServeConfig(model_roots=["models"])
    with pytest.raises(ValueError, match="model_roots"):
        ServeConfig(model_roots=[""])
    with pytest.raises(ValueError, match="current_link"):
        ServeConfig(current_link="current")
    assert ServeConfig(model_roots=["/models", "s3://bucket/models"]).model_roots == ["/models", "s3://bucket/models"]


# ---------------------------------------------------------------------------- the HTTP guard


class Service:
    """The HTTP layer's service: scoring and reloads answer at once (the guard is under test)."""

    def __init__(self):
        self.reloads = []

    async def score(self, job):
        return {"model": "m", "model_version": 0, "results": []}

    async def models(self):
        return {"data": []}

    async def reload(self, model):
        self.reloads.append(model)
        return {"data": []}


def call(app, method, path, key=None, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def statuses(limits: Limits, key: str | None) -> tuple[int, int, int]:
    """(score, models, reload) status codes for a client sending `key`."""
    service = Service()
    app = build_http_app(service, limits)
    codes = (call(app, "POST", "/v1/score", key, json=SCORE).status_code,
             call(app, "GET", "/v1/models", key).status_code,
             call(app, "POST", "/v1/models/reload", key, json={"model": "/m"}).status_code)
    assert (codes[2] == 200) == (service.reloads == ["/m"])  # a refused reload never reaches the service
    return codes


@pytest.mark.parametrize("limits, key, expected", [
    # scoring key and admin key: the scoring key scores but may not reload; the admin key does both
    (Limits(api_key="user", admin_key="admin"), "user", (200, 200, 403)),
    (Limits(api_key="user", admin_key="admin"), "admin", (200, 200, 200)),
    (Limits(api_key="user", admin_key="admin"), None, (401, 401, 401)),
    (Limits(api_key="user", admin_key="admin"), "wrong", (401, 401, 401)),
    (Limits(api_key="user", admin_key="admin"), "admin ", (200, 200, 200)),  # surrounding space is trimmed
    (Limits(api_key="user", admin_key="admin"), "adminx", (401, 401, 401)),
    # no admin key: reloads are disabled, whatever the key
    (Limits(api_key="user"), "user", (200, 200, 403)),
    (Limits(api_key="user"), None, (401, 401, 401)),
    # open on purpose: without an admin key everything is open; with one, reloads need it
    (Limits(allow_open=True), None, (200, 200, 200)),
    (Limits(allow_open=True, admin_key="admin"), None, (200, 200, 401)),
    (Limits(allow_open=True, admin_key="admin"), "admin", (200, 200, 200)),
    (Limits(api_key="user", allow_open=True), "user", (200, 200, 200)),
])
def test_who_may_score_and_who_may_reload(limits, key, expected):
    assert statuses(limits, key) == expected


def test_refusals_say_why():
    app = build_http_app(Service(), Limits(api_key="user", admin_key="admin"))
    r = call(app, "POST", "/v1/models/reload", "user", json={"model": "/m"})
    assert r.status_code == 403 and "may score but not reload" in r.json()["detail"]
    r = call(app, "POST", "/v1/models/reload", None, json={"model": "/m"})
    assert r.status_code == 401 and "missing admin key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    app = build_http_app(Service(), Limits(api_key="user"))
    r = call(app, "POST", "/v1/models/reload", "user", json={"model": "/m"})
    assert r.status_code == 403 and "reloads are disabled" in r.json()["detail"]
    assert "OPSFT_ADMIN_KEY" in r.json()["detail"]
    assert call(app, "GET", "/healthz").status_code == 200


# ---------------------------------------------------------------------------- model roots


@pytest.fixture
def roots(tmp_path):
    models = tmp_path / "models"
    (models / "ckpt-1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", models / "escape")  # a link inside the root to a folder outside it
    os.symlink(models / "ckpt-1", models / "current")  # a link inside the root to a folder inside it
    os.symlink(models, tmp_path / "models-alias")  # the root reached through another name
    return tmp_path, str(models)


@pytest.mark.parametrize("path, status, says", [
    ("{models}/../outside", 403, "resolves to {tmp}/outside"),
    ("{models}/escape", 403, "outside the model roots"),
    ("{models}/escape/../../etc", 403, "outside the model roots"),
    ("/etc", 403, "outside the model roots"),
    ("/", 403, "outside the model roots"),
    ("{tmp}/models-sibling", 403, "outside the model roots"),  # a name that starts like the root is not in it
    ("models/ckpt-1", 400, "relative path"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 400, "relative path"),
    ("../models/ckpt-1", 400, "relative path"),
    ("", 400, "empty model path"),
    ("   ", 400, "empty model path"),
    ("{models}/ckpt-1\x00", 400, "NUL"),
    ("s3://bucket/models/x", 403, "under no model root"),
])
def test_hostile_reload_paths_are_refused(roots, path, status, says):
    tmp, models = roots
    with pytest.raises(ModelPathError) as refused:
        check_model_path(path.format(models=models, tmp=tmp), [models])
    assert refused.value.status == status
    assert says.format(tmp=tmp) in str(refused.value)


def test_paths_under_a_root_resolve_to_the_real_folder(roots):
    tmp, models = roots
    real = os.path.realpath(models)
    assert check_model_path(f"{models}/ckpt-1", [models]) == f"{real}/ckpt-1"
    assert check_model_path(f"{models}/current", [models]) == f"{real}/ckpt-1"  # the link's target, not the link
    assert check_model_path(f"{models}/x/../ckpt-1/", [models]) == f"{real}/ckpt-1"
    assert check_model_path(f"{tmp}/models-alias/ckpt-1", [models]) == f"{real}/ckpt-1"
    assert check_model_path(f"{models}/not-there-yet", [models]) == f"{real}/not-there-yet"  # the loader says 422
    with pytest.raises(ModelPathError, match="none configured"):
        check_model_path(f"{models}/ckpt-1", [])


def test_object_store_uris_only_under_a_uri_root():
    roots = ["/models", "s3://bucket/models/"]
    assert check_model_path("s3://bucket/models/v1/final/", roots) == "s3://bucket/models/v1/final"
    for path, status in [("s3://bucket/models-2/v1", 403), ("s3://other/models/v1", 403),
                         ("gs://bucket/models/v1", 403), ("s3://bucket/models/../secrets", 400),
                         ("s3://bucket/models//v1", 400), ("s3://bucket/models/./v1", 400)]:
        with pytest.raises(ModelPathError) as refused:
            check_model_path(path, roots)
        assert refused.value.status == status, path
    with pytest.raises(ModelPathError):
        check_model_path("s3://bucket/models/v1", ["/models"])  # a local root admits no URI


def test_default_roots_are_the_configured_models_folder(tmp_path, monkeypatch):
    assert default_roots("/models/current") == ["/models"]
    assert default_roots(None, "/srv/models/current") == ["/srv/models"]
    assert default_roots("s3://bucket/models/base") == ["s3://bucket/models"]
    assert default_roots("HuggingFaceTB/SmolLM2-135M-Instruct") == []  # a hub id: no folder to allow
    monkeypatch.setenv("OPSFT_HOME", str(tmp_path))
    assert default_roots(None) == [str(tmp_path / "models")]  # the embedded model's folder


# ---------------------------------------------------------------------------- the current link


def test_point_link_moves_the_pointer_atomically(tmp_path, monkeypatch):
    a, b = tmp_path / "ckpt-a", tmp_path / "ckpt-b"
    a.mkdir()
    b.mkdir()
    link = str(tmp_path / "current")
    assert read_link(link) is None  # no pointer yet
    point_link(link, str(a))
    assert os.readlink(link) == str(a) and read_link(link) == str(a)
    seen = []
    real_replace = os.replace

    def watched_replace(src, dst):  # the moment of the switch: the old link and the new one both exist
        seen.append((os.readlink(dst), os.readlink(src), os.path.dirname(src) == os.path.dirname(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watched_replace)
    point_link(link, str(b))
    assert seen == [(str(a), str(b), True)]  # renamed over the old link in one step: never missing
    assert read_link(link) == str(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-a", "ckpt-b", "current"]  # no temporary left


def test_point_link_never_replaces_a_real_folder_and_a_dangling_link_is_an_error(tmp_path):
    folder = tmp_path / "current"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(IsADirectoryError, match="not a symlink"):
        point_link(str(folder), str(tmp_path / "other"))
    assert (folder / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["current"]
    assert read_link(str(folder)) == str(folder)  # a plain folder is served as it is
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_link(str(tmp_path / "dangling"))


# ---------------------------------------------------------------------------- the ingress's reload flow


class Remote:
    """A deployment method as a handle has it: `await method.remote(...)`."""

    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args):
        return self.fn(*args)


class Registry:
    """The real ModelRegistry class, called in-process through handle-like methods."""

    def __init__(self, model, link):
        from opsft.serve.deployments import ModelRegistry

        self.inner = ModelRegistry.func_or_class(model, link)
        for name in ("current", "promote", "restore", "persist"):
            setattr(self, name, Remote(getattr(self.inner, name)))


class Replicas:
    """Two scorer replicas that load any folder holding a config.json."""

    def __init__(self, record):
        self.records = [record, record]

    def broadcast(self, method, *args):
        outer = self

        class Answers:
            async def results_async(self, timeout_s=None, return_exceptions=False):
                answers = []
                for k in range(len(outer.records)):
                    if method == "load":
                        if not os.path.exists(os.path.join(args[0]["model"] or "", "config.json")):
                            answers.append(OSError(f"no config.json in {args[0]['model']}"))
                            continue
                        outer.records[k] = args[0]
                    record = outer.records[k]
                    answers.append({"replica": f"r{k}", "model": record["model"], "version": record["version"],
                                    "loaded_at": "now"})
                return answers

        return Answers()


def ingress(cfg: ServeConfig):
    from opsft.serve.deployments import ScoreAPI

    cls = ScoreAPI.func_or_class

    class Ingress:  # the ingress's own reload code, without Serve's ASGI wrapper
        reload, models, undo = cls.reload, cls.models, cls.undo

    api = Ingress()
    api.cfg = cfg
    api.roots = cfg.model_roots
    api.registry = Registry(cfg.engine.model, cfg.current_link)
    api.scorer = Replicas(api.registry.inner.record)
    api.reload_lock = asyncio.Lock()
    return api


@pytest.fixture
def store(tmp_path):
    """/models-like folder: two checkpoints and the current link at the first."""
    models = tmp_path / "models"
    for name in ("v1", "v2"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
    os.symlink(models / "v1", models / "current")
    return models


def test_a_reload_is_recorded_in_the_link_and_a_new_registry_reads_it(store):
    cfg = ServeConfig(engine={"model": str(store / "current")}, current_link=str(store / "current"),
                      model_roots=[str(store)], allow_open=True)
    api = ingress(cfg)
    assert api.registry.inner.record["model"] == str(store / "v1")  # the link's target, read at start
    assert api.registry.inner.record["source"] == "current_link"
    answer = asyncio.run(api.reload(str(store / "v2")))
    assert answer["data"][0]["model"] == str(store / "v2") and answer["data"][0]["version"] == 1
    assert os.readlink(store / "current") == str(store / "v2")
    restarted = Registry(cfg.engine.model, cfg.current_link).inner.record  # what a restarted service serves
    assert restarted["model"] == str(store / "v2") and restarted["source"] == "current_link"


def test_refused_or_failed_reloads_leave_the_registry_the_replicas_and_the_link_alone(store, tmp_path):
    cfg = ServeConfig(engine={"model": str(store / "current")}, current_link=str(store / "current"),
                      model_roots=[str(store)], allow_open=True)
    api = ingress(cfg)
    before = dict(api.registry.inner.record)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text("{}")  # loadable, but outside the root
    for path, status in [(str(tmp_path / "evil"), 403), (f"{store}/../evil", 403), ("evil", 400),
                         (str(store / "missing"), 422)]:
        answer = asyncio.run(api.reload(path))
        assert answer["status"] == status, (path, answer)
        assert api.registry.inner.record == before and api.scorer.records == [before, before]
        assert os.readlink(store / "current") == str(store / "v1")


def test_a_promotion_that_cannot_be_recorded_is_undone(store):
    os.unlink(store / "current")
    (store / "current").mkdir()  # a real folder where the link should be: the link cannot move
    (store / "current" / "config.json").write_text("{}")
    cfg = ServeConfig(engine={"model": str(store / "current")}, current_link=str(store / "current"),
                      model_roots=[str(store)], allow_open=True)
    api = ingress(cfg)
    before = dict(api.registry.inner.record)
    answer = asyncio.run(api.reload(str(store / "v2")))
    assert answer["status"] == 500 and "could not record it in current_link" in answer["detail"]
    assert "previous model is served" in answer["detail"]
    assert api.registry.inner.record == before and api.scorer.records == [before, before]
    assert (store / "current").is_dir() and not (store / "current").is_symlink()
