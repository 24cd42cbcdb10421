"""Serve a preset model with its LoRA adapters: ``/chat``, ``/v1/chat/completions``, ``/v1/models``, ``/health``.

Kaito's transformers runtime merges every adapter into one ("combined_adapter") and serves the base
model's name. Here each adapter stays a model of its own, chosen per request by ``model``; the base
model is always served too, under the preset's name. peft keeps all adapters loaded and
``set_adapter``/``disable_adapter`` switch between them under a lock (generation is serial).

Before anything is loaded, every adapter is checked against the base model: its
``adapter_config.json`` (``base_model_name_or_path``), its ``training_metadata.json`` (the preset it
was tuned from) and the shape of each LoRA tensor against the module it patches. A mismatch is
refused with one line that says which adapter and why, never a stack trace from inside peft.

``strength`` ("0.0".."1.0", Kaito's field) scales the adapter's LoRA update: 0 gives the base
model's behaviour, 1 the adapter as trained.

``/chat`` (Kaito's route, which knows no ``model``) answers with the first adapter when there is one,
as Kaito's server answers with its merged adapter; ``"model"`` in its payload picks another.

Adapters come from ``--adapter IMAGE_OR_DIR[=STRENGTH]`` (a directory, or an OCI image pulled with
:func:`kaito_tuning.artifacts.oci.pull_adapter`) or, in a Kaito pod, from ``--adapters-dir /mnt/adapter``: one
subdirectory per adapter, its strength in the environment variable named like the adapter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kaito_tuning.artifacts import reference as imageref
from kaito_tuning.errors import Problem, UserError, ValidationError
from kaito_tuning.spec.presets import DEFAULT_PRESET, Preset
from kaito_tuning.spec.rules import strength_problem
from kaito_tuning.spec.workspace import MAX_ADAPTERS

log = logging.getLogger(__name__)

from kaito_tuning.contract import ADAPTER_CONFIG, METADATA_FILE  # noqa: E402

#: requests larger than this are refused before they are read (413)
MAX_BODY_BYTES = 4 << 20
#: a prompt (or all messages together) may have at most this many characters (400)
MAX_PROMPT_CHARS = 32 << 10
#: the most tokens one request may generate
MAX_NEW_TOKENS = 2048
DEFAULT_MAX_NEW_TOKENS = 128
#: Kaito's generate_kwargs that we honour in /chat
_GENERATE_KWARGS = ("max_new_tokens", "max_length", "temperature", "top_p", "top_k", "do_sample",
                    "repetition_penalty")


class AdapterMismatch(UserError):
    reason = "AdapterMismatch"


class AdapterNotFound(UserError):
    reason = "AdapterNotFound"


# ---------------------------------------------------------------------------------------------
# adapters: what was asked for, fetched into directories, checked against the base model


@dataclass
class Adapter:
    """One adapter to serve: its model name, where it comes from and how strongly it applies."""

    name: str
    source: str  # the directory or image as given
    strength: float = 1.0
    image: str | None = None  # set when source is an image reference
    path: Path | None = None  # the adapter directory (after pulling, for images)
    field: str = "--adapter"

    @property
    def config(self) -> dict:
        return _read_json(self.path / ADAPTER_CONFIG, self.field)

    @property
    def metadata(self) -> dict:
        meta = self.path / METADATA_FILE
        return _read_json(meta, self.field) if meta.is_file() else {}


def _read_json(path: Path, field: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}", field=field, reason="AdapterInvalid") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object", field=field, reason="AdapterInvalid")
    return data


def _has_registry(text: str) -> bool:
    """True for ``host[:port]/repo[:tag]`` references (an explicit registry), not ``dir/sub``."""
    first, sep, _ = text.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def parse_adapter_args(values: list[str]) -> list[Adapter]:
    """``IMAGE_OR_DIR[=STRENGTH]`` arguments → adapters; every problem reported at once, nothing fetched."""
    problems: list[Problem] = []
    if len(values) > MAX_ADAPTERS:
        problems.append(Problem("--adapter", f"{len(values)} adapters given; at most {MAX_ADAPTERS} can be served"))
    adapters: list[Adapter] = []
    for i, value in enumerate(values):
        where = f"--adapter[{i}]"
        source, strength = value, None
        if "=" in value and not Path(value).expanduser().exists():  # a directory may have "=" in its name
            source, _, strength = value.rpartition("=")
        if (msg := strength_problem(strength)):
            problems.append(Problem(where, f"strength {msg}"))
            continue
        a = Adapter(name="", source=source, strength=float(strength) if strength is not None else 1.0, field=where)
        expanded = Path(source).expanduser()
        if expanded.is_dir():
            a.path = expanded.resolve()
            a.name = a.path.name
        elif expanded.exists():
            problems.append(Problem(where, f"{source} is a file; give the adapter's directory (with {ADAPTER_CONFIG})"))
            continue
        elif _has_registry(source) or source.startswith("docker.io/"):
            try:
                ref = imageref.parse(source)
            except imageref.InvalidReference as e:
                problems.append(Problem(where, str(e)))
                continue
            a.image = source
            a.name = ref.repository.rsplit("/", 1)[-1]
        else:
            problems.append(Problem(where, f"{source!r} is neither an existing directory nor an image reference "
                                           "with a registry (registry/repository:tag)"))
            continue
        adapters.append(a)
    seen: dict[str, str] = {}
    for a in adapters:
        if a.name in seen:
            problems.append(Problem(a.field, f"two adapters are named {a.name!r} ({seen[a.name]} and {a.source}); "
                                             "each adapter is served under its directory or repository name, "
                                             "so rename one"))
        seen[a.name] = a.source
    if problems:
        raise ValidationError(problems)
    return adapters


def adapter_args_in_dir(root: str | os.PathLike, environ: dict | None = None) -> list[str]:
    """Kaito's pod layout as ``DIR[=STRENGTH]`` arguments: ``/mnt/adapter/<name>/adapter_config.json``,
    the strength in the environment variable named like the adapter (default 1.0)."""
    environ = os.environ if environ is None else environ
    base = Path(root)
    if not base.is_dir():
        raise AdapterNotFound(f"{root} is not a directory", field="--adapters-dir")
    values = []
    for d in sorted(p for p in base.iterdir() if (p / ADAPTER_CONFIG).is_file()):
        strength = environ.get(d.name)
        values.append(f"{d}={strength}" if strength is not None else str(d))
    return values


def fetch_adapters(adapters: list[Adapter], workdir: Path, *, auth_file: str | None = None,
                   plain_http: bool = False) -> None:
    """Pull every image adapter into ``workdir/<name>``; directories are used where they are."""
    from kaito_tuning.artifacts.oci import pull_adapter
    from kaito_tuning.errors import KaitoError

    for a in adapters:
        if a.image is None:
            if not (a.path / ADAPTER_CONFIG).is_file():
                raise AdapterNotFound(f"{a.path} has no {ADAPTER_CONFIG}; is it an adapter directory?", field=a.field)
            continue
        dest = workdir / a.name
        log.info("pulling adapter %s from %s", a.name, a.image)
        try:
            pull_adapter(a.image, dest, auth_file=auth_file, plain_http=plain_http)
        except KaitoError as e:
            e.field = e.field or a.field
            raise
        a.path = dest


def _hub_id(value: str) -> bool:
    """``org/name`` that is not a local path: a Hugging Face repo id we can compare with the preset's."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value)) and not Path(value).exists()


def check_trained_for(adapter: Adapter, preset: Preset) -> None:
    """Refuse an adapter whose files say it was trained for another base model (before loading any weights)."""
    cfg = adapter.config
    what = f"adapter {adapter.name!r} ({adapter.source})"
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterMismatch(f"{what} is a {peft_type} adapter; only LoRA adapters can be served", field=adapter.field)
    ours = {preset.repo.lower(), preset.name.lower()}
    base = str(cfg.get("base_model_name_or_path") or "")
    if base and _hub_id(base) and base.lower() not in ours:
        raise AdapterMismatch(f"{what} was trained for {base}, but this server runs {preset.repo} "
                              f"(preset {preset.name}); serve it with its own base model", field=adapter.field)
    meta_preset = str(adapter.metadata.get("preset") or "")
    if meta_preset and meta_preset.lower() not in ours:
        raise AdapterMismatch(f"{what} was tuned from preset {meta_preset}, but this server runs preset "
                              f"{preset.name}; serve it with --preset {meta_preset}", field=adapter.field)


def check_shapes(adapter: Adapter, preset: Preset, model) -> None:
    """Refuse an adapter whose LoRA tensors do not fit ``model``'s modules (what names cannot tell)."""
    what = f"adapter {adapter.name!r} ({adapter.source})"
    for key, shape in _tensor_shapes(adapter.path).items():
        problem = _shape_problem(model, key, shape)
        if problem:
            raise AdapterMismatch(f"{what} does not fit {preset.name}: {problem}; it was trained for another "
                                  "base model", field=adapter.field)


def _tensor_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    binary = adapter_dir / "adapter_model.bin"
    if binary.is_file():
        import torch

        return {k: tuple(v.shape) for k, v in torch.load(binary, map_location="meta", weights_only=True).items()}
    raise AdapterNotFound(f"{adapter_dir} has no adapter_model.safetensors", field="--adapter")


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector)(?:\.[\w-]+)?(?:\.weight)?$")


def _shape_problem(model, key: str, shape: tuple[int, ...]) -> str | None:
    """Why the saved tensor ``key`` cannot patch ``model``, or None."""
    m = _LORA_KEY.match(key)
    if m is None:  # modules_to_save: a full copy of a module's weight (base_model.model.lm_head.weight)
        path, _, param = key.removeprefix("base_model.model.").rpartition(".")
        try:
            target = model.get_parameter(f"{path}.{param}") if path else None
        except AttributeError:
            return f"it saves {key}, but the model has no parameter {path}.{param}"
        if target is not None and tuple(target.shape) != shape:
            return f"{path}.{param} has shape {tuple(target.shape)} but the adapter's is {shape}"
        return None
    module_path, part = m.group("module"), m.group("part")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return f"it patches {module_path}, which the model does not have"
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if in_f is None and hasattr(module, "num_embeddings"):
        in_f, out_f = module.num_embeddings, module.embedding_dim
    if in_f is None or len(shape) != 2:
        return None
    if part == "lora_A" and shape[1] != in_f:
        return f"{module_path} takes {in_f} inputs but the adapter's lora_A has shape {shape}"
    if part == "lora_B" and shape[0] != out_f:
        return f"{module_path} gives {out_f} outputs but the adapter's lora_B has shape {shape}"
    if part == "lora_embedding_A" and shape[1] != in_f:
        return f"{module_path} has {in_f} embeddings but the adapter's lora_embedding_A has shape {shape}"
    return None


# ---------------------------------------------------------------------------------------------
# the engine: one base model, its adapters, serial generation


class RequestError(Exception):
    """A request we refuse: HTTP status, the field at fault and what to do."""

    def __init__(self, status: int, message: str, *, field: str | None = None, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.code = status, message, field, code

    def to_dict(self) -> dict:
        text = f"{self.field}: {self.message}" if self.field else self.message
        return {"error": {"message": text, "type": self.code, "param": self.field, "code": self.status}}


@dataclass
class Generation:
    """What a request asks of the model, validated."""

    messages: list[dict]
    model: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_length: int | None = None  # Kaito's generate_kwargs.max_length: prompt + answer
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float | None = None


@dataclass
class Completion:
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


@dataclass
class Engine:
    """A base model with its adapters loaded as named peft adapters."""

    model: Any
    tokenizer: Any
    base_name: str
    base_aliases: tuple[str, ...] = ()
    adapters: list[Adapter] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def names(self) -> list[str]:
        return [self.base_name] + [a.name for a in self.adapters]

    @property
    def default_model(self) -> str:
        """Kaito's /chat answers with the attached adapter: the first one, else the base model."""
        return self.adapters[0].name if self.adapters else self.base_name

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def resolve(self, name: str | None) -> str:
        if name is None or name == "":
            return self.default_model
        if name in self.names:
            return name
        if name.lower() in (a.lower() for a in self.base_aliases):
            return self.base_name
        raise RequestError(404, f"model {name!r} is not served here; served: {', '.join(self.names)}",
                           field="model", code="model_not_found")

    def _encode(self, messages: list[dict]):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        else:  # a base model without a chat template: the conversation as plain text
            enc = tok("\n".join(m["content"] for m in messages), return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def generate(self, req: Generation) -> Completion:
        import torch

        name = self.resolve(req.model)
        with self._lock:
            inputs = self._encode(req.messages)
            n_prompt = inputs["input_ids"].shape[1]
            max_new = req.max_new_tokens
            if req.max_length is not None:
                max_new = req.max_length - n_prompt
                if max_new < 1:
                    raise RequestError(400, f"is {req.max_length} but the prompt alone is {n_prompt} tokens; "
                                            "raise it or use max_new_tokens", field="generate_kwargs.max_length")
            ctx = self.context_length
            if ctx and n_prompt + max_new > ctx:
                raise RequestError(400, f"is {n_prompt} tokens; with {max_new} new tokens that exceeds the model's "
                                        f"context of {ctx} tokens; shorten it or ask for fewer tokens", field="prompt")
            options: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": req.temperature > 0}
            if req.temperature > 0:
                options.update(temperature=req.temperature, top_p=req.top_p)
                if req.top_k is not None:
                    options["top_k"] = req.top_k
            else:  # greedy: unset the model's own sampling defaults, which would only warn
                options.update(temperature=None, top_p=None, top_k=None)
            if req.repetition_penalty is not None:
                options["repetition_penalty"] = req.repetition_penalty
            if self.tokenizer.pad_token_id is not None:
                options["pad_token_id"] = self.tokenizer.pad_token_id
            with self._select(name), torch.inference_mode():
                out = self.model.generate(**inputs, **options)
            new = out[0, n_prompt:]
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        stopped = len(new) > 0 and int(new[-1]) in eos
        finish = "length" if len(new) >= max_new and not stopped else "stop"
        return Completion(model=name, text=text, prompt_tokens=n_prompt, completion_tokens=len(new),
                          finish_reason=finish)

    @contextlib.contextmanager
    def _select(self, name: str):
        if not self.adapters:
            yield
        elif name == self.base_name:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield


def attach_adapters(model, preset: Preset, adapters: list[Adapter]):
    """Check each adapter's tensors against ``model`` and load them all as named peft adapters (strength applied)."""
    for a in adapters:
        check_shapes(a, preset, model)
    if not adapters:
        return model
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    first, *rest = adapters
    try:
        model = PeftModel.from_pretrained(model, str(first.path), adapter_name=first.name, is_trainable=False)
        for a in rest:
            model.load_adapter(str(a.path), adapter_name=a.name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # what the shape check cannot see (rank, dtype, format)
        raise AdapterMismatch(f"peft cannot load the adapter: {' '.join(str(e).split())[:400]}",
                              field=(first if len(adapters) == 1 else adapters[-1]).field) from None
    for a in adapters:
        if a.strength != 1.0:
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale(a.name, a.strength)
        log.info("adapter added: %s (strength %s) from %s", a.name, a.strength, a.source)
    model.eval()
    return model


def load_engine(preset_name: str | None, adapters: list[Adapter], *, model_dir: str | None = None,
                workdir: Path, auth_file: str | None = None, plain_http: bool = False) -> Engine:
    """Everything a server needs: adapters fetched and checked, base model loaded, adapters attached."""
    from kaito_tuning.tuner.base_model import load_base, resolve_preset

    try:
        preset = resolve_preset(preset_name or DEFAULT_PRESET)
    except UserError as e:
        e.field = "--preset"
        raise
    for a in adapters:
        if a.name.lower() in (preset.name, preset.repo.lower()):
            raise UserError(f"adapter {a.source} would be served as {a.name!r}, the base model's name; "
                            "rename its directory or repository", field=a.field, reason="AdapterNameTaken")
    fetch_adapters(adapters, workdir, auth_file=auth_file, plain_http=plain_http)
    for a in adapters:
        check_trained_for(a, preset)
    model, tokenizer = load_base(preset, model_dir=model_dir)
    model = attach_adapters(model, preset, adapters)
    return Engine(model=model, tokenizer=tokenizer, base_name=preset.name, base_aliases=(preset.repo,),
                  adapters=adapters)


# ---------------------------------------------------------------------------------------------
# requests: Kaito's /chat payload and OpenAI's chat completions, validated field by field


def _number(body: dict, key: str, lo: float, hi: float, *, where: str | None = None, integer: bool = False):
    value = body[key]
    name = where or key
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(400, f"must be {kind} from {lo:g} to {hi:g}, got {json.dumps(value)}", field=name)
    if not lo <= value <= hi:
        raise RequestError(400, f"must be {kind} from {lo:g} to {hi:g}, got {value}", field=name)
    return value


def _sampling(gen: Generation, body: dict, prefix: str = "") -> None:
    """max_tokens/max_new_tokens, temperature, top_p, top_k, repetition_penalty from ``body``."""
    for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        if body.get(key) is not None:
            gen.max_new_tokens = _number(body, key, 1, MAX_NEW_TOKENS, where=prefix + key, integer=True)
    if body.get("temperature") is not None:
        gen.temperature = float(_number(body, "temperature", 0, 2, where=prefix + "temperature"))
    if body.get("top_p") is not None:
        gen.top_p = float(_number(body, "top_p", 0, 1, where=prefix + "top_p"))
        if gen.top_p == 0:
            raise RequestError(400, "must be greater than 0", field=prefix + "top_p")
    if body.get("top_k") is not None:
        gen.top_k = _number(body, "top_k", 1, 1_000_000, where=prefix + "top_k", integer=True)
    if body.get("repetition_penalty") is not None:
        gen.repetition_penalty = float(_number(body, "repetition_penalty", 0.01, 10, where=prefix + "repetition_penalty"))


def _text(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise RequestError(400, "must be a string (or a list of text parts)", field=where)


def _check_length(total: int, where: str) -> None:
    if total > MAX_PROMPT_CHARS:
        raise RequestError(400, f"is {total} characters; at most {MAX_PROMPT_CHARS} are accepted", field=where)


def parse_chat(body: Any) -> Generation:
    """Kaito's ``/chat``: ``{"prompt": "...", "max_new_tokens": 64, "generate_kwargs": {...}, "model": ...}``."""
    if not isinstance(body, dict):
        raise RequestError(400, 'must be a JSON object like {"prompt": "..."}', field="body")
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError(400, 'is required: send {"prompt": "your question"}', field="prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(400, "must be a non-empty string", field="prompt")
    _check_length(len(prompt), "prompt")
    gen = Generation(messages=[{"role": "user", "content": prompt}], model=_model_field(body))
    _sampling(gen, body)
    kwargs = body.get("generate_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise RequestError(400, "must be an object", field="generate_kwargs")
        unknown = sorted(set(kwargs) - set(_GENERATE_KWARGS))
        if unknown:
            raise RequestError(400, f"{', '.join(unknown)} not supported; use {', '.join(_GENERATE_KWARGS)}",
                               field="generate_kwargs")
        _sampling(gen, kwargs, "generate_kwargs.")
        if kwargs.get("max_length") is not None:
            gen.max_length = _number(kwargs, "max_length", 1, 1 << 20, where="generate_kwargs.max_length", integer=True)
        if kwargs.get("do_sample") is False:
            gen.temperature = 0.0
        elif kwargs.get("do_sample") is True and gen.temperature == 0:
            gen.temperature = 1.0
    return gen


def parse_openai(body: Any) -> Generation:
    """OpenAI's chat completions request: messages, model, max_tokens, temperature, top_p."""
    if not isinstance(body, dict):
        raise RequestError(400, 'must be a JSON object like {"model": "...", "messages": [...]}', field="body")
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, 'is required: a list like [{"role": "user", "content": "..."}]', field="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "must be a non-empty list of {role, content} objects", field="messages")
    clean, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, "must be an object with role and content", field=f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(400, f"must be system, user or assistant, got {json.dumps(role)}",
                               field=f"messages[{i}].role")
        content = _text(m.get("content"), f"messages[{i}].content")
        total += len(content)
        clean.append({"role": role, "content": content})
    _check_length(total, "messages")
    if clean[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must be from the user (or system), not the assistant",
                           field=f"messages[{len(clean) - 1}].role")
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported; send stream: false", field="stream")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "only n=1 is supported", field="n")
    gen = Generation(messages=clean, model=_model_field(body))
    _sampling(gen, body)
    return gen


def _model_field(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "must be a string: a name from GET /v1/models", field="model")
    return model


# ---------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    server_version = "kaito-tuning"
    engine: Engine  # set on the subclass made by make_server

    def log_message(self, fmt: str, *args) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, e: RequestError) -> None:
        self._send(e.status, e.to_dict())

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/health", "/healthz"):
            self._send(200, {"status": "ok", "models": self.engine.names})
        elif path == "/v1/models":
            self._send(200, self._models())
        elif path in ("/chat", "/v1/chat/completions"):
            self._fail(RequestError(405, f"use POST for {path}", code="method_not_allowed"))
        else:
            self._fail(self._not_found(path))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path not in ("/chat", "/v1/chat/completions"):
                raise self._not_found(path)
            body = self._body()
            if path == "/chat":
                c = self.engine.generate(parse_chat(body))
                self._send(200, {"Result": c.text, "model": c.model, "usage": _usage(c)})
            else:
                c = self.engine.generate(parse_openai(body))
                self._send(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": c.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason}],
                    "usage": _usage(c)})
        except RequestError as e:
            self._fail(e)
        except Exception as e:  # a bug or an out-of-memory: a JSON 500, the details in the log
            log.exception("request failed")
            self._fail(RequestError(500, f"generation failed: {type(e).__name__}: {e}", code="server_error"))

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "send a Content-Length header with the JSON body", field="body")
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            raise RequestError(413, f"is {n} bytes; at most {MAX_BODY_BYTES} are accepted", field="body")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RequestError(400, f"is not valid JSON ({e})", field="body") from None

    def _models(self) -> dict:
        e = self.engine
        data = [{"id": e.base_name, "object": "model", "owned_by": "kaito-tuning", "root": e.base_name,
                 "parent": None}]
        data += [{"id": a.name, "object": "model", "owned_by": "kaito-tuning", "root": e.base_name,
                  "parent": e.base_name, "strength": a.strength, "source": a.image or a.name} for a in e.adapters]
        return {"object": "list", "data": data}

    @staticmethod
    def _not_found(path: str) -> RequestError:
        return RequestError(404, f"no route {path}; use POST /chat, POST /v1/chat/completions, GET /v1/models "
                                 "or GET /health", code="not_found")


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 5000) -> ThreadingHTTPServer:
    """An HTTP server for ``engine`` (not started: call ``serve_forever``; port 0 picks a free one)."""
    handler = type("Handler", (_Handler,), {"engine": engine})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


# ---------------------------------------------------------------------------------------------
# command line


@contextlib.contextmanager
def _engine(args):
    values = list(args.adapter or [])
    if args.adapters_dir:
        values += adapter_args_in_dir(args.adapters_dir)
    adapters = parse_adapter_args(values)
    workdir = Path(tempfile.mkdtemp(prefix="kaito-adapters-"))
    try:
        yield load_engine(args.preset, adapters, model_dir=args.model_dir, workdir=workdir,
                          auth_file=args.auth_file, plain_http=args.plain_http)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def cli_chat(args) -> int:
    """``kaito-tuning chat``: one answer per adapter given (or the base model's), printed."""
    _quiet_libraries()
    prompt = args.prompt
    if not prompt.strip():
        raise UserError("is empty", field="prompt")
    with _engine(args) as engine:
        names = [a.name for a in engine.adapters] or [engine.base_name]
        if args.compare and engine.adapters:
            names.insert(0, engine.base_name)
        for name in names:
            gen = Generation(messages=[{"role": "user", "content": prompt}], model=name,
                             max_new_tokens=args.max_tokens, temperature=args.temperature)
            try:
                c = engine.generate(gen)
            except RequestError as e:
                raise UserError(e.message, field="--max-tokens" if e.field == "prompt" else e.field) from None
            print(f"[{name}] {c.text}" if len(names) > 1 else c.text, flush=True)
    return 0


def cli_serve(args) -> int:
    """``kaito-tuning serve``: load, then answer HTTP until Ctrl-C or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _quiet_libraries()
    with _engine(args) as engine:
        try:
            server = make_server(engine, args.host, args.port)
        except OSError as e:
            raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}", field="--port") from None
        host, port = server.server_address[:2]
        previous = signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        log.info("model loaded successfully; serving %s on http://%s:%s (POST /chat, POST /v1/chat/completions, "
                 "GET /v1/models, GET /health)", ", ".join(engine.names), host, port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.server_close()
            log.info("stopped")
    return 0


def _quiet_libraries() -> None:
    """transformers' progress bars and advice are noise on a command line that prints answers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if not sys.warnoptions:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
