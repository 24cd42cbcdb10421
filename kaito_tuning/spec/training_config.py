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
    DATA_DIR,
    DEFAULT_OUTPUT_DIR,
    LABEL_TUNING_METHOD,
    MOUNT_ROOT,
    RESERVED_DIRS,
    dataset_location,
    in_data_dir,
)
from kaito_tuning.errors import Problem, ValidationError
from kaito_tuning.spec.files import YamlError, bounded, clip, load_yaml, short

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
    # the rest of Kaito's ModelConfig (from_pretrained arguments), accepted so Kaito's ConfigMaps load as written
    cache_dir: str | None = None
    force_download: bool = False
    proxies: Any = None  # Kaito types it as a string; from_pretrained takes a mapping of scheme to proxy URL
    output_loading_info: bool = False
    state_dict: dict | None = None


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


#: DataCollatorForLanguageModeling fields a ConfigMap may not set (the tuner supplies the tokenizer)
DATA_COLLATOR_EXCLUDED = ("tokenizer",)

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
        return None, f"must be a directory path under {MOUNT_ROOT}, got {short(value)}"
    path = posixpath.normpath(posixpath.join(MOUNT_ROOT, value))
    if not path.startswith(MOUNT_ROOT + "/"):
        return None, (f"{short(value)} resolves to {clip(path, 80)}, outside {MOUNT_ROOT}; "
                      f"use a directory such as {DEFAULT_OUTPUT_DIR}")
    for reserved in RESERVED_DIRS:
        if path == reserved or path.startswith(reserved + "/"):
            return None, f"{short(value)} is inside {reserved}, which holds inputs; use e.g. {DEFAULT_OUTPUT_DIR}"
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
    if not isinstance(text, str):
        return TuningConfig(), [Problem(source, f"must be text (YAML), got {type(text).__name__}")]
    try:
        doc = load_yaml(text)
    except YamlError as e:
        return TuningConfig(), [Problem(source, e.message)]
    if not isinstance(doc, dict) or ROOT_KEY not in doc:
        return TuningConfig(), [Problem(source, f"must be a mapping with the key {ROOT_KEY!r} holding the sections "
                                                f"{', '.join(SECTIONS)}")]
    extra = [k for k in doc if k != ROOT_KEY]
    if extra:
        problems.append(Problem(source, f"unknown top-level key(s) {', '.join(short(k, 40) for k in extra[:5])}; "
                                        f"only {ROOT_KEY!r} is read"))
    root = doc[ROOT_KEY] or {}
    if not isinstance(root, dict):
        return TuningConfig(), problems + [Problem(ROOT_KEY, "must be a mapping of sections")]
    cfg, problems = _check_sections(root, method, problems)
    return cfg, bounded(problems)


def _check_sections(root: dict, method: str | None, problems: list[Problem]) -> tuple[TuningConfig, list[Problem]]:
    fields = snapshot()
    sections: dict[str, dict] = {}
    for name, body in root.items():
        if name not in SECTIONS:
            label = clip(str(name), 60) if isinstance(name, str) else short(name, 60)
            close = difflib.get_close_matches(label, SECTIONS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(Problem(label, f"unknown section; {hint}sections are {', '.join(SECTIONS)}"))
            continue
        if body is None:
            body = {}
        if not isinstance(body, dict):
            problems.append(Problem(name, f"must be a mapping of keys, got {type(body).__name__}"))
            continue
        known = fields[name]
        clean = {}
        for key, value in body.items():
            label = clip(str(key), 60) if isinstance(key, str) else short(key, 60)
            path = f"{name}.{label}"
            if not isinstance(key, str) or key not in known:
                alias = _ALIASES.get(name, {}).get(label.lower())
                close = [alias] if alias else difflib.get_close_matches(label, known, n=1, cutoff=0.75)
                hint = f"did you mean {close[0]!r}?" if close else f"see the fields of {_CLASS_NAMES[name]}"
                problems.append(Problem(path, f"unknown key for {_CLASS_NAMES[name]}; {hint}"))
                continue
            if (name, key) in _CREDENTIALS and value is not None:  # its value is never shown
                problems.append(Problem(path, _CREDENTIALS[name, key]))
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
                problems.append(Problem(path, f"must be {_TYPE_NAME[base]}, got {type(value).__name__} {short(value)}"))
                continue
            clean[key] = value
        sections[name] = clean
    cfg = TuningConfig(sections)
    problems += _semantic(cfg, method, root)
    return cfg, problems


#: keys whose value is a credential: refused (a ConfigMap is readable by whoever can read the namespace's
#: ConfigMaps, and is copied into the Job's volume), and never echoed in a message
_CREDENTIALS = {
    ("TrainingArguments", "hub_token"): "a credential does not belong in a ConfigMap (anyone who can read the "
    "namespace's ConfigMaps can read it; its value is not shown here); remove it: the adapter is pushed to "
    "tuning.output.image with tuning.output.imagePushSecret",
}

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
        p.append(Problem("QuantizationConfig.bnb_4bit_quant_type", f"must be nf4 or fp4, got {short(q['bnb_4bit_quant_type'])}"))
    if cfg.section("TrainingArguments").get("push_to_hub") is True:
        p.append(Problem("TrainingArguments.push_to_hub", "is not supported: the tuner has no Hugging Face Hub "
                         "credentials and the adapter is pushed to tuning.output.image (or written to "
                         "tuning.output.volumeSource); remove it or set it to false"))
    t = raw.get("TrainingArguments") or {}
    if isinstance(t, dict) and "output_dir" in t:
        _, why = resolve_output_dir(t["output_dir"])
        if why:
            p.append(Problem("TrainingArguments.output_dir", why))
    d = cfg.section("DatasetConfig")
    if d.get("format") not in (None, *DATASET_FORMATS):
        p.append(Problem("DatasetConfig.format", f"must be one of {', '.join(DATASET_FORMATS)}, got {short(d['format'])}"))
    if isinstance(d.get("dataset_path"), str) and in_data_dir(dataset_location(d["dataset_path"])) is None:
        # Kaito's meaning: relative to /mnt (``/data/x.parquet`` and ``data/x.parquet`` are /mnt/data/x.parquet)
        p.append(Problem("DatasetConfig.dataset_path",
                         f"{short(d['dataset_path'])} leaves the input directory {DATA_DIR} (the path is relative to "
                         f"{MOUNT_ROOT}, as in Kaito: write /data/<file>)"))
    p += _range_problems(cfg)
    dc = cfg.section("DataCollator")
    mask, rand = dc.get("mask_replace_prob", 0.8), dc.get("random_replace_prob", 0.1)
    if _number(mask) and _number(rand) and mask + rand > 1:
        p.append(Problem("DataCollator.mask_replace_prob", f"mask_replace_prob + random_replace_prob must be at most 1, "
                                                           f"got {_short_number(mask)} + {_short_number(rand)}"))
    return p


# Allowed ranges of numeric keys: (low, low inclusive, high, high inclusive); None is unbounded.
_POSITIVE = (0, False, None, False)
_NON_NEGATIVE = (0, True, None, False)
_FRACTION = (0, True, 1, False)     # [0, 1)
_PROBABILITY = (0, True, 1, True)  # [0, 1]
_RANGES: dict[str, dict[str, tuple]] = {
    "LoraConfig": {"r": _POSITIVE, "lora_alpha": _POSITIVE, "lora_dropout": _FRACTION, "qalora_group_size": _POSITIVE},
    "TrainingArguments": {
        "num_train_epochs": _POSITIVE, "learning_rate": (0, False, 1, False), "per_device_train_batch_size": _POSITIVE,
        "per_device_eval_batch_size": _POSITIVE, "gradient_accumulation_steps": _POSITIVE,
        "eval_accumulation_steps": _POSITIVE, "max_length": _POSITIVE, "warmup_steps": _NON_NEGATIVE,
        "weight_decay": _NON_NEGATIVE, "adam_beta1": _FRACTION, "adam_beta2": _FRACTION, "adam_epsilon": _POSITIVE,
        "max_grad_norm": _NON_NEGATIVE, "label_smoothing_factor": _FRACTION, "neftune_noise_alpha": _POSITIVE,
        "torch_empty_cache_steps": _POSITIVE, "logging_steps": _POSITIVE, "eval_steps": _POSITIVE,
        "eval_delay": _NON_NEGATIVE, "save_steps": _POSITIVE, "save_total_limit": _NON_NEGATIVE, "seed": _NON_NEGATIVE,
        "data_seed": _NON_NEGATIVE, "dataloader_num_workers": _NON_NEGATIVE, "dataloader_prefetch_factor": _POSITIVE,
        "ddp_timeout": _POSITIVE, "dataset_num_proc": _POSITIVE,
    },
    "DataCollator": {"mlm_probability": _PROBABILITY, "mask_replace_prob": _PROBABILITY,
                     "random_replace_prob": _PROBABILITY, "pad_to_multiple_of": _POSITIVE, "seed": _NON_NEGATIVE},
    "DatasetConfig": {"shuffle_seed": _NON_NEGATIVE, "max_rows": _POSITIVE, "train_test_split": (0, False, 1, True)},
    "QuantizationConfig": {"llm_int8_threshold": _POSITIVE},
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def range_text(bounds: tuple) -> str:
    """``> 0``, ``>= 0`` or ``in [0, 1)``."""
    lo, lo_in, hi, hi_in = bounds
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _in_range(v: float, bounds: tuple) -> bool:
    lo, lo_in, hi, hi_in = bounds
    ok_lo = v >= lo if lo_in else v > lo  # False for NaN
    ok_hi = hi is None or (v <= hi if hi_in else v < hi)
    return ok_lo and ok_hi and v == v


def _range_problems(cfg: TuningConfig) -> list[Problem]:
    p: list[Problem] = []
    for section, keys in _RANGES.items():
        values = cfg.section(section)
        for key, bounds in keys.items():
            v = values.get(key)
            if not _number(v):
                continue
            if section == "TrainingArguments" and key == "max_steps":
                continue
            if not _in_range(v, bounds):
                p.append(Problem(f"{section}.{key}", f"must be {range_text(bounds)}, got {_short_number(v)}"))
    steps = cfg.section("TrainingArguments").get("max_steps")
    if _number(steps) and steps != -1 and steps <= 0:
        p.append(Problem("TrainingArguments.max_steps",
                         f"must be > 0, or -1 to train for num_train_epochs, got {_short_number(steps)}"))
    return p


def _short_number(v: float) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if abs(v) < 10**30:
        return str(v)
    return f"an integer of {int(v.bit_length() * 0.30103) + 1} digits"


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
