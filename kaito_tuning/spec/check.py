"""``kaito-tuning validate FILE...``: every Workspace (and the ConfigMaps they name) in YAML files.

Exit 0 when all is valid; 1 with one line per problem (``FILE: field.path: message``); 2 when a
file cannot be read or is not YAML.
"""

from __future__ import annotations

import argparse
import sys

from kaito_tuning.errors import Problem
from kaito_tuning.spec.files import FileError, bounded, clip, load_documents, split_documents
from kaito_tuning.spec.rules import validate_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, parse_config
from kaito_tuning.spec.workspace import parse_workspace


def check_documents(docs: list[dict], *, allow_private_urls: bool = True) -> list[Problem]:
    """Problems of every object among ``docs`` (as parsed YAML).

    Workspaces get every rule; ConfigMaps named by a tuning workspace, or holding
    ``training_config.yaml``, are checked as training configs; every other Kubernetes object
    (PersistentVolumeClaims, Secrets, ...) is checked against the Kubernetes schema, strictly, and
    kinds that schema does not know (other CRDs) are passed over.
    """
    problems: list[Problem] = []
    workspaces, configmaps, other = split_documents(docs)
    methods_for: dict[str, str | None] = {}
    multi = len(workspaces) > 1
    for i, obj in enumerate(workspaces):
        ws, found = parse_workspace(obj)
        found += validate_workspace(ws, allow_private_urls=allow_private_urls)
        name = ws.name if isinstance(ws.name, str) else ""
        prefix = f"Workspace {clip(name, 63) or i + 1}: " if multi else ""
        problems += [Problem(f"{prefix}{p.path}" if p.path else prefix.rstrip(": "), p.message) for p in found]
        if ws.tuning and ws.tuning.config:
            methods_for[ws.tuning.config] = ws.tuning.method
    for name, cm in configmaps.items():
        data = cm.get("data")
        if name in methods_for or (isinstance(data, dict) and CONFIG_KEY in data):
            problems += check_configmap(cm, methods_for.get(name))
        else:
            problems += check_kubernetes_object(cm)
    for obj in other:
        problems += check_kubernetes_object(obj)
    return bounded(problems)


def _object_label(obj: dict) -> str:
    kind, meta = obj.get("kind"), obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    kind = clip(kind, 60) if isinstance(kind, str) else "object"
    return f"{kind} {clip(name, 63)}" if isinstance(name, str) and name else kind


def check_kubernetes_object(obj: dict, version: str | None = None) -> list[Problem]:
    """``obj`` against the Kubernetes OpenAPI schema (kubernetes-validate, strict); [] for kinds it does not know."""
    import kubernetes_validate

    where = _object_label(obj)
    if not isinstance(obj.get("apiVersion"), str) or not isinstance(obj.get("kind"), str):
        return [Problem(where, "is not a Kubernetes object: apiVersion and kind must be strings")]
    try:
        kubernetes_validate.validate(obj, version or kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return []  # a kind the Kubernetes schema does not have (another operator's CRD): not ours to judge
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(x) for x in getattr(e, "path", ()) or ())
        return [Problem(f"{where}: {clip(path, 120)}" if path else where, clip(e.message, 240))]
    except (kubernetes_validate.InvalidSchemaError, TypeError, ValueError, KeyError, AttributeError) as e:
        return [Problem(where, f"cannot be checked against the Kubernetes schema ({type(e).__name__})")]
    return []


def check_configmap(cm: dict, method: str | None) -> list[Problem]:
    where = _object_label(cm)
    data = cm.get("data")
    if not isinstance(data, dict):
        return [Problem(f"{where}: data", f"must be a mapping holding {CONFIG_KEY!r}")]
    if CONFIG_KEY not in data:
        keys = ", ".join(clip(k, 40) for k in list(data)[:10] if isinstance(k, str))
        return [Problem(where, f"has no key {CONFIG_KEY!r} under data (keys: {keys or 'none'})")]
    _, problems = parse_config(data[CONFIG_KEY], method=method if method in ("lora", "qlora") else None)
    return [Problem(f"{where}: {p.path}", p.message) for p in problems]


def main(args: argparse.Namespace) -> int:
    rc = 0
    for path in args.files:
        try:
            docs = load_documents(path)
        except FileError as e:
            print(f"{path}: {e.message}", file=sys.stderr)
            rc = 2
            continue
        problems = check_documents(docs, allow_private_urls=not args.deny_private_urls)
        for p in problems:
            print(f"{path}: {p}")
        if problems and rc == 0:
            rc = 1
        elif not problems:
            print(f"{path}: valid", file=sys.stderr)
    return rc
