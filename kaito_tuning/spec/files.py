"""Reading users' YAML files: multi-document, with clear errors for unreadable or non-YAML files."""

from __future__ import annotations

from pathlib import Path

import yaml

from kaito_tuning.errors import UserError


class FileError(UserError):
    """A file cannot be read or is not YAML (``validate`` exits 2 for these)."""

    reason = "InvalidFile"


def load_documents(path: str | Path) -> list[dict]:
    """Every non-empty YAML document in ``path`` (``-`` is standard input)."""
    import sys

    p = str(path)
    try:
        text = sys.stdin.read() if p == "-" else Path(p).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileError("no such file", field=p) from None
    except IsADirectoryError:
        raise FileError("is a directory, not a YAML file", field=p) from None
    except UnicodeDecodeError:
        raise FileError("is not a text file (not UTF-8)", field=p) from None
    except OSError as e:
        raise FileError(f"cannot be read: {e.strerror}", field=p) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise FileError(f"is not valid YAML: {where}{getattr(e, 'problem', None) or e}", field=p) from None
    if not docs:
        raise FileError("is empty: expected a Workspace (and optionally its ConfigMap)", field=p)
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise FileError(f"document {i + 1} is a {type(d).__name__}, not a Kubernetes object", field=p)
    return docs


def split_documents(docs: list[dict]) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """(workspaces, configmaps by name, other objects)."""
    workspaces, configmaps, other = [], {}, []
    for d in docs:
        kind, api = d.get("kind"), str(d.get("apiVersion", ""))
        if kind == "Workspace" or api.startswith("kaito.sh/"):
            workspaces.append(d)
        elif kind == "ConfigMap":
            configmaps[(d.get("metadata") or {}).get("name", "")] = d
        else:
            other.append(d)
    return workspaces, configmaps, other
