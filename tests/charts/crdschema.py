"""Offline admission checks for the CRDs of the base chart.

The API server validates a custom resource with the CRD's structural OpenAPI schema, then its
CEL rules (``x-kubernetes-validations``); with strict field validation (kubectl's default) it
refuses unknown fields. Offline we do the same in two steps:

* the schema, converted to JSON Schema (unknown fields refused), checked by ``jsonschema``;
* every CEL rule where the object has a value, evaluated by ``cel-python``. It implements the
  CEL standard library, not the Kubernetes extension libraries (``url()``, ``quantity()``,
  ``isSorted()`` ...), which is why the CRDs use none of those; :func:`structural_problems`
  compiles every rule so a rule cel-python cannot read fails the tests instead of being skipped.

Kubernetes also enforces a CEL cost budget, which is not estimated here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import celpy
import jsonschema  # type: ignore[import-untyped]
from celpy.adapter import json_to_cel
from celpy.celtypes import BoolType

Schema = Mapping[str, Any]

_SCHEMA_KEYS = (
    "type", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "minItems",
    "maxItems", "minProperties", "maxProperties", "required", "format",
)  # fmt: skip
_TYPES = {"object", "array", "string", "integer", "number", "boolean"}
_CEL = celpy.Environment()


def crd_version_schema(crd: Mapping[str, Any], version: str) -> Schema:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: Schema = v["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


def to_jsonschema(node: Schema) -> dict[str, Any]:
    """A JSON Schema that accepts what the API server would, refusing unknown fields."""
    out: dict[str, Any] = {k: node[k] for k in _SCHEMA_KEYS if k in node and k != "format"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    else:
        for key in ("oneOf", "anyOf", "allOf"):
            if key in node:
                out[key] = [to_jsonschema(s) for s in node[key]]
    if "not" in node:
        out["not"] = to_jsonschema(node["not"])
    if "properties" in node:
        out["properties"] = {k: to_jsonschema(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = to_jsonschema(node["items"])
    if isinstance(node.get("additionalProperties"), Mapping):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"])
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def object_schema(node: Schema) -> dict[str, Any]:
    """The top-level schema, plus the fields every object has."""
    out = to_jsonschema(node)
    out.setdefault("properties", {})
    out["properties"] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        **out["properties"],
    }
    return out


def _children(node: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    for k, v in node.get("properties", {}).items():
        yield f"{path}.{k}", v
    if "items" in node:
        yield f"{path}[]", node["items"]
    if isinstance(node.get("additionalProperties"), Mapping):
        yield f"{path}{{}}", node["additionalProperties"]


def structural_problems(node: Schema, path: str = "") -> list[str]:
    """What would make the API server refuse the CRD: the structural-schema rules we rely on,
    and CEL rules that do not compile."""
    problems: list[str] = []
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    int_or_string = bool(node.get("x-kubernetes-int-or-string"))
    if not (int_or_string or preserve) and node.get("type") not in _TYPES:
        problems.append(f"{path or '.'}: no type (structural schemas need one at every level)")
    if "properties" in node and isinstance(node.get("additionalProperties"), Mapping):
        problems.append(f"{path}: both properties and additionalProperties")
    if "items" in node and not isinstance(node["items"], Mapping):
        problems.append(f"{path}: items must be one schema")
    for key in ("oneOf", "anyOf", "allOf"):
        for i, sub in enumerate(node.get(key, [])):
            problems += _junctor_problems(sub, f"{path}.{key}[{i}]", int_or_string)
    if "not" in node:
        problems += _junctor_problems(node["not"], f"{path}.not", False)
    for i, v in enumerate(node.get("x-kubernetes-validations", [])):
        if not v.get("message"):
            problems.append(f"{path}: CEL rule {i} has no message")
        try:
            _CEL.compile(v["rule"])
        except Exception as e:
            problems.append(f"{path}: CEL rule {v.get('rule')!r} does not compile: {e}")
    for child_path, child in _children(node, path):
        problems += structural_problems(child, child_path)
    return problems


def _junctor_problems(node: Schema, path: str, int_or_string: bool) -> list[str]:
    """Inside oneOf/anyOf/allOf/not only value validations may appear (no types, defaults or
    descriptions), except the int-or-string pattern."""
    problems = []
    for key in ("default", "description", "additionalProperties", "nullable"):
        if key in node:
            problems.append(f"{path}: {key} not allowed inside a logical junctor")
    if "type" in node and not int_or_string:
        problems.append(f"{path}: type not allowed inside a logical junctor")
    for key in ("oneOf", "anyOf", "allOf"):
        for i, sub in enumerate(node.get(key, [])):
            problems += _junctor_problems(sub, f"{path}.{key}[{i}]", False)
    return problems


def cel_failures(node: Schema, value: Any, path: str = "") -> list[str]:
    """Messages of the CEL rules ``value`` breaks, wherever it has a value under ``node``."""
    failures: list[str] = []
    for rule in node.get("x-kubernetes-validations", []):
        prog = _CEL.program(_CEL.compile(rule["rule"]))
        try:
            result: object = prog.evaluate({"self": json_to_cel(value)})
        except Exception as e:  # an evaluation error is a refusal too
            result = e
        # Anything but a true boolean (false, an error value, another type) is a refusal.
        if not (isinstance(result, BoolType) and bool(result)):
            failures.append(f"{path or '.'}: {rule['message']}")
    if isinstance(value, Mapping):
        props = node.get("properties", {})
        addl = node.get("additionalProperties")
        for k, v in value.items():
            if k in props:
                failures += cel_failures(props[k], v, f"{path}.{k}")
            elif isinstance(addl, Mapping):
                failures += cel_failures(addl, v, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for i, v in enumerate(value):
            failures += cel_failures(node["items"], v, f"{path}[{i}]")
    return failures


def admission_errors(crd: Mapping[str, Any], obj: Mapping[str, Any]) -> list[str]:
    """Why the API server would refuse ``obj`` (empty: it would be admitted)."""
    version = str(obj["apiVersion"]).rpartition("/")[2]
    schema = crd_version_schema(crd, version)
    validator = jsonschema.Draft202012Validator(object_schema(schema))
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '.'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    if errors:
        return errors  # CEL rules run only on objects that pass the schema, as in the API server
    return cel_failures(schema, obj)
