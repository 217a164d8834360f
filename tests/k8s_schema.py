"""Strict offline validation of Kubernetes manifests against the schemas the API server uses.

    from k8s_schema import validate
    validate(doc)        # [] or ["spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].foo: unknown field"]

What `kubectl apply --validate=strict` (server-side field validation Strict) would say about a
custom resource, without a cluster: the manifest is checked against the `openAPIV3Schema` of the
CRD version its `apiVersion`/`kind` name (tests/data/kuberay-1.7.0/, the KubeRay v1.7.0 CRDs; a
version the CRD does not serve is an error). The rules are those of Kubernetes structural schemas:

- unknown fields are errors, except below `x-kubernetes-preserve-unknown-fields: true` or where
  `additionalProperties` allows them; an object schema with neither properties nor
  additionalProperties has no known fields (the API server prunes everything there);
- `type` (a YAML float is not an integer, a bool is not a number), `x-kubernetes-int-or-string`,
  `nullable`: a field whose value is null and whose schema is not nullable is dropped, as the API
  server drops it (`metadata:` with nothing after it is fine), so it counts as absent; a null list
  item is a type error;
- `required` (a required field with a schema `default` is not missing: defaulting runs first; a
  dropped null is missing),
  `enum`, `items`, `additionalProperties`, `allOf`/`anyOf`/`oneOf`/`not`;
- `pattern`, `minLength`/`maxLength`, `minimum`/`maximum` (and exclusive), `multipleOf`,
  `minItems`/`maxItems`, `uniqueItems`, `minProperties`/`maxProperties`;
- `format`: int32 and int64 ranges, date-time (RFC 3339), byte (base64);
- `x-kubernetes-list-type`: `set` items unique, `map` items unique by `x-kubernetes-list-map-keys`
  (absent keys take their schema default, as the API server defaults them first);
- the resource's own `metadata`, which CRDs leave as `type: object` and the API server checks
  itself: the ObjectMeta fields, labels/annotations as string maps, a name (or generateName) that is
  a DNS-1123 subdomain.

Not checked (they need CEL or a cluster): `x-kubernetes-validations` rules, admission webhooks,
and what only the operator checks at reconcile time (see `operator_errors` for the KubeRay
checks that are cheap to repeat here). Core kinds have a hand-written schema in BUILTIN (only
ConfigMap so far); any other kind without a schema is an error, so a new kind must bring one.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import zoneinfo
from functools import cache
from pathlib import Path

import yaml

KUBERAY_CRDS = Path(__file__).resolve().parent / "data" / "kuberay-1.7.0"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# k8s.io/apimachinery/pkg/apis/meta/v1 ObjectMeta, as a structural schema (server-set fields included:
# they are known fields, the server ignores or overwrites them).
OBJECT_META: dict = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63},
        "selfLink": {"type": "string"},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string", "format": "date-time", "nullable": True},
        "deletionTimestamp": {"type": "string", "format": "date-time"},
        "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "ownerReferences": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"],
                            "items": {"type": "object", "required": ["apiVersion", "kind", "name", "uid"],
                                      "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                     "name": {"type": "string"}, "uid": {"type": "string"},
                                                     "controller": {"type": "boolean"},
                                                     "blockOwnerDeletion": {"type": "boolean"}}}},
        "finalizers": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
        "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    },
}
_TYPE_META = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}}

# Core kinds the manifests use, from the Kubernetes API reference (core/v1).
BUILTIN: dict[tuple[str, str], dict] = {
    ("v1", "ConfigMap"): {
        "type": "object",
        "properties": {**_TYPE_META, "metadata": {"type": "object"}, "data": _STRING_MAP,
                       "binaryData": {"type": "object", "additionalProperties": {"type": "string", "format": "byte"}},
                       "immutable": {"type": "boolean"}},
    },
}

# KubeRay v1.7.0 ray-operator/controllers/ray/utils/constant.go: Max*NameLength
_RAY_NAME_LIMITS = {"RayCluster": 53, "RayService": 47, "RayJob": 47, "RayCronJob": 36}
# KubeRay v1.7.0 ray-operator/apis/ray/v1/rayservice_types.go: RayServiceUpgradeType (no enum in the CRD)
_RAYSERVICE_UPGRADES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")


@cache
def crd_schemas(folder: Path = KUBERAY_CRDS) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def schema_for(api_version: str, kind: str) -> dict | None:
    return BUILTIN.get((api_version, kind)) or crd_schemas().get((api_version, kind))


def validate(doc: dict, schema: dict | None = None) -> list[str]:
    """Every schema error in one manifest, as "path: message" (an empty list: it is valid)."""
    if not isinstance(doc, dict):
        return [f"<root>: a manifest must be a mapping, got {_typename(doc)}"]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not (isinstance(api_version, str) and isinstance(kind, str)):
        return ["<root>: apiVersion and kind (strings) are required"]
    if schema is None:
        schema = schema_for(api_version, kind)
        if schema is None:
            served = sorted(v for v, k in list(crd_schemas()) + list(BUILTIN) if k == kind)
            return [f"<root>: no schema for {kind} {api_version} (served: {served or 'none: unknown kind'})"]
    root = {**schema, "properties": {**schema.get("properties", {}), **_TYPE_META, "metadata": OBJECT_META}}
    errors: list[str] = []
    _check(doc, root, "", errors)
    meta = doc.get("metadata")
    if isinstance(meta, dict):
        name = meta.get("name")
        if not name and not meta.get("generateName"):
            errors.append("metadata.name: required field missing")
        elif isinstance(name, str) and name and not _DNS1123_SUBDOMAIN.fullmatch(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain (lower case, digits, '-', '.')")
    else:
        errors.append("metadata: required field missing")
    return errors


def operator_errors(doc: dict) -> list[str]:
    """What the KubeRay v1.7.0 operator itself refuses (utils/validation.go) that is cheap to check
    here: names (DNS-1035 label, length limits), a RayCronJob's schedule and time zone, a RayService's
    upgradeStrategy.type, worker groups with minReplicas > maxReplicas."""
    errors = []
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name") or ""
    if kind in _RAY_NAME_LIMITS:
        if len(name) > _RAY_NAME_LIMITS[kind]:
            errors.append(f"metadata.name: {kind} names are at most {_RAY_NAME_LIMITS[kind]} characters")
        if not _DNS1035_LABEL.fullmatch(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    spec = doc.get("spec") or {}
    if kind == "RayCronJob":
        if "TZ" in str(spec.get("schedule", "")):
            errors.append("spec.schedule: TZ/CRON_TZ are not allowed in the schedule, use spec.timeZone")
        if "timeZone" in spec:
            try:
                zoneinfo.ZoneInfo(str(spec["timeZone"]))
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                errors.append(f"spec.timeZone: unknown time zone {spec['timeZone']!r}")
    if kind == "RayService":
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade is not None and upgrade not in _RAYSERVICE_UPGRADES:
            errors.append(f"spec.upgradeStrategy.type: {upgrade!r} is not one of {list(_RAYSERVICE_UPGRADES)}")
    template = spec.get("jobTemplate") or {}
    clusters = {"RayCluster": ("spec", spec), "RayJob": ("spec.rayClusterSpec", spec.get("rayClusterSpec")),
                "RayService": ("spec.rayClusterConfig", spec.get("rayClusterConfig")),
                "RayCronJob": ("spec.jobTemplate.rayClusterSpec", template.get("rayClusterSpec"))}
    where, cluster = clusters.get(kind, ("", None))
    for i, group in enumerate((cluster or {}).get("workerGroupSpecs") or []):
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            errors.append(f"{where}.workerGroupSpecs[{i}]: minReplicas {lo} > maxReplicas {hi}")
    return errors


# ---------------------------------------------------------------------------- the schema walk


def _typename(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": _is_int,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


@cache
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _check(value, s: dict, path: str, errors: list[str]) -> None:
    where = path or "<root>"
    if value is None:
        if not s.get("nullable"):
            errors.append(f"{where}: must be of type {s.get('type', 'integer or string')}, got null")
        return
    if isinstance(value, (dt.date, dt.datetime)):  # an unquoted YAML timestamp: kubectl sends it as a string
        value = value.isoformat()
    if s.get("x-kubernetes-int-or-string"):
        if not (_is_int(value) or isinstance(value, str)):
            errors.append(f"{where}: must be an integer or a string, got {_typename(value)}")
            return
    elif "type" in s and not _TYPES[s["type"]](value):
        errors.append(f"{where}: must be of type {s['type']}, got {_typename(value)} {value!r}"[:300])
        return

    for sub in s.get("allOf", []):
        _check(value, sub, path, errors)
    for key, lo, hi in (("anyOf", 1, None), ("oneOf", 1, 1)):
        if key in s:
            results = [_sub_errors(value, sub, path) for sub in s[key]]
            passed = sum(not r for r in results)
            if passed < lo or (hi is not None and passed > hi):
                detail = "; ".join(r[0] for r in results if r) or "matches more than one"
                errors.append(f"{where}: must match {'exactly' if hi else 'at least'} one of {key} ({detail})")
    if "not" in s and not _sub_errors(value, s["not"], path):
        errors.append(f"{where}: must not match the schema under `not`")
    if "enum" in s and value not in s["enum"]:
        errors.append(f"{where}: {value!r} is not one of {s['enum']}")

    if isinstance(value, str):
        _check_string(value, s, where, errors)
    elif _TYPES["number"](value):
        _check_number(value, s, where, errors)
    elif isinstance(value, list):
        _check_array(value, s, path, errors)
    elif isinstance(value, dict):
        _check_object(value, s, path, errors)


def _sub_errors(value, s: dict, path: str) -> list[str]:
    out: list[str] = []
    _check(value, s, path, out)
    return out


def _check_string(value: str, s: dict, where: str, errors: list[str]) -> None:
    if "pattern" in s and not _regex(s["pattern"]).search(value):
        errors.append(f"{where}: {value!r} does not match {s['pattern']!r}")
    if len(value) < s.get("minLength", 0):
        errors.append(f"{where}: shorter than {s['minLength']} characters")
    if "maxLength" in s and len(value) > s["maxLength"]:
        errors.append(f"{where}: longer than {s['maxLength']} characters")
    fmt = s.get("format")
    if fmt == "date-time" and not _DATE_TIME.fullmatch(value):
        errors.append(f"{where}: {value!r} is not an RFC 3339 date-time")
    elif fmt == "byte":
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            errors.append(f"{where}: not base64")


def _check_number(value, s: dict, where: str, errors: list[str]) -> None:
    if s.get("format") in _RANGES and _is_int(value):
        lo, hi = _RANGES[s["format"]]
        if not lo <= value <= hi:
            errors.append(f"{where}: {value} is out of range for {s['format']}")
    if "minimum" in s and (value < s["minimum"] or (s.get("exclusiveMinimum") and value == s["minimum"])):
        errors.append(f"{where}: {value} is below the minimum {s['minimum']}")
    if "maximum" in s and (value > s["maximum"] or (s.get("exclusiveMaximum") and value == s["maximum"])):
        errors.append(f"{where}: {value} is above the maximum {s['maximum']}")
    if s.get("multipleOf") and value % s["multipleOf"]:
        errors.append(f"{where}: {value} is not a multiple of {s['multipleOf']}")


def _check_array(value: list, s: dict, path: str, errors: list[str]) -> None:
    where = path or "<root>"
    if len(value) < s.get("minItems", 0):
        errors.append(f"{where}: fewer than {s['minItems']} items")
    if "maxItems" in s and len(value) > s["maxItems"]:
        errors.append(f"{where}: more than {s['maxItems']} items")
    items = s.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            _check(item, items, _join(path, i), errors)
    list_type = s.get("x-kubernetes-list-type")
    if list_type == "map":
        names = s.get("x-kubernetes-list-map-keys", [])
        props = (items or {}).get("properties", {})
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            if isinstance(item, dict):
                key = {n: item.get(n, props.get(n, {}).get("default")) for n in names}
                text = json.dumps(key, sort_keys=True, default=str)
                if text in seen:
                    errors.append(f"{_join(path, i)}: duplicate entry {key} (same key as [{seen[text]}])")
                seen.setdefault(text, i)
    elif list_type == "set" or s.get("uniqueItems"):
        seen = {}
        for i, item in enumerate(value):
            text = json.dumps(item, sort_keys=True, default=str)
            if text in seen:
                errors.append(f"{_join(path, i)}: duplicate of [{seen[text]}]")
            seen.setdefault(text, i)


def _check_object(value: dict, s: dict, path: str, errors: list[str]) -> None:
    where = path or "<root>"
    props = s.get("properties") or {}
    extra = s.get("additionalProperties")
    open_ = s.get("x-kubernetes-preserve-unknown-fields") is True or extra is True
    embedded = s.get("x-kubernetes-embedded-resource") is True
    for key, item in value.items():
        if not isinstance(key, str):
            errors.append(f"{where}: field name {key!r} is not a string (quote it)")
            continue
        sub = _join(path, key)
        if key in props:
            if item is not None or props[key].get("nullable"):  # a non-nullable null is dropped
                _check(item, props[key], sub, errors)
        elif isinstance(extra, dict):
            if item is not None or extra.get("nullable"):
                _check(item, extra, sub, errors)
        elif embedded and key in ("apiVersion", "kind", "metadata"):
            _check(item, OBJECT_META if key == "metadata" else {"type": "string"}, sub, errors)
        elif not open_:
            errors.append(f"{sub}: unknown field")
    for key in s.get("required", []):
        sub = props.get(key, {})
        if "default" in sub:
            continue
        if key not in value:
            errors.append(f"{_join(path, key)}: required field missing")
        elif value[key] is None and not sub.get("nullable"):
            errors.append(f"{_join(path, key)}: required field missing (null: the API server drops it)")
    if len(value) < s.get("minProperties", 0):
        errors.append(f"{where}: fewer than {s['minProperties']} fields")
    if "maxProperties" in s and len(value) > s["maxProperties"]:
        errors.append(f"{where}: more than {s['maxProperties']} fields")
