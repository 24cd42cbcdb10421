"""The tuning ConfigMap: key ``training_config.yaml``, root ``training_config``, six sections.

Kaito's format, section by section, and the classes each section's keys are passed to:

==================  =========================================================
ModelConfig         ``from_pretrained`` keyword arguments (``ModelConfig`` below)
QuantizationConfig  ``transformers.BitsAndBytesConfig``
LoraConfig          ``peft.LoraConfig``
TrainingArguments   ``trl.SFTConfig`` (all of ``transformers.TrainingArguments`` too)
DataCollator        ``transformers.DataCollatorForLanguageModeling`` keys (Kaito's); we train with
                    TRL's own collator so prompt/assistant-only loss masks stay on
DatasetConfig       ``DatasetConfig`` below (Kaito's keys plus column mapping and format)
==================  =========================================================

Keys are checked against those classes without importing them: ``data/config_fields.json`` is a
snapshot of their fields and types, written by ``python -m kaito_tuning.spec.training_config --snapshot`` and
checked against the installed libraries by the tests. So the operator, which carries no torch,
validates ConfigMaps exactly as the tuner would load them.
"""

from __future__ import annotations

import difflib
import json
import posixpath
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml

from kaito_tuning.contract import (
    CONFIG_KEY,
    DEFAULT_OUTPUT_DIR,
    LABEL_TUNING_METHOD,
    MOUNT_ROOT,
    RESERVED_DIRS,
)
from kaito_tuning.errors import Problem, ValidationError

ROOT_KEY = "training_config"
SECTIONS = ("ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DataCollator", "DatasetConfig")
DATASET_FORMATS = ("auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt")


@dataclass
class ModelConfig:
    """Keyword arguments for loading the base model and tokenizer."""

    torch_dtype: str = "auto"  # auto: bfloat16 where the GPU has it, float16 on V100/T4, float32 on CPU
    dtype: str | None = None  # transformers 5 name of torch_dtype; either may be given
    local_files_only: bool = False
    device_map: Any = "auto"
    trust_remote_code: bool = False
    revision: str | None = None  # default: the preset's pinned revision
    attn_implementation: str | None = None  # default: sdpa (flex_attention with packing on GPUs)
    chat_template: str | None = None  # a Jinja template (inline) or a path to one
    low_cpu_mem_usage: bool = True
    pretrained_model_name_or_path: str | None = None  # default: the preset's weights


@dataclass
class DatasetConfig:
    """Where the data is and how to read it (Kaito's keys, which Kaito itself stopped reading; we honour them)."""

    dataset_path: str | None = None  # a file or folder under the input mount; default: every file there
    dataset_extension: str | None = None  # parquet, json, jsonl, csv; default: detected from content
    format: str = "auto"  # auto | messages | prompt_completion | text | alpaca | sharegpt
    messages_column: str | None = None  # default "messages" (or "conversations" for sharegpt)
    context_column: str | None = None  # prompt column for prompt/completion data (default "prompt")
    response_column: str | None = None  # completion column (default "completion")
    text_column: str | None = None  # plain-text column (default "text")
    shuffle_dataset: bool = True
    shuffle_seed: int = 42
    train_test_split: float = 1.0  # fraction used for training; the rest is the eval split
    max_rows: int | None = None  # use at most this many rows (after shuffling)


_DATA_COLLATOR_KEYS = {"mlm": "bool", "mlm_probability": "float", "pad_to_multiple_of": "int",
                       "return_tensors": "str", "seed": "int"}

# common misspellings → the real key (checked before difflib, which misses short names like r)
_ALIASES = {
    "LoraConfig": {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lora_r": "r",
                   "lora_rank": "r", "target_module": "target_modules", "modules": "target_modules"},
    "TrainingArguments": {"lr": "learning_rate", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
                          "batch_size": "per_device_train_batch_size", "max_seq_length": "max_length",
                          "seq_length": "max_length", "steps": "max_steps"},
    "QuantizationConfig": {"load_in_4bits": "load_in_4bit", "4bit": "load_in_4bit", "quant_type": "bnb_4bit_quant_type"},
}


# ------------------------------------------------------------------ field snapshot

def _kind(annotation: Any) -> str:
    """bool/int/float/str/list/dict/any, with '?' when None is allowed."""
    s = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    s = str(annotation) if not isinstance(annotation, str) and "[" in str(annotation) else s
    s = s.replace("typing.", "")
    optional = "None" in s or "Optional" in s
    core = s
    for w in ("Optional[", "Union["):
        if core.startswith(w):
            core = core[len(w):-1]
    parts = [x.strip() for x in core.replace("|", ",").split(",") if x.strip() and x.strip() != "None"]
    first = parts[0] if parts else "Any"
    if len(parts) > 1 and not all(p.split("[")[0] == first.split("[")[0] for p in parts):
        kind = "any"
    elif first.startswith(("list", "List", "tuple", "Tuple")):
        kind = "list"
    elif first.startswith(("dict", "Dict")):
        kind = "dict"
    else:
        kind = {"bool": "bool", "int": "int", "float": "float", "str": "str"}.get(first, "any")
    return kind + ("?" if optional and kind != "any" else "")


@cache
def snapshot() -> dict:
    return json.loads(resources.files("kaito_tuning.spec").joinpath("data/config_fields.json").read_text())


# ------------------------------------------------------------------ parsing and validation

@dataclass
class TuningConfig:
    """A parsed training_config: one plain dict per section, as the classes will receive them."""

    sections: dict[str, dict] = field(default_factory=dict)

    def section(self, name: str) -> dict:
        return dict(self.sections.get(name) or {})

    @property
    def output_dir(self) -> str:
        return resolve_output_dir(self.section("TrainingArguments").get("output_dir"))[0] or DEFAULT_OUTPUT_DIR

    @property
    def quantized(self) -> bool:
        q = self.section("QuantizationConfig")
        return bool(q.get("load_in_4bit") or q.get("load_in_8bit"))

    def dataset(self) -> DatasetConfig:
        return DatasetConfig(**self.section("DatasetConfig"))

    def model(self) -> ModelConfig:
        return ModelConfig(**self.section("ModelConfig"))

    def to_yaml(self) -> str:
        return yaml.safe_dump({ROOT_KEY: self.sections}, sort_keys=False)


def resolve_output_dir(value: Any) -> tuple[str | None, str | None]:
    """(absolute output dir under /mnt, problem). Relative paths are taken under /mnt, as Kaito does."""
    if value is None:
        return DEFAULT_OUTPUT_DIR, None
    if not isinstance(value, str) or not value.strip():
        return None, f"must be a directory path under {MOUNT_ROOT}, got {value!r}"
    path = posixpath.normpath(posixpath.join(MOUNT_ROOT, value))
    if not path.startswith(MOUNT_ROOT + "/"):
        return None, f"{value!r} resolves to {path}, outside {MOUNT_ROOT}; use a directory such as {DEFAULT_OUTPUT_DIR}"
    for reserved in RESERVED_DIRS:
        if path == reserved or path.startswith(reserved + "/"):
            return None, f"{value!r} is inside {reserved}, which holds inputs; use e.g. {DEFAULT_OUTPUT_DIR}"
    return path, None


_TYPE_OK = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, (list, str)),  # "a,b" is accepted for lists of names, as Kaito does
    "dict": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}
_TYPE_NAME = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
              "list": "a list", "dict": "a mapping"}


def parse_config(text: str, *, source: str = CONFIG_KEY, method: str | None = None) -> tuple[TuningConfig, list[Problem]]:
    """Parse training_config.yaml text; return the config and every problem (``Section.key: ...``)."""
    problems: list[Problem] = []
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return TuningConfig(), [Problem(source, f"is not valid YAML{where}: {getattr(e, 'problem', e)}")]
    if not isinstance(doc, dict) or ROOT_KEY not in doc:
        return TuningConfig(), [Problem(source, f"must be a mapping with the key {ROOT_KEY!r} holding the sections "
                                                f"{', '.join(SECTIONS)}")]
    extra = [k for k in doc if k != ROOT_KEY]
    if extra:
        problems.append(Problem(source, f"unknown top-level key(s) {', '.join(map(repr, extra))}; "
                                        f"only {ROOT_KEY!r} is read"))
    root = doc[ROOT_KEY] or {}
    if not isinstance(root, dict):
        return TuningConfig(), problems + [Problem(ROOT_KEY, "must be a mapping of sections")]
    return _check_sections(root, method, problems)


def _check_sections(root: dict, method: str | None, problems: list[Problem]) -> tuple[TuningConfig, list[Problem]]:
    fields = snapshot()
    sections: dict[str, dict] = {}
    for name, body in root.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(Problem(str(name), f"unknown section; {hint}sections are {', '.join(SECTIONS)}"))
            continue
        if body is None:
            body = {}
        if not isinstance(body, dict):
            problems.append(Problem(name, f"must be a mapping of keys, got {type(body).__name__}"))
            continue
        known = fields[name]
        clean = {}
        for key, value in body.items():
            path = f"{name}.{key}"
            if key not in known:
                alias = _ALIASES.get(name, {}).get(str(key).lower())
                close = [alias] if alias else difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
                hint = f"did you mean {close[0]!r}?" if close else f"see the fields of {_CLASS_NAMES[name]}"
                problems.append(Problem(path, f"unknown key for {_CLASS_NAMES[name]}; {hint}"))
                continue
            kind = known[key]
            if value is None:
                if kind.endswith("?") or kind == "any":
                    clean[key] = value
                else:
                    problems.append(Problem(path, f"must be {_TYPE_NAME[kind]}, got null"))
                continue
            base = kind.rstrip("?")
            if not _TYPE_OK[base](value):
                problems.append(Problem(path, f"must be {_TYPE_NAME[base]}, got {type(value).__name__} {value!r}"))
                continue
            clean[key] = value
        sections[name] = clean
    cfg = TuningConfig(sections)
    problems += _semantic(cfg, method, root)
    return cfg, problems


_CLASS_NAMES = {"ModelConfig": "ModelConfig (from_pretrained arguments)", "QuantizationConfig": "BitsAndBytesConfig",
                "LoraConfig": "peft.LoraConfig", "TrainingArguments": "trl.SFTConfig",
                "DataCollator": "DataCollatorForLanguageModeling", "DatasetConfig": "DatasetConfig"}


def _semantic(cfg: TuningConfig, method: str | None, raw: dict) -> list[Problem]:
    p: list[Problem] = []
    q = cfg.section("QuantizationConfig")
    four, eight = q.get("load_in_4bit") is True, q.get("load_in_8bit") is True
    if four and eight:
        p.append(Problem("QuantizationConfig", "load_in_4bit and load_in_8bit are both true; choose one"))
    if method == "qlora" and not (four or eight):
        p.append(Problem("QuantizationConfig.load_in_4bit",
                         "method qlora needs a quantized base: set load_in_4bit: true (or load_in_8bit: true)"))
    if method == "lora" and (four or eight):
        key = "load_in_4bit" if four else "load_in_8bit"
        p.append(Problem(f"QuantizationConfig.{key}", "method lora trains on an unquantized base: set it to false, "
                                                      "or use method qlora"))
    if q.get("bnb_4bit_quant_type") not in (None, "nf4", "fp4"):
        p.append(Problem("QuantizationConfig.bnb_4bit_quant_type", f"must be nf4 or fp4, got {q['bnb_4bit_quant_type']!r}"))
    t = raw.get("TrainingArguments") or {}
    if isinstance(t, dict) and "output_dir" in t:
        _, why = resolve_output_dir(t["output_dir"])
        if why:
            p.append(Problem("TrainingArguments.output_dir", why))
    d = cfg.section("DatasetConfig")
    split = d.get("train_test_split")
    if split is not None and not 0 < split <= 1:
        p.append(Problem("DatasetConfig.train_test_split", f"must be in (0, 1] (the fraction used for training), got {split}"))
    if d.get("format") not in (None, *DATASET_FORMATS):
        p.append(Problem("DatasetConfig.format", f"must be one of {', '.join(DATASET_FORMATS)}, got {d['format']!r}"))
    if d.get("dataset_path") is not None:
        path = posixpath.normpath(posixpath.join("/mnt/data", d["dataset_path"]))
        if not (path == "/mnt/data" or path.startswith("/mnt/data/")):
            p.append(Problem("DatasetConfig.dataset_path", f"{d['dataset_path']!r} leaves the input directory /mnt/data"))
    lora = cfg.section("LoraConfig")
    for k in ("r", "lora_alpha"):
        if k in lora and isinstance(lora[k], int) and lora[k] <= 0:
            p.append(Problem(f"LoraConfig.{k}", f"must be positive, got {lora[k]}"))
    ta = cfg.section("TrainingArguments")
    for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length"):
        if isinstance(ta.get(k), int) and ta[k] <= 0:
            p.append(Problem(f"TrainingArguments.{k}", f"must be positive, got {ta[k]}"))
    if isinstance(ta.get("learning_rate"), (int, float)) and not 0 < ta["learning_rate"] < 1:
        p.append(Problem("TrainingArguments.learning_rate", f"must be between 0 and 1, got {ta['learning_rate']}"))
    return p


@cache
def default_config_text(method: str) -> str:
    """The shipped default training_config.yaml for ``method`` (lora or qlora)."""
    return resources.files("kaito_tuning.spec").joinpath(f"data/{method}-params.yaml").read_text()


def default_configmap_name(method: str) -> str:
    return f"{method}-params-template"


def load_config(text: str | None, method: str, *, source: str = CONFIG_KEY) -> TuningConfig:
    """Parse and validate; raise ValidationError with every problem. None: the method's default."""
    cfg, problems = parse_config(default_config_text(method) if text is None else text, source=source, method=method)
    if problems:
        raise ValidationError(problems)
    return cfg


def configmap_manifest(method: str, namespace: str | None = None) -> dict:
    meta: dict = {"name": default_configmap_name(method),
                  "labels": {"app.kubernetes.io/part-of": "kaito-tuning", LABEL_TUNING_METHOD: method}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {CONFIG_KEY: default_config_text(method)}}
