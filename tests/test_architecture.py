"""The method stays plain code: modules outside the Ray/serving layers never import ray,
vllm or fastapi, checked both statically (every module file) and at import time."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "services" / "opsft"
# The thin layers that may talk to Ray, vLLM or FastAPI. Everything else is method code.
LAYER_PATHS = ("cli", "jobs", "train", "serve", "realign", "engines/vllm.py")
FORBIDDEN = {"ray", "vllm", "fastapi", "starlette", "uvicorn"}


def method_modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if not any(rel == p or rel.startswith(p + "/") for p in LAYER_PATHS):
            yield rel, path


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
    assert len(list(method_modules())) >= 5


def test_method_modules_import_without_ray_vllm_fastapi():
    names = [f"opsft.{rel[:-3].replace('/', '.')}".removesuffix(".__init__") for rel, _ in method_modules()]
    code = (
        "import sys, importlib\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing method modules pulled in: {out.stdout}"
