"""What the device decides: dtype, attention and packing, gradient checkpointing, rows per step. Each with its reason.

Pure functions of what the device reports (``Device``: name, compute capability, total and free memory;
``read_device`` asks torch.cuda, or describes the CPU) and of the model's shape (``ModelShape``) and the
ConfigMap's sections. ``recipe.py`` logs every reason and records the plan under ``hardware`` in
training_metadata.json.

- dtype: bfloat16 from compute capability 8.0 (A10, A100, L4, L40S, H100, H200); float16 on 7.x (V100
  sm70, T4 sm75: no bfloat16 in hardware. ``torch.cuda.is_bf16_supported()`` answers True there, by
  emulation, so it is not asked); float32 below 7.0 and on CPUs. ``ModelConfig``'s own dtype wins where
  the device runs it natively.
- attention: ``flex_attention`` with padding-free packing from sm80 (its block mask keeps each packed
  sequence to itself at per-sequence cost); SDPA without packing on sm70/sm75 (torch's flex_attention
  kernels are tuned for sm80 and newer; packing with SDPA builds a dense mask over each whole pack),
  said in one log line naming the GPU; SDPA, no packing, on CPUs. ``ModelConfig.attn_implementation``
  and ``TrainingArguments.packing`` win.
- gradient checkpointing: off unless the activations of one row of ``max_length`` tokens would not
  fit in the free memory without it (it recomputes every layer's forward pass: ~30% slower).
  ``TrainingArguments.gradient_checkpointing`` wins (on CPUs it stays off, as ever).
- rows per device: as many rows of ``max_length`` tokens as the free memory holds (the token
  budget), at most the global batch the ConfigMap asks for (``per_device_train_batch_size`` ×
  ``gradient_accumulation_steps``, 8 × 1 by default), and a divisor of it, so that
  ``gradient_accumulation_steps`` keeps that global batch exactly. The ConfigMap's own
  ``per_device_train_batch_size`` wins. CPUs: 1 row × 8 accumulation steps (faster there).
- No per-step cache flush: ``torch_empty_cache_steps`` is left to the ConfigMap.

The memory estimate (bytes, 16-bit activations; an estimate, to be measured: docs/benchmarks.md)::

    one layer, per token = 2 × (10·d + 4·i)      d hidden, i intermediate size
        + 2 × (6·d + i) with LoRA dropout (peft copies each adapted projection's input)
    per token, without gradient checkpointing = (layers + 2) × one layer
    per token, with gradient checkpointing = 2·d per layer + 3 × one layer (recomputed, with its gradients)
    logits per token = 12 × vocabulary (16-bit logits, their float32 copy and log-softmax, TRL's
        entropy metric); 0 with Liger's fused linear cross-entropy
    usable = (free − weights − LoRA parameters, gradients and Adam states) × 0.85 − 1 GiB
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from kaito_tuning.errors import UserError
from kaito_tuning.spec.memory import GIB, WEIGHT_BYTES

#: the rows per optimizer step when the ConfigMap sets no batch (transformers' per_device_train_batch_size)
DEFAULT_ROWS = 8
#: TRL's SFTConfig.max_length default
DEFAULT_MAX_LENGTH = 1024
#: attention implementations that keep packed sequences apart without a dense mask
PACKING_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")
HEADROOM = 0.85          # of what is left: allocator fragmentation, temporary buffers, dequantized weights
RESERVE_BYTES = GIB      # CUDA context and workspaces, cuBLAS/Triton buffers
LORA_STATE_BYTES = 16    # per LoRA parameter: fp32 weight, gradient, Adam's two moments
LOGIT_BYTES = 12         # per token per vocabulary entry without Liger's fused linear cross-entropy
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
#: the message for a dtype that is none of auto, bfloat16, float16, float32 (and their short names)
UNKNOWN_DTYPE = "unknown dtype {!r}; use auto, bfloat16, float16 or float32"


@dataclass(frozen=True)
class Device:
    name: str
    capability: tuple[int, int] | None   # CUDA compute capability; None: a CPU
    total_bytes: int = 0
    free_bytes: int = 0

    @property
    def cuda(self) -> bool:
        return self.capability is not None

    @property
    def sm(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}" if self.capability else "cpu"

    def describe(self) -> str:
        return f"{self.name} ({self.sm}, {self.total_bytes / GIB:.0f} GiB)" if self.cuda else self.name


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    vocab_size: int
    parameters: float                    # all of them, embeddings included
    quantized: bool = False              # QLoRA: 4-bit base weights
    intermediate_size: int | None = None  # MLP width; 4 × hidden when unknown
    max_positions: int | None = None

    @property
    def weight_bytes(self) -> float:
        return self.parameters * WEIGHT_BYTES["qlora" if self.quantized else "lora"]


@dataclass(frozen=True)
class Plan:
    device: Device
    dtype: str                           # bfloat16, float16, float32
    attention: str
    packing: bool
    gradient_checkpointing: bool = False
    rows: int | None = None              # per_device_train_batch_size (None: not sized yet)
    accumulation: int | None = None      # gradient_accumulation_steps
    batch_from_config: bool = False      # the ConfigMap's batch, left as it is
    token_budget: int | None = None      # tokens of activations the free memory holds per micro-step
    layout: str = "padded"               # or "cheaper": each batch padded or end to end by its cost (batches.py)
    estimate_gib: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)

    def defaults(self) -> dict:
        """SFTConfig arguments under the ConfigMap's own."""
        if not self.device.cuda:
            return {}
        return {"bf16": self.dtype == "bfloat16", "fp16": self.dtype == "float16",
                "gradient_checkpointing": self.gradient_checkpointing, "packing": self.packing}

    def overrides(self) -> dict:
        """SFTConfig arguments over the ConfigMap's: the batch the plan sized from it (only where the ConfigMap
        sets no per_device_train_batch_size), and on a CPU what a CPU must have."""
        args = {} if self.rows is None or self.batch_from_config else {
            "per_device_train_batch_size": self.rows, "gradient_accumulation_steps": self.accumulation}
        if not self.device.cuda:
            args.update(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, packing=False)
        return args

    def log_lines(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.reasons.items()]

    def metadata(self) -> dict:
        d = self.device
        return {"device": d.name, "compute_capability": ".".join(map(str, d.capability)) if d.cuda else None,
                "total_gib": round(d.total_bytes / GIB, 1), "free_gib": round(d.free_bytes / GIB, 1),
                "dtype": self.dtype, "attn_implementation": self.attention, "packing": self.packing,
                "gradient_checkpointing": self.gradient_checkpointing, "per_device_train_batch_size": self.rows,
                "gradient_accumulation_steps": self.accumulation, "batch_from_config": self.batch_from_config,
                "token_budget": self.token_budget, "layout": self.layout,
                "estimate_gib": self.estimate_gib, "reasons": dict(self.reasons)}


def read_device() -> Device:
    """This process's GPU as torch.cuda reports it (free memory now), or a description of the CPU."""
    import torch

    if not torch.cuda.is_available():
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = free = 0
        return Device(f"CPU ({os.cpu_count()} cores)", None, total, free)
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    free, total = torch.cuda.mem_get_info(i)
    return Device(props.name, (props.major, props.minor), total, free)


def model_shape(config, parameters: float, quantized: bool) -> ModelShape:
    """The shape of a transformers config (its text model's, for a multimodal one)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, vocab_size=c.vocab_size,
                      parameters=parameters, quantized=quantized,
                      intermediate_size=getattr(c, "intermediate_size", None),
                      max_positions=getattr(c, "max_position_embeddings", None))


# ------------------------------------------------------------------ decisions

def choose(device: Device, training: dict, *, dtype=None, attn: str | None = None) -> Plan:
    """dtype, attention and packing: what loading the model needs (``dtype``, ``attn``: ModelConfig's)."""
    reasons = {}
    dt, reasons["dtype"] = _dtype(device, dtype)
    packing_asked = training.get("packing")
    if attn:
        attention, why = attn, f"{attn}: ModelConfig.attn_implementation"
    elif not device.cuda:
        attention, why = "sdpa", "sdpa without packing on a CPU"
    elif device.capability >= (8, 0):
        attention, why = "flex_attention", (f"flex_attention with padding-free packing on {device.describe()}: its "
                                            "block mask keeps each packed sequence to itself")
    else:
        attention, why = "sdpa", (f"sdpa without packing on {device.describe()}: flex_attention's kernels are tuned "
                                  "for sm80 and newer, and packing with sdpa would build a dense mask over each "
                                  "whole pack")
    plan = Plan(device, dt, attention, packing=False, reasons=reasons)
    return _with_packing(plan, why, packing_asked)


def without_flex(plan: Plan, error: str, training: dict) -> Plan:
    """The model has no flex_attention support: sdpa, and no packing unless the ConfigMap asks for it."""
    why = f"sdpa without packing: this model does not support {plan.attention} ({error})"
    return _with_packing(dataclasses.replace(plan, attention="sdpa"), why, training.get("packing"))


def _with_packing(plan: Plan, why: str, asked) -> Plan:
    if not plan.device.cuda:
        packing = False
        if asked:
            why += "; packing is off on a CPU"
    elif asked is not None:
        packing = bool(asked)
        why += f"; packing {'on' if packing else 'off'}: TrainingArguments.packing"
        if packing and plan.attention not in PACKING_ATTENTION:
            why += f" (slow with {plan.attention}: a dense mask over each whole pack)"
    else:
        packing = plan.attention in PACKING_ATTENTION
    return dataclasses.replace(plan, packing=packing, reasons={**plan.reasons, "attention": why})


def row_layout(plan: Plan, training: dict, *, native_model: bool) -> Plan:
    """Each batch padded, or end to end where that costs fewer FLOPs (``batches.py``): on a CPU, with sdpa or
    eager attention on a model transformers implements itself (its masks keep end-to-end rows apart), more
    than one row a step and no packing. ``TrainingArguments.padding_free`` wins (TRL's own collator)."""
    if plan.device.cuda or plan.packing or training.get("padding_free") is not None or (plan.rows or 1) < 2:
        return plan
    if plan.attention not in ("sdpa", "eager") or not native_model:
        why = f"{plan.attention} attention" if native_model else "a model with its own code (trust_remote_code)"
        return dataclasses.replace(plan, reasons={**plan.reasons, "layout": f"rows padded: {why}"})
    return dataclasses.replace(plan, layout="cheaper", reasons={
        **plan.reasons, "layout": (f"the {plan.rows} rows of each batch padded, or end to end where that costs fewer "
                                   f"FLOPs ({plan.attention}'s mask keeps each row to itself)")})


def dtype_name(asked) -> str | None:
    """The full name of a dtype asked for (``bf16`` and ``torch.bfloat16`` are ``bfloat16``); None for auto."""
    name = None if asked is None or str(asked) == "auto" else str(asked).removeprefix("torch.")
    return _DTYPES.get(name, name)


def _dtype(device: Device, asked) -> tuple[str, str]:
    name = dtype_name(asked)
    if name not in (None, "bfloat16", "float16", "float32"):
        raise UserError(UNKNOWN_DTYPE.format(asked), field="ModelConfig.torch_dtype")
    if not device.cuda:
        extra = f" (ModelConfig asks for {name}, which CPUs run slowly)" if name not in (None, "float32") else ""
        return "float32", f"float32 on a CPU{extra}"
    bf16 = device.capability >= (8, 0)
    native = "bfloat16" if bf16 else "float16" if device.capability >= (7, 0) else "float32"
    if name is None:
        why = {"bfloat16": "bfloat16: compute capability 8.0 or newer",
               "float16": "float16: no bfloat16 before compute capability 8.0",
               "float32": "float32: no tensor cores before compute capability 7.0"}[native]
        return native, f"{why} ({device.describe()})"
    if name == "bfloat16" and not bf16:
        return "float16", f"float16: ModelConfig asks for bfloat16, which {device.describe()} does not have"
    return name, f"{name}: ModelConfig"


def size_batch(plan: Plan, device: Device, model: ModelShape, training: dict, *, lora: dict | None = None,
               liger: bool = False, loaded: bool = True) -> Plan:
    """Gradient checkpointing and rows per device from the free memory of ``device``: read after the weights
    are loaded (``loaded``), or an idle device, from which the weights' estimate is taken first."""
    lora = lora or {}
    user_rows, user_acc = training.get("per_device_train_batch_size"), training.get("gradient_accumulation_steps")
    user_gc = training.get("gradient_checkpointing")
    reasons = dict(plan.reasons)
    yours = {"batch_from_config": True, "rows": user_rows or DEFAULT_ROWS, "accumulation": user_acc or 1}
    if not device.cuda:
        reasons["gradient_checkpointing"] = "off on a CPU" + (" (so is packing)" if user_gc or training.get("packing")
                                                              else "")
        if user_rows is None and user_acc is None:
            reasons["batch"] = ("1 row x 8 accumulation steps on a CPU (8 rows at once thrash its caches: "
                                "docs/benchmarks.md)")
            return dataclasses.replace(plan, device=device, rows=1, accumulation=DEFAULT_ROWS, reasons=reasons)
        reasons["batch"] = f"{yours['rows']} row(s) x {yours['accumulation']} accumulation step(s): TrainingArguments"
        return dataclasses.replace(plan, device=device, reasons=reasons, **yours)
    max_length = training.get("max_length", DEFAULT_MAX_LENGTH) or model.max_positions or 4 * DEFAULT_MAX_LENGTH
    usable, est = _usable_bytes(device, model, lora, loaded)
    full = activation_bytes(model, checkpointing=False, lora_dropout=bool(lora.get("lora_dropout", 0)),
                            liger=liger)
    ckpt = activation_bytes(model, checkpointing=True, lora_dropout=bool(lora.get("lora_dropout", 0)),
                            liger=liger)
    fits_full = int(usable // full) if usable > 0 else 0
    if user_gc is not None:
        gc = bool(user_gc)
        why = f"{'on' if gc else 'off'}: TrainingArguments.gradient_checkpointing"
    elif fits_full >= max_length:
        gc, why = False, (f"off: one row of {max_length} tokens fits without it (about "
                          f"{_g(max_length * full)} GiB of activations, {_g(usable)} GiB usable)")
    else:
        gc, why = True, (f"on: one row of {max_length} tokens needs about {_g(max_length * full)} GiB of "
                         f"activations without it, {_g(max(usable, 0))} GiB usable")
    per_token = ckpt if gc else full
    budget = int(usable // per_token) if usable > 0 else 0
    est = {**est, "usable": _r(usable), "per_row": _r(max_length * per_token)}
    reasons["gradient_checkpointing"] = why
    if user_rows is not None:
        reasons["batch"] = f"{user_rows} row(s) per device: TrainingArguments.per_device_train_batch_size"
        return dataclasses.replace(plan, device=device, gradient_checkpointing=gc, token_budget=budget,
                                   estimate_gib=est, reasons=reasons, **yours)
    wanted = DEFAULT_ROWS * (user_acc or 1)
    rows = max(r for r in range(1, wanted + 1) if wanted % r == 0 and r * max_length <= max(budget, max_length))
    acc = wanted // rows
    why = (f"{rows} row(s) x {acc} accumulation step(s) = the {wanted} rows per step asked; memory holds about "
           f"{budget} tokens ({budget // max_length} row(s) of {max_length})")
    if budget < max_length:
        why += "; even one row may not fit: lower max_length, or use a GPU with more memory"
    reasons["batch"] = why
    return dataclasses.replace(plan, device=device, gradient_checkpointing=gc, rows=rows, accumulation=acc,
                               token_budget=budget, estimate_gib=est, reasons=reasons)


def plan(device: Device, model: ModelShape, training: dict, *, dtype=None, attn: str | None = None,
         lora: dict | None = None, liger: bool = False) -> Plan:
    """Every decision at once, for a device as it is before the model is loaded."""
    return size_batch(choose(device, training, dtype=dtype, attn=attn), device, model, training, lora=lora,
                      liger=liger, loaded=False)


def activation_bytes(model: ModelShape, *, checkpointing: bool, lora_dropout: bool = True,
                     liger: bool = False) -> float:
    """Bytes of activations per token kept for the backward pass (16-bit activations)."""
    d, i = model.hidden_size, model.intermediate_size or 4 * model.hidden_size
    layer = 2 * (10 * d + 4 * i) + (2 * (6 * d + i) if lora_dropout else 0)
    # with checkpointing each layer's input is kept and one layer at a time is recomputed; either way the layer
    # being differentiated also holds its activations' gradients and temporaries (x3 with checkpointing: checked
    # against gpu-baseline.md's 23.3 GiB measured for 16 packs of 2048 tokens, estimated 24.9 GiB)
    kept = (model.num_layers * 2 * d + 3 * layer) if checkpointing else (model.num_layers + 2) * layer
    return kept + (0 if liger else LOGIT_BYTES * model.vocab_size)


def lora_parameters(model: ModelShape, rank: int) -> float:
    """An upper bound: every linear projection of every layer (q, k, v, o as d×d; gate, up, down)."""
    d, i = model.hidden_size, model.intermediate_size or 4 * model.hidden_size
    return rank * model.num_layers * (8 * d + 3 * (d + i))


def _usable_bytes(device: Device, model: ModelShape, lora: dict, loaded: bool) -> tuple[float, dict]:
    weights = 0.0 if loaded else model.weight_bytes
    state = lora_parameters(model, int(lora.get("r", 8))) * LORA_STATE_BYTES
    usable = (device.free_bytes - weights - state) * HEADROOM - RESERVE_BYTES
    return usable, {"free": _r(device.free_bytes), "weights": _r(weights) if not loaded else None,
                    "lora_states": _r(state)}


def _r(x: float) -> float:
    return round(x / GIB, 2)


def _g(x: float) -> str:
    x /= GIB
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"
