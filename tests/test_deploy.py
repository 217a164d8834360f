"""The cluster path, checked offline: every YAML under deploy/ parses; every Kubernetes manifest
there is valid against the schema the API server would use (the KubeRay v1.7.0 CRDs vendored in
tests/data/kuberay-1.7.0/, strictly: unknown fields are errors; tests/k8s_schema.py) and passes the
operator's own cheap checks; the Serve configs (deploy/serve_config.yaml and the RayService's
serveConfigV2) are valid for Ray's ServeDeploySchema with no unknown keys; entrypoints are real
`opsft` commands whose flags parse; Serve import paths import; Ray resources agree with container
resources; the realign config validates and fits the cluster it runs on; the cycle carries the
scoring service's admin key; images are the ones docker/ builds (the Dockerfiles themselves:
tests/test_images.py).

    .venv/bin/python -m pytest -q tests/test_deploy.py
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import re
import shlex
import warnings
import zoneinfo
from pathlib import Path

import pytest
import yaml
from k8s_schema import KUBERAY_CRDS, crd_schemas, operator_errors, validate

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


# ---------------------------------------------------------------------------- schemas (KubeRay 1.7 CRDs)


def k8s_manifests() -> list[tuple[str, dict]]:
    """Every Kubernetes object under deploy/: each YAML document with an apiVersion and a kind."""
    return [(name, doc) for name, doc in manifests() if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc]


def test_the_vendored_crds_are_kuberay_1_7_0():
    readme = (KUBERAY_CRDS / "README.md").read_text()
    assert "v1.7.0" in readme and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in readme
    assert "Apache License" in (KUBERAY_CRDS / "LICENSE").read_text()
    schemas = crd_schemas()
    for kind in ("RayCluster", "RayJob", "RayService", "RayCronJob"):
        assert ("ray.io/v1", kind) in schemas, kind
    # what tells 1.7 from 1.6: RayCronJob gained spec.timeZone (and RayService kept the dead fields)
    assert "timeZone" in schemas[("ray.io/v1", "RayCronJob")]["properties"]["spec"]["properties"]
    assert ("ray.io/v1alpha1", "RayCronJob") not in schemas  # RayCronJob is served as v1 only


def test_every_manifest_is_found():
    found = {(name, doc["kind"]) for name, doc in k8s_manifests()}
    assert {("rayservice.yaml", "RayService"), ("rayjob.yaml", "RayJob"), ("raycronjob.yaml", "RayCronJob"),
            ("realign_config.yaml", "ConfigMap")} <= found


@pytest.mark.parametrize("name, doc", k8s_manifests(),
                         ids=[f"{n}:{d['kind']}/{d.get('metadata', {}).get('name')}" for n, d in k8s_manifests()])
def test_every_manifest_is_valid_against_its_schema(name, doc):
    assert validate(doc) == [], f"{name}: {doc['kind']} is not valid against its KubeRay 1.7 / core schema"
    assert operator_errors(doc) == [], f"{name}: the KubeRay operator would refuse it"


def test_no_dead_rayservice_fields():
    for svc in by_kind("RayService"):  # "Deprecated: This field is not used anymore" in KubeRay 1.7
        assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(svc["spec"])


def the(kind: str) -> dict:
    (doc,) = by_kind(kind)
    return copy.deepcopy(doc)


def test_schema_rejects_unknown_fields():
    svc = the("RayService")
    svc["spec"]["concurrencyPolicy"] = "Forbid"
    svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["foo"] = 1
    svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"][0][
        "valueFrm"] = {}
    svc["metadata"]["labelz"] = {}
    assert sorted(validate(svc)) == sorted([
        "spec.concurrencyPolicy: unknown field",
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].foo: unknown field",
        "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].env[0].valueFrm: unknown field",
        "metadata.labelz: unknown field",
    ])
    cron = the("RayCronJob")
    cron["spec"]["concurrencyPolicy"] = "Forbid"  # a CronJob field RayCronJob does not have
    cron["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"] = {"labelz": {}}
    assert sorted(validate(cron)) == [
        "spec.concurrencyPolicy: unknown field",
        "spec.jobTemplate.rayClusterSpec.headGroupSpec.template.metadata.labelz: unknown field",
    ]


def test_schema_rejects_wrong_types():
    job = the("RayJob")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    workers["maxReplicas"] = "8"                       # integer
    workers["rayStartParams"]["num-gpus"] = 8          # map of strings
    workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 0.5  # int-or-string
    job["spec"]["shutdownAfterJobFinishes"] = "yes"    # a quoted "yes" is a string, not a boolean
    job["spec"]["backoffLimit"] = 2**31                # format int32
    where = "spec.rayClusterSpec.workerGroupSpecs[0]"
    assert sorted(validate(job)) == sorted([
        f"{where}.maxReplicas: must be of type integer, got string '8'",
        f"{where}.rayStartParams.num-gpus: must be of type string, got integer 8",
        f"{where}.template.spec.containers[0].resources.limits.cpu: must be an integer or a string, got number",
        "spec.shutdownAfterJobFinishes: must be of type boolean, got string 'yes'",
        "spec.backoffLimit: 2147483648 is out of range for int32",
    ])
    job = the("RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParams"] = None  # `rayStartParams:` left empty: the API server drops the field, fine
    head["template"]["spec"]["containers"][0]["name"] = None  # required: dropped, so missing
    head["template"]["spec"]["volumes"].append(None)  # a null list item is no volume
    where = "spec.rayClusterSpec.headGroupSpec.template.spec"
    assert sorted(validate(job)) == [
        f"{where}.containers[0].name: required field missing (null: the API server drops it)",
        f"{where}.volumes[3]: must be of type object, got null",
    ]


def test_schema_rejects_missing_required_fields():
    svc = the("RayService")
    del svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    del svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"][0][
        "valueFrom"]["secretKeyRef"]["key"]
    assert sorted(validate(svc)) == sorted([
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].name: required field missing",
        "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].env[0].valueFrom.secretKeyRef.key: "
        "required field missing",
    ])
    cron = the("RayCronJob")
    del cron["spec"]["schedule"]
    del cron["metadata"]["name"]
    assert sorted(validate(cron)) == ["metadata.name: required field missing", "spec.schedule: required field missing"]
    svc = the("RayService")
    del svc["spec"]["rayClusterConfig"]
    assert validate(svc) == ["spec.rayClusterConfig: required field missing"]


def test_schema_rejects_bad_enums_and_patterns():
    svc = the("RayService")
    svc["spec"]["rayClusterConfig"]["autoscalerOptions"] = {"upscalingMode": "Fast", "version": "v2"}
    svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"] = "8 GiB"
    upscaling, memory = sorted(validate(svc))
    assert upscaling == ("spec.rayClusterConfig.autoscalerOptions.upscalingMode: 'Fast' is not one of "
                         "['Default', 'Aggressive', 'Conservative']")
    assert memory.startswith("spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].resources.limits"
                             ".memory: '8 GiB' does not match '^(")  # the Quantity pattern
    svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] = "1/2"
    gpu = "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].resources.limits[\"nvidia.com/gpu\"]"
    assert [e for e in validate(svc) if e.startswith(gpu)][0].startswith(f"{gpu}: '1/2' does not match '^(")


def test_schema_rejects_duplicate_list_map_keys_with_defaults():
    svc = the("RayService")
    ports = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append({"containerPort": 8000, "protocol": "TCP", "name": "serve2"})  # protocol TCP is the default
    ports.append({"containerPort": 8000, "protocol": "UDP", "name": "serve3"})  # another key: fine
    where = "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].ports"
    assert validate(svc) == [
        f"{where}[{len(ports) - 2}]: duplicate entry {{'containerPort': 8000, 'protocol': 'TCP'}} (same key as [2])"]


def test_schema_knows_versions_and_kinds():
    job = the("RayJob")
    job["apiVersion"] = "ray.io/v2"
    assert validate(job) == ["<root>: no schema for RayJob ray.io/v2 (served: ['ray.io/v1', 'ray.io/v1alpha1'])"]
    cron = the("RayCronJob")
    cron["apiVersion"] = "ray.io/v1alpha1"
    assert validate(cron) == ["<root>: no schema for RayCronJob ray.io/v1alpha1 (served: ['ray.io/v1'])"]
    assert validate({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})[0].startswith(
        "<root>: no schema for Secret v1")
    cmap = the("ConfigMap")
    cmap["data"]["n"] = 3
    cmap["metadata"]["name"] = "Opsft_Config"
    assert sorted(validate(cmap)) == [
        "data.n: must be of type string, got integer 3",
        "metadata.name: 'Opsft_Config' is not a DNS-1123 subdomain (lower case, digits, '-', '.')",
    ]


def test_schema_rules_the_kuberay_crds_do_not_exercise():
    # x-kubernetes-preserve-unknown-fields, nullable, additionalProperties: false, oneOf: on a schema of our own
    # (the KubeRay CRDs have no preserve-unknown-fields, and nullable only under status)
    schema = {"type": "object", "properties": {
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"n": {"type": "integer"}}},
        "maybe": {"type": "string", "nullable": True},
        "maybes": {"type": "array", "items": {"type": "string", "nullable": True}},
        "strings": {"type": "array", "items": {"type": "string"}},
        "closed": {"type": "object", "additionalProperties": False, "properties": {"a": {"type": "string"}}},
        "bare": {"type": "object"},
        "one": {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 3}]},
        "when": {"type": "string", "format": "date-time"},
    }}
    assert validate({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"},
                     "free": {"anything": {"deep": 1}, "n": 2}, "maybe": None, "maybes": [None, "x"],
                     "closed": {"a": "b"}, "one": "ab", "when": "2026-01-02T03:04:05Z"}, schema) == []
    assert sorted(validate({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"},
                            "free": {"n": "2"}, "closed": {"b": 1}, "bare": {"k": "v"}, "one": "abc",
                            "strings": ["x", None],
                            "when": "2026-01-02 03:04"}, schema)) == [
        "bare.k: unknown field",  # an object schema without properties keeps nothing (the server prunes it)
        "closed.b: unknown field",
        "free.n: must be of type integer, got string '2'",
        "one: must match exactly one of oneOf (matches more than one)",
        "strings[1]: must be of type string, got null",
        "when: '2026-01-02 03:04' is not an RFC 3339 date-time",
    ]


def test_operator_checks():
    cron = the("RayCronJob")
    cron["spec"]["timeZone"] = "Europe/Parıs"
    cron["spec"]["schedule"] = "CRON_TZ=UTC 0 3 * * *"
    cron["metadata"]["name"] = "opsft-realign-every-night-at-three-utc"  # 38 > 36 characters
    assert operator_errors(cron) == [
        "metadata.name: RayCronJob names are at most 36 characters",
        "spec.schedule: TZ/CRON_TZ are not allowed in the schedule, use spec.timeZone",
        "spec.timeZone: unknown time zone 'Europe/Parıs'",
    ]
    svc = the("RayService")
    svc["spec"]["upgradeStrategy"]["type"] = "BlueGreen"
    svc["metadata"]["name"] = "9score"
    svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = 5
    assert operator_errors(svc) == [
        "metadata.name: '9score' is not a DNS-1035 label",
        "spec.upgradeStrategy.type: 'BlueGreen' is not one of ['NewClusterWithIncrementalUpgrade', 'NewCluster', "
        "'None']",
        "spec.rayClusterConfig.workerGroupSpecs[0]: minReplicas 5 > maxReplicas 4",
    ]
    assert validate(svc) == []  # none of these is a schema error: only the operator catches them


def test_the_api_keys_are_required_and_reach_every_scoring_pod():
    (svc,) = by_kind("RayService")
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert app["api_key_env"] == "OPSFT_API_KEY" and app["admin_key_env"] == "OPSFT_ADMIN_KEY"
    assert app["model_roots"] == ["/models"]
    for group, spec in groups(svc["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0].get("env", [])}
        for var, key in (("OPSFT_API_KEY", "token"), ("OPSFT_ADMIN_KEY", "admin-token")):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "opsft-api-key", "key": key}, f"{group}: {var}: from the Secret, not optional"


# ---------------------------------------------------------------------------- Serve configs (Ray's schema)


def serve_configs() -> list[tuple[str, dict]]:
    """deploy/serve_config.yaml and every RayService's serveConfigV2, parsed."""
    out = [(name, doc) for name, doc in manifests() if "applications" in doc and "kind" not in doc]
    out += [(f"{name}:{doc['metadata']['name']}.spec.serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"]))
            for name, doc in manifests() if doc.get("kind") == "RayService"]
    return out


def serve_config_errors(data: dict) -> list[str]:
    """Ray's ServeDeploySchema, strictly. Ray 2.60's deploy schema models (ServeDeploySchema,
    ServeApplicationSchema, HTTPOptionsSchema, DeploymentSchema, ...) ignore unknown keys on purpose
    (forward compatibility), so a misspelt option would be dropped without a word: every key of the
    input must be a field (or alias) of the model it was parsed into. Free-form dicts (args,
    runtime_env, user_config) are not the schema's business: args is ServeConfig's (test_serve_deploy)."""
    from pydantic import BaseModel, ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        parsed = ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    errors: list[str] = []

    def walk(model: BaseModel, raw: dict, path: str) -> None:
        names = {}
        for name, field in type(model).model_fields.items():
            for alias in (name, field.alias, field.validation_alias):
                if isinstance(alias, str):
                    names[alias] = name
        for key, value in raw.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in names:
                errors.append(f"{where}: unknown field")
                continue
            attr = getattr(model, names[key])
            if isinstance(attr, BaseModel) and isinstance(value, dict):
                walk(attr, value, where)
            elif isinstance(attr, (list, tuple)) and isinstance(value, list):
                for i, (item, raw_item) in enumerate(zip(attr, value, strict=False)):
                    if isinstance(item, BaseModel) and isinstance(raw_item, dict):
                        walk(item, raw_item, f"{where}[{i}]")

    walk(parsed, data, "")
    return errors


def test_serve_configs_are_valid_for_rays_schema_with_no_unknown_keys():
    configs = serve_configs()
    assert [where.split(":")[0] for where, _ in configs] == ["serve_config.yaml", "rayservice.yaml"]
    for where, data in configs:
        assert serve_config_errors(data) == [], where


def test_serve_config_and_serve_config_v2_are_the_same_application():
    (_, local), (_, served) = serve_configs()
    assert served["applications"] == local["applications"]  # args, runtime_env, route: every key, as written
    for key in ("proxy_location", "http_options"):
        assert served[key] == local[key], key


def test_serve_config_check_rejects_what_ray_would_ignore():
    (_, data), _ = serve_configs()
    bad = copy.deepcopy(data)
    bad["proxy_locaton"] = "HeadOnly"
    bad["http_options"]["hots"] = "0.0.0.0"
    bad["applications"][0]["import_pth"] = "x:y"
    bad["applications"][0]["deployments"] = [{"name": "Scorer", "max_ongoing_request": 3}]
    bad["logging_config"]["level"] = "INFO"  # LoggingConfig itself forbids extras: pydantic's own error
    assert serve_config_errors(bad) == ["logging_config.level: Extra inputs are not permitted"]
    del bad["logging_config"]["level"]
    assert sorted(serve_config_errors(bad)) == [
        "applications[0].deployments[0].max_ongoing_request: unknown field",
        "applications[0].import_pth: unknown field",
        "http_options.hots: unknown field",
        "proxy_locaton: unknown field",
    ]
    del bad["applications"][0]["import_path"]
    assert "applications.0.import_path: Field required" in serve_config_errors(bad)


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
    # KubeRay 1.7's RayCronJob reads the schedule in spec.timeZone (the other fields: the schema tests)
    assert zoneinfo.ZoneInfo(cron["spec"]["timeZone"]).key == "UTC"
    assert "TZ" not in cron["spec"]["schedule"]  # the operator refuses TZ=/CRON_TZ= in the schedule


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


def test_the_cycle_promotes_with_the_services_admin_key():
    import opsft.config

    job, text = realign_config_text()
    if "promote_api_key_env" not in opsft.config.RealignConfig.model_fields:
        pytest.skip("opsft.config.RealignConfig has no promote_api_key_env yet")
    var = opsft.config.RealignConfig.model_validate(yaml.safe_load(text)).promote_api_key_env
    (svc,) = by_kind("RayService")
    admin_var = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["admin_key_env"]
    svc_head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    admin_ref = next(e for e in svc_head["env"] if e["name"] == admin_var)["valueFrom"]["secretKeyRef"]
    for doc in by_kind("RayJob") + by_kind("RayCronJob"):
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in head.get("env", [])}
        assert var in env, f"{doc['kind']}: the cycle reads its promote token from ${var}, the head does not set it"
        assert env[var]["valueFrom"]["secretKeyRef"] == admin_ref, f"{doc['kind']}: not the service's admin key"
