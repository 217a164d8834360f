"""The direction of the house, enforced: the method stays plain code (every module except the thin
Ray / vLLM / FastAPI layer, named file by file below, never imports ray, vllm or fastapi, checked
both statically, every import statement also inside functions, and at import time); method/,
data/, engines/ and config.py import only what ALLOWED states; no module imports a private name
(`_x`) of another; and there is no import circle, lazy imports included. A new file that needs
Ray must be added to LAYER on purpose, and a new edge to ALLOWED."""

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


# ---------------------------------------------------------------------------- direction between opsft's parts

# What each part may import from opsft (besides itself): the method is plain torch over token ids, the data
# edge knows files and tokenizers, engines run models for the method, config is plain data (the settings'
# vocabularies come from the torch-free modules that own them).
ALLOWED = {
    "method/": {"opsft.method", "opsft.score_columns"},
    "data/": {"opsft.data", "opsft.score_columns"},
    "engines/": {"opsft.engines", "opsft.method", "opsft.data", "opsft.models", "opsft.faults", "opsft.score_columns"},
    "config.py": {"opsft.recipe_plan", "opsft.method.hinted_params", "opsft.method.loss_registry", "opsft.data.hints",
                  "opsft.data.storage", "opsft.engines.base"},
    "recipe_plan.py": {"opsft.method.hinted_params", "opsft.data.hints"},
}
# Torch-free: what config.py imports (so `opsft --help`, the scheduler and the HTTP ingress stay light).
TORCH_FREE = ["opsft.config", "opsft.recipe_plan", "opsft.method.hinted_params", "opsft.data.hints",
              "opsft.method.loss_registry"]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("").as_posix().replace("/", ".")
    return rel.removesuffix(".__init__")


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def opsft_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `import opsft...` / `from opsft... import names` in the file, also inside
    functions; relative imports resolved."""
    tree = ast.parse(path.read_text())
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "opsft"]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] == "opsft":
                out.append((module, [a.name for a in node.names]))
    return out


def edges(path: Path) -> set[str]:
    """The opsft modules a file imports (`from opsft.x import y` names module opsft.x.y when that is one)."""
    found = set()
    for module, names in opsft_imports(path):
        found |= {f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names} or {module}
    return {m for m in found if m in MODULES} - {module_name(path)}


def test_each_part_imports_only_what_it_may():
    offenders = {}
    for part, allowed in ALLOWED.items():
        files = [p for p in PKG.rglob("*.py") if p.relative_to(PKG).as_posix().startswith(part)]
        assert files, part
        own = "opsft." + part.removesuffix("/").removesuffix(".py")
        for path in files:
            bad = sorted(m for m in edges(path) if not m.startswith(own)
                         and not any(m == a or m.startswith(a + ".") for a in allowed))
            if bad:
                offenders[path.relative_to(PKG).as_posix()] = bad
    assert not offenders, f"imports against the direction of the house: {offenders}"


def test_no_private_name_is_imported_across_files():
    offenders = [f"{path.relative_to(PKG).as_posix()}: {module}.{name}"
                 for path in PKG.rglob("*.py") for module, names in opsft_imports(path)
                 for name in names if name.startswith("_") and not name.startswith("__")]
    assert not offenders, offenders


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module in an import graph (Tarjan)."""
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles_lazy_imports_included():
    assert len(MODULES) >= 70
    graph = {m: edges(p) for m, p in MODULES.items()}
    assert "opsft.stages" in graph["opsft.realign.cycle"]  # a lazy import (inside a function) is an edge
    assert import_circles(graph) == []


def test_the_circle_check_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert import_circles(graph) == [["a", "b", "c"]]


def test_config_and_the_settings_vocabularies_do_not_import_torch():
    code = ("import sys, importlib\n"
            f"for n in {TORCH_FREE!r}: importlib.import_module(n)\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing config pulled in: {out.stdout[:200]}"
