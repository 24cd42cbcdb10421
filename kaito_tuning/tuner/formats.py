"""Input files → a ``datasets.Dataset`` in one of TRL's forms, validated row by row, shuffled and split.

The format of each file is detected from its columns (``DatasetConfig.format`` and the ``*_column``
keys override it):

==================  ===========================================  =================================
format              columns                                      becomes (TRL form)
==================  ===========================================  =================================
messages            ``messages``: [{role, content}, ...]         ``messages`` (conversational)
sharegpt            ``conversations``: [{from, value}, ...]      ``messages``
alpaca              ``instruction`` [+ ``input``/``context``]    ``messages`` (user, assistant)
                    + ``output``/``response``
prompt_completion   ``prompt`` + ``completion`` (strings or      ``prompt`` + ``completion``
                    message lists)
text                ``text``                                     ``text``
==================  ===========================================  =================================

A message's ``content`` may also be a list of OpenAI-style content parts: its ``{"type": "text", "text": ...}``
parts are joined end to end (as chat templates render them); any other part (an image) is refused, naming it.
An assistant turn that is only a tool call (``tool_calls``, no text) is refused saying so.

Every file is used; all of them must end up in the same TRL form. A parquet file of chat rows whose
messages are all valid stays in Arrow (checked column by column with pyarrow.compute); any other file, or
one with a bad row, goes through the row-by-row reader, whose errors name the rows.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from kaito_tuning.spec.files import short
from kaito_tuning.spec.training_config import DatasetConfig
from kaito_tuning.tuner.inputs import DataFile, DatasetInvalid

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
                  "observation": "tool"}
EXPECTED = ("messages (chat: list of {role, content}), prompt + completion, text, instruction + output "
            "(alpaca), conversations (sharegpt: list of {from, value})")
MAX_REPORTED = 5


@dataclass
class Splits:
    """The prepared data: train (and eval) datasets in one TRL form, and where they came from."""

    train: Any  # datasets.Dataset
    eval: Any | None
    form: str  # messages | prompt_completion | text
    formats: dict[str, str] = field(default_factory=dict)  # file name -> detected source format
    files: list[DataFile] = field(default_factory=list)
    key: str | None = None  # digest of the files and of how rows were selected: the same key, the same rows

    @property
    def digests(self) -> list[str]:
        return [f.sha256 for f in self.files]


# ------------------------------------------------------------------ reading files

def read_rows(f: DataFile) -> tuple[list[str], list[dict]]:
    """(columns, rows) of one file."""
    try:
        if f.kind == "parquet":
            return _read_parquet(f)
        if f.kind == "jsonl":
            return _read_jsonl(f)
        if f.kind == "json":
            return _read_json(f)
        if f.kind == "csv":
            with open(f.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                return list(reader.fieldnames or []), rows
    except UnicodeDecodeError as e:
        raise DatasetInvalid(f"is not UTF-8 text ({e.reason} at byte {e.start})", field=f.name) from None
    raise DatasetInvalid(f"unsupported file type {f.kind!r}", field=f.name)


def _read_parquet(f: DataFile):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f.path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DatasetInvalid(f"is not a readable parquet file ({e}); it may be truncated or corrupt: check the "
                             "source file and download it again", field=f.name) from None
    return table.column_names, table.to_pylist()


def _read_jsonl(f: DataFile):
    rows, columns = [], {}
    with open(f.path, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Windows editors) is not data
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DatasetInvalid(f"line {n} is not valid JSON ({e}); JSON lines files hold one object per line",
                                     field=f.name) from None
            if not isinstance(row, dict):
                raise DatasetInvalid(f"line {n} is not a JSON object (it is {short(row, 40)}); JSON lines files hold "
                                     "one object per line", field=f.name)
            columns.update(dict.fromkeys(row))
            rows.append(row)
    return list(columns), rows


def _read_json(f: DataFile):
    with open(f.path, encoding="utf-8-sig") as fh:
        try:
            doc = json.load(fh)
        except ValueError as e:
            raise DatasetInvalid(f"is not valid JSON ({e})", field=f.name) from None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) == 1:
            doc = lists[0]
        elif doc and all(isinstance(v, list) for v in doc.values()):  # columns: {"prompt": [...], ...}
            keys = list(doc)
            doc = [dict(zip(keys, vals)) for vals in zip(*doc.values())]
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise DatasetInvalid("must be a JSON array of objects (one per example)", field=f.name)
    columns: dict = {}
    for r in doc:
        columns.update(dict.fromkeys(r))
    return list(columns), doc


# ------------------------------------------------------------------ format detection

def detect_format(columns: list[str], cfg: DatasetConfig, where: str) -> tuple[str, dict[str, str]]:
    """(format, column mapping) for a file with these columns."""
    cols = set(columns)
    fmt = cfg.format or "auto"

    def need(*names: str) -> None:
        missing = [n for n in names if n not in cols]
        if missing:
            raise DatasetInvalid(f"format {fmt} needs column(s) {', '.join(missing)}, but the file has: "
                                 f"{', '.join(columns) or 'no columns'}; set the DatasetConfig *_column keys to "
                                 "the names used", field=where)

    if fmt == "auto":
        if cfg.messages_column:
            fmt = "messages"
        elif cfg.context_column or cfg.response_column:
            fmt = "prompt_completion"
        elif cfg.text_column:
            fmt = "text"
        elif "messages" in cols:
            fmt = "messages"
        elif "conversations" in cols:
            fmt = "sharegpt"
        elif {"prompt", "completion"} <= cols:
            fmt = "prompt_completion"
        elif "instruction" in cols and cols & {"output", "response"}:
            fmt = "alpaca"
        elif "text" in cols:
            fmt = "text"
        else:
            raise DatasetInvalid(f"has no usable columns: it has {', '.join(columns) or 'none'}; expected "
                                 f"{EXPECTED}, or set DatasetConfig.format and the *_column keys", field=where)
    if fmt in ("messages", "sharegpt"):
        col = cfg.messages_column or ("conversations" if fmt == "sharegpt" else "messages")
        if fmt == "messages" and col not in cols and not cfg.messages_column and "conversations" in cols:
            col = "conversations"
        need(col)
        return fmt, {"messages": col}
    if fmt == "prompt_completion":
        m = {"prompt": cfg.context_column or "prompt", "completion": cfg.response_column or "completion"}
        need(*m.values())
        return fmt, m
    if fmt == "text":
        m = {"text": cfg.text_column or "text"}
        need(m["text"])
        return fmt, m
    if fmt == "alpaca":
        m = {"instruction": "instruction",
             "input": next((c for c in ("input", "context") if c in cols), ""),
             "output": cfg.response_column or next((c for c in ("output", "response") if c in cols), "output")}
        need("instruction", m["output"])
        return fmt, m
    raise DatasetInvalid(f"unknown format {fmt!r}", field="DatasetConfig.format")


# ------------------------------------------------------------------ row conversion

class _RowErrors:
    def __init__(self, where: str):
        self.where, self.items, self.count = where, [], 0

    def add(self, row: int, message: str) -> None:
        self.count += 1
        if len(self.items) < MAX_REPORTED:
            self.items.append(f"row {row}: {message}")

    def raise_if_any(self) -> None:
        if self.count:
            more = f" (and {self.count - len(self.items)} more)" if self.count > len(self.items) else ""
            raise DatasetInvalid("; ".join(self.items) + more, field=self.where)


def _messages(value: Any, path: str, sharegpt: bool) -> tuple[list[dict] | None, str | None]:
    """Validate one conversation; (messages, None) or (None, problem)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells hold JSON text
        except ValueError:
            return None, f"{path} is a string, not a list of messages"
    if not isinstance(value, list) or not value:
        return None, f"{path} must be a non-empty list of messages, got {type(value).__name__}"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return None, f"{path}[{i}] is a {type(m).__name__}, not a {{role, content}} object"
        role_key, content_key = ("from", "value") if sharegpt and "from" in m else ("role", "content")
        role, content = m.get(role_key), m.get(content_key)
        role_n = SHAREGPT_ROLES.get(str(role).lower()) if role_key == "from" else (role if role in ROLES else None)
        if role_n is None:
            allowed = ", ".join(SHAREGPT_ROLES) if role_key == "from" else ", ".join(ROLES)
            return None, f"{path}[{i}].{role_key} is {role!r}; allowed: {allowed}"
        content, problem = _content_text(content, f"{path}[{i}].{content_key}", role_n, m)
        if problem:
            return None, problem
        out.append({"role": role_n, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return None, f"{path} has no assistant message: there is nothing to learn"
    return out, None


def _content_text(content: Any, path: str, role: str, message: dict) -> tuple[str | None, str | None]:
    """A message's text: a string, or (as the OpenAI chat format allows) a list of content parts, of which only
    ``{"type": "text", "text": ...}`` parts can be trained on here; they are joined as chat templates render
    them, end to end. (text, None) or (None, problem)."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                return None, (f"{path}[{j}] is a {short(kind, 40)} part; only text parts "
                              '({"type": "text", "text": ...}) can be trained on')
            texts.append(part["text"])
        content = "".join(texts)
    if isinstance(content, str) and content.strip():
        return content, None
    if message.get("tool_calls") or message.get("function_call"):
        return None, (f"{path} is empty: the {role} message is a tool call (tool_calls), which is not trained on "
                      "here; give it text content or leave the tool-call turns out")
    return None, f"{path} is empty ({role} message); every message needs text"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def convert_rows(rows: list[dict], fmt: str, cols: dict[str, str], where: str) -> tuple[str, list[dict]]:
    """(TRL form, rows in that form); DatasetInvalid listing the first bad rows."""
    errors = _RowErrors(where)
    out: list[dict] = []
    if fmt in ("messages", "sharegpt"):
        form = "messages"
        for n, row in enumerate(rows):
            msgs, why = _messages(row.get(cols["messages"]), cols["messages"], sharegpt=fmt == "sharegpt")
            errors.add(n, why) if why else out.append({"messages": msgs})
    elif fmt == "alpaca":
        form = "messages"
        for n, row in enumerate(rows):
            instr, answer = _text(row.get(cols["instruction"])), _text(row.get(cols["output"]))
            extra = _text(row.get(cols["input"])) if cols["input"] else None
            if instr is None or answer is None:
                errors.add(n, f"{'instruction' if instr is None else cols['output']} is empty")
                continue
            prompt = f"{instr}\n\n{extra}" if extra else instr
            out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    elif fmt == "prompt_completion":
        form = "prompt_completion"
        kinds = set()
        for n, row in enumerate(rows):
            p, c = row.get(cols["prompt"]), row.get(cols["completion"])
            if isinstance(p, (list, str)) and isinstance(c, list) or isinstance(p, list):
                pm, why = _prompt_messages(p, cols["prompt"])
                cm, why2 = _messages(c, cols["completion"], sharegpt=False)
                if why or why2:
                    errors.add(n, why or why2)
                    continue
                kinds.add("conversational")
                out.append({"prompt": pm, "completion": cm})
            elif _text(p) is None or _text(c) is None:
                errors.add(n, f"{cols['prompt'] if _text(p) is None else cols['completion']} is empty or not text")
            else:
                kinds.add("text")
                out.append({"prompt": p, "completion": c})
        if len(kinds) > 1:
            errors.add(0, "mixes plain-text and message-list prompts/completions; use one kind per dataset")
    else:
        form = "text"
        for n, row in enumerate(rows):
            t = _text(row.get(cols["text"]))
            errors.add(n, f"{cols['text']} is empty or not text") if t is None else out.append({"text": t})
    errors.raise_if_any()
    return form, out


def _prompt_messages(value: Any, path: str) -> tuple[list[dict] | None, str | None]:
    if isinstance(value, str):
        return ([{"role": "user", "content": value}], None) if value.strip() else (None, f"{path} is empty")
    if not isinstance(value, list) or not value:
        return None, f"{path} must be a non-empty list of messages"
    msgs = []
    for i, m in enumerate(value):
        role, content = (m or {}).get("role"), (m or {}).get("content")
        if role not in ROLES:
            return None, f"{path}[{i}].role is {role!r}; allowed: {', '.join(ROLES)}"
        content, problem = _content_text(content, f"{path}[{i}].content", role, m or {})
        if problem:
            return None, problem
        msgs.append({"role": role, "content": content})
    return msgs, None


# ------------------------------------------------------------------ chat parquet, in Arrow

def _arrow_messages(f: DataFile, cfg: DatasetConfig):
    """The file's messages as an Arrow table with one ``messages`` column of {role, content} structs, when it is
    a parquet file of chat rows that are all valid; else None (the row-by-row reader takes it, and names the
    bad rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if f.kind != "parquet" or cfg.format not in ("auto", "messages"):
        return None
    try:
        schema = pq.read_schema(f.path)
        fmt, mapping = detect_format(schema.names, cfg, f.name)
    except (pa.ArrowInvalid, OSError, DatasetInvalid):
        return None
    if fmt != "messages":
        return None
    col = schema.field(mapping["messages"]).type
    if not pa.types.is_list(col) and not pa.types.is_large_list(col):
        return None
    item = col.value_type
    if not pa.types.is_struct(item) or {item.field(i).name for i in range(item.num_fields)} < {"role", "content"}:
        return None
    if not all(pa.types.is_string(item.field(n).type) or pa.types.is_large_string(item.field(n).type)
               for n in ("role", "content")):
        return None
    try:
        msgs = pq.read_table(f.path, columns=[mapping["messages"]]).column(0).combine_chunks()
    except (pa.ArrowInvalid, OSError):
        return None
    if len(msgs) == 0 or msgs.null_count or not pc.all(pc.greater(pc.list_value_length(msgs), 0)).as_py():
        return None
    flat = msgs.flatten()
    if flat.null_count:
        return None
    role, content = flat.field("role"), flat.field("content")
    if role.null_count or content.null_count or not pc.all(pc.is_in(role, pa.array(ROLES))).as_py():
        return None
    if not pc.all(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(content)), 0)).as_py():
        return None
    parents = pc.list_parent_indices(msgs)
    with_assistant = pc.unique(pc.filter(parents, pc.equal(role, "assistant")))
    if len(with_assistant) != len(msgs):
        return None
    item = pa.struct([("role", pa.string()), ("content", pa.string())])
    values = pa.StructArray.from_arrays([role.cast(pa.string()), content.cast(pa.string())], fields=list(item))
    return pa.table({"messages": pa.ListArray.from_arrays(msgs.offsets, values)})


# ------------------------------------------------------------------ the whole step

def prepare(files: list[DataFile], cfg: DatasetConfig | None = None) -> Splits:
    """Read, detect, validate and convert every file; shuffle, cap and split."""
    import pyarrow as pa
    from datasets import Dataset

    cfg = cfg or DatasetConfig()
    if not files:
        raise DatasetInvalid("no input files", field="tuning.input")
    tables: list = []
    forms: dict[str, str] = {}
    formats: dict[str, str] = {}
    for f in files:
        table = _arrow_messages(f, cfg)
        if table is not None:
            formats[f.name], forms[f.name] = "messages", "messages"
            tables.append(table)
            log.info("%s: %d rows, format messages", f.name, table.num_rows)
            continue
        columns, raw = read_rows(f)
        if not raw:
            raise DatasetInvalid(f"has zero rows (columns: {', '.join(columns) or 'none'}); every input file must "
                                 "hold at least one example", field=f.name)
        fmt, mapping = detect_format(columns, cfg, f.name)
        form, converted = convert_rows(raw, fmt, mapping, f.name)
        formats[f.name], forms[f.name] = fmt, form
        tables.append(converted)
        log.info("%s: %d rows, format %s", f.name, len(converted), fmt)
    if len(set(forms.values())) > 1:
        desc = ", ".join(f"{n}: {formats[n]}" for n in forms)
        raise DatasetInvalid(f"the input files hold different formats ({desc}); they must all be chat "
                             "(messages/sharegpt/alpaca), all prompt/completion or all text", field="tuning.input")
    form = next(iter(forms.values()))
    key = rows_key(files, cfg)
    if all(isinstance(t, pa.Table) for t in tables):  # the rows' key as fingerprint: no hash of the whole table
        ds = Dataset(pa.concat_tables(tables), fingerprint=key[:32])
    else:
        ds = Dataset.from_list([r for t in tables for r in (t.to_pylist() if isinstance(t, pa.Table) else t)])
    if cfg.shuffle_dataset:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    if cfg.max_rows:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    train, eval_ = split(ds, cfg.train_test_split)
    return Splits(train=train, eval=eval_, form=form, formats=formats, files=list(files), key=key)


#: bump when the rows made of the same files and settings change
ROWS_VERSION = 1


def rows_key(files: list[DataFile], cfg: DatasetConfig) -> str:
    """The same files (by digest, in order) read with the same DatasetConfig give the same rows."""
    doc = {"version": ROWS_VERSION, "files": [f.sha256 for f in files], "config": dataclasses.asdict(cfg)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def split(ds, train_fraction: float):
    """(train, eval or None): ``train_fraction`` of the rows for training, at least one row each side."""
    n = len(ds)
    if train_fraction >= 1 or n < 2:
        return ds, None
    n_eval = min(n - 1, max(1, round(n * (1 - train_fraction))))
    return ds.select(range(n - n_eval)), ds.select(range(n - n_eval, n))
