"""Reading users' YAML: multi-document files and ConfigMap text, within budgets, with clear errors.

YAML is parsed with a budget (issue 11): at most ``MAX_YAML_BYTES`` of text, ``MAX_DEPTH`` levels
of nesting, and ``MAX_NODES`` values *after* alias expansion, so a few hundred bytes of
``&a [*a, *a, ...]`` cannot become gigabytes in whoever walks or prints the result. Integers longer
than ``MAX_INT_DIGITS`` digits and malformed ``!!int``/``!!float``/``!!bool`` values are errors at
their line, and so is a key given twice in one mapping (kubectl refuses it too; PyYAML would keep the
last silently); timestamps stay strings (as the Kubernetes API server's JSON form has them). Every
failure is a ``YamlError`` (a ``FileError`` for files): one short line, never a traceback.

``short(value)`` is how any message shows a user's value: bounded in size, whatever the value.
"""

from __future__ import annotations

import reprlib
import sys
from pathlib import Path
from typing import Any

import yaml

from kaito_tuning.errors import Problem, UserError

MAX_YAML_BYTES = 2 * 1024 * 1024  # a ConfigMap holds at most 1 MiB; a Workspace object is far smaller
MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_INT_DIGITS = 64
MAX_MESSAGE = 300


class FileError(UserError):
    """A file cannot be read or is not YAML (``validate`` exits 2 for these)."""

    reason = "InvalidFile"


class YamlError(FileError):
    """Text that is not YAML, or YAML beyond the budget."""


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 40


def short(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` of ``value``: nested values elided, long strings and numbers cut."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
            text = f"<an integer of {int(value.bit_length() * 0.30103) + 1} digits>"
        else:
            text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a value that cannot even be shown must not break the message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_PROBLEMS = 50


def bounded(problems: list[Problem]) -> list[Problem]:
    """At most MAX_PROBLEMS problems, each path and message clipped (a hostile input cannot make a huge report)."""
    out = [Problem(clip(p.path, 200), clip(p.message)) for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        out.append(Problem("", f"... and {len(problems) - MAX_PROBLEMS} more problems"))
    return out


class _BudgetLoader(yaml.SafeLoader):
    """SafeLoader with depth, expansion and integer budgets, and timestamps kept as strings."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        # a key given twice in one mapping: PyYAML keeps the last and drops the rest without a word (so does
        # the Go YAML Kaito's webhook reads ConfigMaps with); kubectl refuses a duplicate field. Keys merged in
        # with << may be overridden, as YAML says
        first: dict[tuple, Any] = {}
        for key, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            seen = first.setdefault((key.tag, key.value), key)
            if seen is not key:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short(key.value)} appears twice in one mapping (first at line "
                    f"{seen.start_mark.line + 1}): all but the last would be lost; keep one", key.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits; at most {MAX_INT_DIGITS} are read", node.start_mark)
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{short(node.value)} is not an integer", node.start_mark) from None

    def construct_yaml_float(self, node):
        if len(str(node.value)) > 400:
            raise yaml.constructor.ConstructorError(None, None, "a number longer than 400 characters",
                                                    node.start_mark)
        try:
            return super().construct_yaml_float(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{short(node.value)} is not a number", node.start_mark) from None

    def construct_yaml_bool(self, node):
        try:
            return super().construct_yaml_bool(node)
        except KeyError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{short(node.value)} is not true or false", node.start_mark) from None

    def construct_yaml_timestamp(self, node):
        return self.construct_scalar(node)


for _tag, _fn in (("tag:yaml.org,2002:int", _BudgetLoader.construct_yaml_int),
                  ("tag:yaml.org,2002:float", _BudgetLoader.construct_yaml_float),
                  ("tag:yaml.org,2002:bool", _BudgetLoader.construct_yaml_bool),
                  ("tag:yaml.org,2002:timestamp", _BudgetLoader.construct_yaml_timestamp)):
    _BudgetLoader.add_constructor(_tag, _fn)


def _check_expansion(node) -> None:
    """Refuse documents whose alias-expanded size exceeds MAX_NODES, or that refer to themselves."""
    if node is None:
        return
    sizes: dict[int, int] = {}
    active: set[int] = set()
    # iterative post-order walk; shared (aliased) nodes are sized once and counted at every use
    stack: list[tuple[Any, bool]] = [(node, False)]
    while stack:
        n, done = stack.pop()
        key = id(n)
        if done:
            active.discard(key)
            if isinstance(n, yaml.SequenceNode):
                kids = n.value
            else:
                kids = [x for pair in n.value for x in pair]
            total = 1 + sum(sizes[id(k)] for k in kids)
            if total > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"expands (through aliases) to more than {MAX_NODES:,} values", n.start_mark)
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if not isinstance(n, (yaml.SequenceNode, yaml.MappingNode)):
            sizes[key] = 1
            continue
        if key in active:
            raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it",
                                              n.start_mark)
        active.add(key)
        stack.append((n, True))
        kids = n.value if isinstance(n, yaml.SequenceNode) else [x for pair in n.value for x in pair]
        for k in kids:
            if id(k) in active:
                raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it",
                                                  k.start_mark)
            if id(k) not in sizes:
                stack.append((k, False))


def _yaml_error(e: BaseException) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if isinstance(e, yaml.reader.ReaderError):
        where = f"character {e.position + 1} (#x{e.character:04x}): " if isinstance(e.character, int) else ""
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
    return clip(f"{where}{problem}", 200)


def load_yaml_all(text: str) -> list[Any]:
    """Every document of ``text`` (None for empty ones), within the budget; raise YamlError."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlError(f"is {len(text):,} characters; at most {MAX_YAML_BYTES:,} are read")
    loader = None
    try:
        loader = _BudgetLoader(text)
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as e:
        raise YamlError(f"is not valid YAML: {_yaml_error(e)}") from None
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError, MemoryError) as e:
        raise YamlError(f"is not valid YAML: {clip(type(e).__name__ + ': ' + str(e)[:150], 200)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(text: str) -> Any:
    """The single document of ``text`` (None if empty), within the budget; raise YamlError."""
    docs = load_yaml_all(text)
    if len(docs) > 1:
        raise YamlError(f"holds {len(docs)} YAML documents; expected one")
    return docs[0] if docs else None


def load_documents(path: str | Path) -> list[dict]:
    """Every non-empty YAML document in ``path`` (``-`` is standard input)."""
    p = str(path)
    try:
        if p == "-":
            text = sys.stdin.read(MAX_YAML_BYTES + 1)
        else:
            with open(p, encoding="utf-8") as fh:
                text = fh.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise FileError("no such file", field=p) from None
    except IsADirectoryError:
        raise FileError("is a directory, not a YAML file", field=p) from None
    except UnicodeDecodeError:
        raise FileError("is not a text file (not UTF-8)", field=p) from None
    except OSError as e:
        raise FileError(f"cannot be read: {e.strerror}", field=p) from None
    try:
        docs = [d for d in load_yaml_all(text) if d is not None]
    except YamlError as e:
        raise FileError(e.message, field=p) from None
    if not docs:
        raise FileError("is empty: expected a Workspace (and optionally its ConfigMap)", field=p)
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise FileError(f"document {i + 1} is {_a(d)}, not a Kubernetes object", field=p)
    return docs


def _a(v: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number",
            bytes: "binary data"}.get(type(v), f"a {type(v).__name__}")


def split_documents(docs: list[dict]) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """(workspaces, configmaps by name, other objects)."""
    workspaces, configmaps, other = [], {}, []
    for d in docs:
        kind, api = d.get("kind"), d.get("apiVersion")
        if kind == "Workspace" or (isinstance(api, str) and api.startswith("kaito.sh/")):
            workspaces.append(d)
        elif kind == "ConfigMap":
            meta = d.get("metadata")
            name = meta.get("name", "") if isinstance(meta, dict) else ""
            configmaps[name if isinstance(name, str) else short(name)] = d
        else:
            other.append(d)
    return workspaces, configmaps, other
