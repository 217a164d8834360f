"""Shared fixtures: the real embedded model (session-wide), a tiny random Llama with the
same tokenizer for fast unit tests, and one local Ray cluster for the tests that need it."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Ray Serve's controller declares a proxy actor that is not up within 5 s unhealthy and kills it
# (RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S), then serve.start fails with ActorDiedError. On a
# 2-core machine at load 7 a fresh-clone `make test` saw exactly that: starting the proxy's
# worker took longer. The tests wait for the proxy, not for a deadline made for idle servers; the
# Ray processes inherit these from this process (ray.init starts them) and from the runtime env.
SLOW_MACHINE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120"}
for _key, _value in SLOW_MACHINE_ENV.items():
    os.environ.setdefault(_key, _value)

# Object storage on loopback (tests/test_object_storage.py): an S3-compatible server (moto's server mode,
# from PyPI) on a port chosen here, before any Ray process starts, so that the Ray workers the tests
# start inherit where s3:// goes (pyarrow reads AWS_ENDPOINT_URL). Nothing leaves 127.0.0.1.
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_ACCESS_KEY_ID": "opsft-test",
          "AWS_SECRET_ACCESS_KEY": "opsft-test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
for _key, _value in S3_ENV.items():
    os.environ.setdefault(_key, _value)

# The property tests (tests/test_fuzz_rows.py) draw the same examples on every run, so CI cannot
# fail on a new draw; HYPOTHESIS_PROFILE=explore draws new ones (run it to hunt, not in CI).
settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def model_dir() -> str:
    from opsft.models import default_model_dir

    return str(default_model_dir())


@pytest.fixture(scope="session")
def real_engine(model_dir):
    """HFEngine on the real SmolLM2-135M-Instruct (fp32, CPU)."""
    from opsft.engines.hf import HFEngine

    return HFEngine(model_dir, device="cpu")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer random Llama with the real tokenizer's vocabulary (fast, deterministic)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_model, tokenizer) -> str:
    """The tiny random checkpoint on disk (engine actors and replicas load a folder): fast, deterministic."""
    path = tmp_path_factory.mktemp("tiny-ckpt")
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster (2 CPUs) for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **SLOW_MACHINE_ENV}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (the port of AWS_ENDPOINT_URL), for the whole session."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    port = endpoint.rsplit(":", 1)[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", port], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120  # a hang guard: the server is up when it answers
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the S3 test server did not start (exit {proc.poll()})") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def bucket(s3_server, request):
    """A new, empty bucket: its s3:// URI."""
    import re
    import uuid

    import pyarrow.fs as pafs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http",
                      allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


# pytest sets its warning filters afresh for every collection and test; the few deprecations other packages
# raise inside their own code (opsft.THIRD_PARTY_DEPRECATIONS) stay quiet in both, as in the commands.
def pytest_collectstart(collector):
    import opsft

    opsft.quiet_third_party_deprecations()


@pytest.fixture(autouse=True)
def _quiet_third_party_deprecations():
    import opsft

    opsft.quiet_third_party_deprecations()

