"""The method stays plain code: every module except the thin Ray / vLLM / FastAPI layer, named
file by file below, never imports ray, vllm or fastapi, checked both statically (every import
statement, also inside functions) and at import time. A new file that needs one of them must be
added to LAYER on purpose."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "services" / "opsft"
# The thin layer that may talk to Ray, vLLM or FastAPI, file by file. Everything else is checked.
LAYER = {
    "cli/serve.py", "cli/submit.py",                      # start Serve, submit Ray jobs
    "cluster.py",                                         # Ray start-up and runtime envs
    "engines/vllm.py",                                    # the vLLM engine (imported only when asked for)
    "engines/vllm_hd.py",                                 # hinted decoding on vLLM: its logits processor
    "jobs/pipeline.py", "jobs/stages.py",                 # Ray Data corpus jobs
    "realign/schedule.py",                                # Ray job submission of scheduled cycles
    "serve/app.py", "serve/deployments.py", "serve/http.py",  # Ray Serve + FastAPI
    "train/ray_job.py",                                   # Ray Train
    "train/ray_data.py",                                  # Ray Data: the training corpus, read and tokenised
}
FORBIDDEN = {"ray", "vllm", "fastapi", "starlette", "uvicorn"}


def method_modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel not in LAYER:
            yield rel, path


def test_every_layer_file_exists():
    assert all((PKG / rel).is_file() for rel in LAYER), sorted(r for r in LAYER if not (PKG / r).is_file())


def imported_roots(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_method_modules_do_not_import_cluster_or_serving_packages():
    offenders = {rel: sorted(set(imported_roots(p)) & FORBIDDEN) for rel, p in method_modules()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"method modules importing ray/vllm/fastapi: {offenders}"
    assert len(list(method_modules())) >= 40  # the whole package but the layer


def test_method_modules_import_without_ray_vllm_fastapi():
    names = [f"opsft.{rel[:-3].replace('/', '.')}".removesuffix(".__init__") for rel, _ in method_modules()
             if not rel.endswith("__main__.py")]  # running it is the CLI; its imports are checked statically
    code = (
        "import sys, importlib\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing method modules pulled in: {out.stdout}"
