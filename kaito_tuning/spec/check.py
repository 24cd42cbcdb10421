"""``kaito-tuning validate FILE...``: every Workspace (and the ConfigMaps they name) in YAML files.

Exit 0 when all is valid; 1 with one line per problem (``FILE: field.path: message``); 2 when a
file cannot be read or is not YAML.
"""

from __future__ import annotations

import argparse
import sys

from kaito_tuning.errors import Problem
from kaito_tuning.spec.files import FileError, load_documents, split_documents
from kaito_tuning.spec.rules import validate_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, parse_config
from kaito_tuning.spec.workspace import parse_workspace


def check_documents(docs: list[dict], *, allow_private_urls: bool = True) -> list[Problem]:
    """Problems of every Workspace and ConfigMap among ``docs`` (as parsed YAML)."""
    problems: list[Problem] = []
    workspaces, configmaps, other = split_documents(docs)
    methods_for: dict[str, str | None] = {}
    multi = len(workspaces) > 1
    for i, obj in enumerate(workspaces):
        ws, found = parse_workspace(obj)
        found += validate_workspace(ws, allow_private_urls=allow_private_urls)
        prefix = f"Workspace {ws.name or i + 1}: " if multi else ""
        problems += [Problem(f"{prefix}{p.path}" if p.path else prefix.rstrip(": "), p.message) for p in found]
        if ws.tuning and ws.tuning.config:
            methods_for[ws.tuning.config] = ws.tuning.method
    for name, cm in configmaps.items():
        problems += check_configmap(cm, methods_for.get(name))
    for obj in other:
        problems.append(Problem(f"{obj.get('kind', '?')} {(obj.get('metadata') or {}).get('name', '')}".strip(),
                                "is neither a Workspace nor a ConfigMap; not validated"))
    if not workspaces and not configmaps:
        problems.append(Problem("", "holds no Workspace or ConfigMap"))
    return problems


def check_configmap(cm: dict, method: str | None) -> list[Problem]:
    name = (cm.get("metadata") or {}).get("name", "")
    where = f"ConfigMap {name}"
    data = cm.get("data") or {}
    if CONFIG_KEY not in data:
        return [Problem(where, f"has no key {CONFIG_KEY!r} under data (keys: {', '.join(data) or 'none'})")]
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
