"""A small dataclass-to-OpenAPI bridge: the one source of truth for the Workspace schema.

API types are plain dataclasses whose fields carry their JSON name and description (``spec``
below). From them we derive both

* the CRD's ``openAPIV3Schema`` (``openapi_schema``), written to ``crds/`` by
  ``kaito-tuning crd`` and checked by a test to be exactly what is generated, and
* the parser (``from_json``) that turns a user's YAML into typed objects and reports every
  structural problem with its field path (unknown fields, wrong types, missing required fields).

So the CRD, ``kubectl explain`` and the Python model cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from kaito_tuning.errors import Problem
from kaito_tuning.spec.files import clip, short

_SCHEMALESS = "x-kubernetes-preserve-unknown-fields"


def spec(doc: str, *, json: str | None = None, default: Any = dataclasses.MISSING, required: bool = False,
         enum: list | None = None, minimum: float | None = None, maximum: float | None = None,
         max_items: int | None = None, max_length: int | None = None, pattern: str | None = None,
         schemaless: bool = False, schema_default: Any = None, cel: list[dict] | None = None,
         extra: dict | None = None, schema_type: type | None = None, check: bool = True,
         versions: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its API description.

    ``default`` is the Python default (None for optional fields); ``schema_default`` is a default
    the API server applies (written into the CRD). ``extra``: more schema keys (``format``).
    ``schema_type``: a ``dict`` field kept as a plain mapping in Python whose schema (and, with
    ``check``, whose parsing) is that of the dataclass given. ``versions``: the API versions that
    have the field (default: all).
    """
    meta = {"doc": doc, "json": json, "required": required, "enum": enum, "minimum": minimum,
            "maximum": maximum, "max_items": max_items, "max_length": max_length, "pattern": pattern,
            "schemaless": schemaless, "schema_default": schema_default, "cel": cel, "extra": extra,
            "schema_type": schema_type, "check": check, "versions": versions}
    if default is dataclasses.MISSING:
        default = None
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def json_name(f: dataclasses.Field) -> str:
    return f.metadata.get("json") or _camel(f.name)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


# ---------------------------------------------------------------- schema generation

def openapi_schema(cls: type, overrides: dict | None = None, version: str | None = None) -> dict:
    """The OpenAPI v3 schema of dataclass ``cls`` as apiextensions.k8s.io/v1 accepts it.

    ``overrides`` maps dotted JSON paths (``resource.instanceType``) to extra schema keys, for the
    few places where API versions differ (v1alpha1 defaults ``instanceType``); fields declared for
    some ``versions`` only are left out of the others.
    """
    return _object_schema(cls, "", overrides or {}, version)


def _object_schema(cls: type, prefix: str, overrides: dict, version: str | None = None) -> dict:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if version and f.metadata.get("versions") and version not in f.metadata["versions"]:
            continue
        name = json_name(f)
        path = f"{prefix}.{name}" if prefix else name
        tp = f.metadata.get("schema_type") or hints[f.name]
        s = _type_schema(tp, {**f.metadata, "version": version}, path, overrides)
        s = {"description": f.metadata["doc"], **s}
        m = f.metadata
        for key, out in (("enum", "enum"), ("minimum", "minimum"), ("maximum", "maximum"),
                         ("max_items", "maxItems"), ("max_length", "maxLength"), ("pattern", "pattern")):
            if m.get(key) is not None:
                s[out] = m[key]
        if m.get("schema_default") is not None:
            s["default"] = m["schema_default"]
        if m.get("cel"):
            s["x-kubernetes-validations"] = m["cel"]
        if m.get("extra"):
            s.update(m["extra"])
        s.update(overrides.get(path, {}))
        props[name] = s
        if m.get("required"):
            required.append(name)
    out: dict = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    cel = getattr(cls, "__cel__", None)
    if cel:
        out["x-kubernetes-validations"] = cel
    return out


def _type_schema(tp: Any, meta: dict, path: str, overrides: dict) -> dict:
    tp = _unwrap_optional(tp)
    if meta.get("schemaless"):
        return {"type": "object", _SCHEMALESS: True}
    version = meta.get("version")
    if dataclasses.is_dataclass(tp):
        return _object_schema(tp, path, overrides, version)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(item, {"version": version}, path + "[]", overrides)}
    if origin is dict:
        _, value = typing.get_args(tp)
        return {"type": "object",
                "additionalProperties": _type_schema(value, {"version": version}, path + "{}", overrides)}
    return {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
            bool: {"type": "boolean"}}[tp]


# ---------------------------------------------------------------- parsing

def from_json(cls: type, obj: Any, path: str, problems: list[Problem]) -> Any:
    """Build ``cls`` from JSON-like ``obj``; append a Problem for everything that does not fit.

    Always returns an instance (fields that could not be read are left at their defaults), so
    semantic validation can go on and report all problems at once.
    """
    if not isinstance(obj, dict):
        problems.append(Problem(path, f"must be a mapping, got {_kind(obj)}"))
        obj = {}
    hints, by_json = _fields(cls)
    kwargs = {}
    for key, value in obj.items():
        label = clip(key, 60) if isinstance(key, str) else short(key, 60)
        sub = f"{path}.{label}" if path else label
        f = by_json.get(key) if isinstance(key, str) else None
        if f is None:
            close = [k for k in by_json if k.lower() == label.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known fields: {', '.join(sorted(by_json))}"
            problems.append(Problem(sub, f"unknown field{hint}"))
            continue
        if value is None:
            continue
        kwargs[f.name] = _value(hints[f.name], f.metadata, value, sub, problems)
    for name, f in by_json.items():
        if f.metadata.get("required") and f.name not in kwargs:
            sub = f"{path}.{name}" if path else name
            problems.append(Problem(sub, "is required"))
    kwargs = {k: v for k, v in kwargs.items() if v is not _BAD}
    return cls(**kwargs)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[dict, dict[str, dataclasses.Field]]:
    """(type hints, fields by JSON name) of a dataclass: resolved once per class, not per object parsed (the
    operator parses every workspace it reconciles; ``get_type_hints`` was a tenth of that)."""
    hints = typing.get_type_hints(cls)
    return hints, {json_name(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


_BAD = object()


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(v), type(v).__name__)


def _value(tp: Any, meta: dict, value: Any, path: str, problems: list[Problem]) -> Any:
    tp = _unwrap_optional(tp)
    if meta.get("schema_type") is not None:
        if not isinstance(value, dict):
            problems.append(Problem(path, f"must be a mapping, got {_kind(value)}"))
            return _BAD
        if meta.get("check"):
            return to_json(from_json(meta["schema_type"], value, path, problems))
        return value
    if meta.get("schemaless"):
        if not isinstance(value, dict):
            problems.append(Problem(path, f"must be a mapping, got {_kind(value)}"))
            return _BAD
        return value
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value, path, problems)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            problems.append(Problem(path, f"must be a list, got {_kind(value)}"))
            return _BAD
        (item,) = typing.get_args(tp)
        out = [_value(item, {}, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return [v for v in out if v is not _BAD]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(path, f"must be a mapping, got {_kind(value)}"))
            return _BAD
        _, vt = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                problems.append(Problem(f"{path}.{short(k, 60)}", f"keys must be strings, got {_kind(k)}"))
                continue
            out[k] = _value(vt, {}, v, f"{path}.{clip(k, 60)}", problems)
        return {k: v for k, v in out.items() if v is not _BAD}
    ok = {str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          bool: isinstance(value, bool)}[tp]
    if not ok:
        want = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]
        problems.append(Problem(path, f"must be {want}, got {_kind(value)} {short(value)}"))
        return _BAD
    if meta.get("enum") and value not in meta["enum"]:
        problems.append(Problem(path, f"must be one of {', '.join(map(str, meta['enum']))}, got {short(value)}"))
        return _BAD
    return value


def to_json(obj: Any) -> Any:
    """The JSON form of an API dataclass (None fields and empty collections dropped)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            v = to_json(getattr(obj, f.name))
            if v is None or v == [] or v == {}:
                continue
            out[json_name(f)] = v
        return out
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj
