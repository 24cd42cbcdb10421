"""The generation engine: one base model, its LoRA adapters, one answer at a time.

Kaito's transformers runtime merges every adapter into one ("combined_adapter") and serves the base
model's name. Here each adapter stays a model of its own, chosen per request by ``model``; the base
model is always served too, under the preset's name (and its hub repo id). peft keeps all adapters
loaded; ``set_adapter``/``disable_adapter`` switch between them under a lock, so generation is
serial. How many requests may wait for that lock is the HTTP app's business (``app.py``).

``strength`` scales an adapter's LoRA update: 0 gives the base model's behaviour, 1 the adapter as
trained.

Limits, whatever a request asks: at most ``max_new_tokens`` (2048) new tokens; ``max_length``
(Kaito's ``generate_kwargs``, prompt + answer) is an upper bound and is clamped to that cap and to
the model's context, so a ``max_length`` of 2^20 generates no more than any other request; and at
most ``max_seconds`` of generation (transformers' ``max_time``). A request stopped by a limit
answers ``finish_reason: "length"``; one that ended with the end-of-turn token, ``"stop"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaito_tuning.errors import UserError
from kaito_tuning.serving.adapters import (
    Adapter,
    AdapterMismatch,
    check_shapes,
    prepare_adapters,
)
from kaito_tuning.spec.presets import DEFAULT_PRESET, Preset

log = logging.getLogger(__name__)

#: the most tokens one request may generate
MAX_NEW_TOKENS = 2048
DEFAULT_MAX_NEW_TOKENS = 128
#: Kaito's generate_kwargs.max_length may be as large as this (it is clamped, not refused)
MAX_LENGTH = 1 << 20
#: the most seconds one request may generate for (then it stops with finish_reason "length")
MAX_SECONDS = 300.0


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
    finish_reason: str  # "stop" (the model ended its turn) or "length" (a limit stopped it)


@dataclass
class Engine:
    """A base model with its adapters loaded as named peft adapters."""

    model: Any
    tokenizer: Any
    base_name: str
    base_aliases: tuple[str, ...] = ()
    adapters: list[Adapter] = field(default_factory=list)
    max_new_tokens: int = MAX_NEW_TOKENS  # the cap on every request
    max_seconds: float = MAX_SECONDS
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
        raise RequestError(404, f"model {name[:100]!r} is not served here; served: {', '.join(self.names)}",
                           field="model", code="model_not_found")

    def _encode(self, messages: list[dict]):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        else:  # a base model without a chat template: the conversation as plain text
            enc = tok("\n".join(m["content"] for m in messages), return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def budget(self, req: Generation, n_prompt: int) -> int:
        """How many new tokens ``req`` may have: its ask, within the cap and the context."""
        ctx = self.context_length
        room = ctx - n_prompt if ctx else None
        if room is not None and room < 1:
            raise RequestError(400, f"is {n_prompt} tokens; the model's context of {ctx} tokens leaves no room for an "
                                    "answer; shorten it",
                               field="prompt")
        if req.max_length is not None:  # an upper bound on prompt + answer: clamped, never more than the cap
            wanted = req.max_length - n_prompt
            if wanted < 1:
                raise RequestError(400, f"is {req.max_length} but the prompt alone is {n_prompt} tokens; "
                                        "raise it or use max_new_tokens", field="generate_kwargs.max_length")
            return min(wanted, self.max_new_tokens, room if room is not None else wanted)
        wanted = min(req.max_new_tokens, self.max_new_tokens)
        if room is not None and wanted > room:
            raise RequestError(400, f"is {n_prompt} tokens; with {wanted} new tokens that exceeds the model's "
                                    f"context of {ctx} tokens; shorten it or ask for fewer tokens", field="prompt")
        return wanted

    def generate(self, req: Generation) -> Completion:
        import torch

        name = self.resolve(req.model)
        with self._lock:
            inputs = self._encode(req.messages)
            n_prompt = inputs["input_ids"].shape[1]
            max_new = self.budget(req, n_prompt)
            options: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": req.temperature > 0,
                                       "max_time": self.max_seconds}
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
        stopped = len(new) > 0 and int(new[-1]) in self._eos_ids()
        return Completion(model=name, text=text, prompt_tokens=n_prompt, completion_tokens=len(new),
                          finish_reason="stop" if stopped else "length")

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return {i for i in ids if i is not None}

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
                workdir: Path, auth_file: str | None = None, plain_http: bool = False,
                weights_image: str | None = None) -> Engine:
    """Everything a server needs: adapters fetched and checked, base model loaded (from ``weights_image`` when
    given: pulled into the weights cache first, as the tuning Job does), adapters attached."""
    from kaito_tuning.tuner.base_model import load_base, local_weights, resolve_preset

    try:
        preset = resolve_preset(preset_name or DEFAULT_PRESET)
    except UserError as e:
        e.field = "--preset"
        raise
    prepare_adapters(adapters, preset, Path(workdir), auth_file=auth_file, plain_http=plain_http)
    if weights_image and not model_dir:
        model_dir = str(local_weights(preset, weights_image=weights_image, pull_auth=auth_file, plain_http=plain_http))
    model, tokenizer = load_base(preset, model_dir=model_dir)
    model = attach_adapters(model, preset, adapters)
    return Engine(model=model, tokenizer=tokenizer, base_name=preset.name, base_aliases=(preset.repo,),
                  adapters=adapters)


def quiet_libraries() -> None:
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
