"""The tuning recipe, top to bottom: model → LoRA → data and loss mask → SFTTrainer → adapter.

Each ConfigMap section goes to its real class (``config.py``): ModelConfig to ``from_pretrained``,
QuantizationConfig to ``BitsAndBytesConfig``, LoraConfig to ``peft.LoraConfig``, TrainingArguments
to ``trl.SFTConfig``. Around the user's values the recipe sets what the device needs, as ``hardware.py``
decides it from what the device reports (each choice with its reason, logged and recorded in the metadata):

- CPU: float32, ``use_cpu``, no gradient checkpointing, no packing, 1 row x 8 accumulation steps.
- GPU: bfloat16 (float16 on V100/T4), packing (best-fit decreasing, padding-free) with ``flex_attention``
  from sm80 (SDPA without packing before), gradient checkpointing only where the activations would not
  fit without it, and as many rows per step as the free memory holds, the global batch kept.

Loss masks are TRL's: assistant tokens only for chat data when the chat template is (or can be patched
to be) training-compatible, else the final assistant turn as a completion; completion tokens only for
prompt/completion data. The data is tokenized and masked by ``dataprep.py`` (row for row what TRL's
preparation makes, in bulk, cached under the output directory) and handed to TRL ready.

A restarted run resumes from its newest complete checkpoint (``checkpoints.py``); the adapter and
its metadata are written by ``outputs.py`` so that a run that dies never leaves one that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kaito_tuning import redact
from kaito_tuning.contract import ADAPTER_CONFIG, ENV_PARALLELISM, METADATA_FILE
from kaito_tuning.errors import OutOfMemoryError, UserError
from kaito_tuning.spec.training_config import TuningConfig
from kaito_tuning.tuner import dataprep, distributed, hardware
from kaito_tuning.tuner.base_model import load_base, model_dir_from_config, resolve_preset
from kaito_tuning.tuner.checkpoints import (
    CHECKPOINTS,
    checkpoint_is_final,
    fingerprint,
    newest_checkpoint,
    prepare_checkpoints,
    restore_final_checkpoint,
)
from kaito_tuning.tuner.formats import Splits
from kaito_tuning.tuner.outputs import (
    LOSS_CURVE,
    MODEL_CARD,
    clear_adapter,
    model_card,
    point_at_source,
    publish,
    write_loss_curve,
)

log = logging.getLogger(__name__)

#: the prepared data's cache, under the output directory (hidden: never pushed with the adapter)
DATAPREP_CACHE = ".cache"


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    train_loss: float | None
    eval_loss: float | None
    initial_eval_loss: float | None
    tokens_per_second: float | None
    loss_curve: str | None
    resumed_from_step: int = 0
    metadata: dict = field(default_factory=dict)


def train(*, preset, method: str, config: TuningConfig, data: Splits, output_dir: str | Path,
          model_dir: str | None = None, max_steps: int | None = None, progress=None,
          show_progress: bool = True, workspace: str | None = None) -> TrainResult:
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    t_start = time.monotonic()
    timings: dict[str, float] = {}  # seconds: load (model, tokenizer), prepare (data, trainer), train, save
    p = resolve_preset(preset)
    on_gpu = torch.cuda.is_available()
    distributed.init(on_gpu)  # one of several processes (torchrun): join the group first
    if not distributed.is_main():
        progress, show_progress = None, False  # the first process alone reports
    out = Path(output_dir)
    fp = fingerprint(p.name, method, config, data.digests, max_steps)
    ckpt_dir = out / CHECKPOINTS
    if distributed.is_node_main():  # each node prepares its own output directory
        out.mkdir(parents=True, exist_ok=True)
        clear_adapter(out)
        prepare_checkpoints(ckpt_dir, fp)
    distributed.barrier()
    user_args = config.section("TrainingArguments")
    seed = int(user_args.get("seed", 42))
    set_seed(seed)

    # ---- 1. hardware and the base model
    mcfg = config.model()
    hw = hardware.choose(hardware.read_device(), user_args, dtype=mcfg.dtype or mcfg.torch_dtype,
                         attn=mcfg.attn_implementation)
    dtype, attn = getattr(torch, hw.dtype), hw.attention
    if progress:
        progress.update(phase="loading")
    parallelism = distributed.parallelism(os.environ.get(ENV_PARALLELISM), on_gpu)  # the operator's (spec/memory.py)
    quant = config.section("QuantizationConfig") if config.quantized else None
    quant = distributed.fsdp_quantization(parallelism, quant, str(dtype).removeprefix("torch."))
    model_kwargs = {k: v for k, v in {"trust_remote_code": mcfg.trust_remote_code, "revision": mcfg.revision,
                                      "local_files_only": mcfg.local_files_only or None}.items() if v is not None}
    base_dir = model_dir or model_dir_from_config(mcfg.pretrained_model_name_or_path)

    def load(attn_implementation: str):
        with out_of_memory_is_fatal():
            # each rank's model (QLoRA's quantized one too) on its own GPU
            device = f"cuda:{distributed.local_rank()}" if on_gpu else "cpu"
            return load_base(p, model_dir=base_dir, quantization=quant, dtype=dtype, device=device,
                             model_kwargs={**model_kwargs, "attn_implementation": attn_implementation})

    try:
        model, tokenizer = load(attn)
    except ValueError as e:  # the architecture has no flex_attention support
        if mcfg.attn_implementation or "attn" not in str(e).lower():
            raise
        hw = hardware.without_flex(hw, str(e).splitlines()[0], user_args)
        attn = hw.attention
        model, tokenizer = load(attn)
    # gradient checkpointing and rows per step from the memory left free once the weights are in place
    kernels = gpu_kernels(on_gpu, user_args)
    shape = hardware.model_shape(model.config, p.parameters_b * 1e9, config.quantized)
    hw = hardware.size_batch(hw, hardware.read_device(), shape, user_args,
                             lora=config.section("LoraConfig"), liger=bool({**user_args, **kernels}.get("use_liger_kernel")))
    hw = hardware.row_layout(hw, user_args, native_model=type(model).__module__.startswith("transformers."))
    for line in hw.log_lines():
        log.info("hardware: %s", line)
    packing = hw.packing
    if mcfg.chat_template:
        tokenizer.chat_template = _read_template(mcfg.chat_template)

    # ---- 2. the loss mask the chat template allows
    loss_mask = loss_mask_for(data, tokenizer)

    # ---- 3. LoRA: the preset's target modules unless the config names its own
    lora = LoraConfig(**lora_arguments(p.target_modules, config.section("LoraConfig")))

    # ---- 4. SFTConfig: hardware defaults < the ConfigMap < what this run must have
    sft_args = training_arguments(user_args, ckpt_dir=ckpt_dir, plan=hw, has_eval=data.eval is not None,
                                  loss_mask=loss_mask, seed=seed, max_steps=max_steps, show_progress=show_progress)
    sft_args.update({k: v for k, v in distributed.fsdp_arguments(parallelism, config.quantized).items()
                     if k not in user_args})
    sft_args.update(kernels)
    callbacks = []
    if progress:
        from kaito_tuning.tuner.progress import make_callback

        callbacks.append(make_callback(progress))
    args = SFTConfig(**sft_args)
    timings["load"] = round(time.monotonic() - t_start, 2)
    train_ds, eval_ds, prep = prepare_data(data, tokenizer, args, loss_mask, out)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=lora, callbacks=callbacks)
    if hw.layout == "cheaper":  # TRL's collator (its pad token), padded or padding-free batch by batch
        from kaito_tuning.tuner.batches import CheaperLayout

        trainer.data_collator = CheaperLayout(shape, trainer.data_collator)
    timings["prepare"] = round(time.monotonic() - t_start - timings["load"], 2)

    # ---- 5. train (resuming from the newest complete checkpoint), evaluate
    resume = newest_checkpoint(ckpt_dir)
    resumed_step = int(resume.name.rsplit("-", 1)[1]) if resume else 0
    if resume:
        log.info("resuming from %s", resume)
    with out_of_memory_is_fatal():
        initial_eval = None
        if eval_ds is not None and resume is None:
            if progress:
                progress.update(phase="evaluating")
            initial_eval = trainer.evaluate()["eval_loss"]
        t0 = time.monotonic()
        if resume is not None and checkpoint_is_final(resume):
            # the run died after its last checkpoint, before the adapter was in place: do not take another
            # step (the Trainer would: it checks max_steps only after stepping); save what was trained
            log.info("%s is the run's last step; saving its adapter without training further", resume.name)
            train_metrics = restore_final_checkpoint(trainer, resume)
        else:
            train_metrics = trainer.train(resume_from_checkpoint=str(resume) if resume else None).metrics
        seconds = time.monotonic() - t0
        timings["train"] = round(seconds, 2)
        final_eval = None
        if eval_ds is not None:
            if progress:
                progress.update(phase="evaluating")
            final_eval = trainer.evaluate()["eval_loss"]

    # ---- 6. the adapter, staged then moved into place (by the first process alone)
    stage = out / f".adapter-{fp}.tmp"
    if parallelism == "fsdp":
        # sharded weights are gathered by every rank together; the Trainer writes them on rank 0
        # (not run on this project's CPU machines: see tuner/distributed.py)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(stage))
    if not distributed.is_main():
        distributed.barrier()
        return TrainResult(adapter_dir=str(out), steps=trainer.state.global_step, train_loss=None, eval_loss=final_eval,
                           initial_eval_loss=initial_eval, tokens_per_second=None, loss_curve=None,
                           resumed_from_step=resumed_step)
    if progress:
        progress.update(phase="saving", eval_loss=final_eval)
    history = trainer.state.log_history
    train_loss = _last(history, "loss") or train_metrics.get("train_loss")
    tokens_per_s = _tokens_per_second(history, resumed_step, seconds)
    meta = {
        "preset": p.name, "base_model": p.repo, "base_revision": mcfg.revision or p.revision, "method": method,
        "workspace": workspace, "rank": lora.r, "lora_alpha": lora.lora_alpha,
        "target_modules": sorted(lora.target_modules) if isinstance(lora.target_modules, (set, list))
        else lora.target_modules,
        "quantization": quant or None, "dtype": str(dtype).removeprefix("torch."), "attn_implementation": attn,
        "packing": packing, "loss_mask": loss_mask, "data_formats": data.formats,
        "liger_kernel": bool(sft_args.get("use_liger_kernel")),
        "hardware": {**hw.metadata(), "layout_batches": getattr(trainer.data_collator, "counts", None)},
        "datasets": [{"name": f.name, "url": redact.url(f.url) if f.url else None, "sha256": f.sha256, "size": f.size}
                     for f in data.files],
        "dataset_digests": [f"sha256:{f.sha256}" for f in data.files],
        "train_rows": len(data.train), "eval_rows": len(data.eval) if data.eval is not None else 0,
        "data_preparation": prep,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "resumed_from_step": resumed_step,
        "train_loss": train_loss, "initial_eval_loss": initial_eval, "eval_loss": final_eval,
        "tokens_per_second": tokens_per_s, "train_seconds": round(seconds, 1), "seed": seed,
        "tokens_seen": _last(history, "num_tokens"), "processes": distributed.world_size(),
        "nodes": distributed.nnodes(),
        "parallelism": parallelism, "fingerprint": fp,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    t_save = time.monotonic()
    meta["timings"] = timings
    if parallelism != "fsdp":
        shutil.rmtree(stage, ignore_errors=True)
        trainer.model.save_pretrained(stage)
    point_at_source(stage / ADAPTER_CONFIG, p.repo, meta["base_revision"])
    tokenizer.save_pretrained(stage)
    curve = write_loss_curve(history, stage / LOSS_CURVE)
    (stage / METADATA_FILE).write_text(json.dumps(meta, indent=1, default=str))
    (stage / MODEL_CARD).write_text(model_card(meta))
    publish(stage, out)
    timings["save"] = round(time.monotonic() - t_save, 2)
    log.info("seconds: %s", ", ".join(f"{k} {v}" for k, v in timings.items()))
    distributed.barrier()
    return TrainResult(adapter_dir=str(out), steps=trainer.state.global_step, train_loss=train_loss,
                       eval_loss=final_eval, initial_eval_loss=initial_eval, tokens_per_second=tokens_per_s,
                       loss_curve=str(out / LOSS_CURVE) if curve else None, resumed_from_step=resumed_step,
                       metadata=meta)


# ------------------------------------------------------------------ steps of the recipe

@contextlib.contextmanager
def out_of_memory_is_fatal():
    """CUDA out-of-memory → OutOfMemoryError (exit 66: the Job is not retried, the same run would fail again)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemoryError(
            f"the GPU ran out of memory ({str(e).splitlines()[0]}); lower TrainingArguments."
            "per_device_train_batch_size or max_length, set gradient_checkpointing: true, use method qlora, "
            "or a GPU with more memory") from None


def loss_mask_for(data: Splits, tokenizer) -> str:
    """assistant_only (chat data whose template can mark assistant tokens), completion_only
    (prompt/completion data; chat data whose template cannot: the last assistant turn is the completion)
    or all_tokens (text)."""
    if data.form != "messages":
        return "completion_only" if data.form == "prompt_completion" else "all_tokens"
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
        return "assistant_only"
    except ValueError:
        log.info("the chat template has no {%% generation %%} markers TRL can add; training on the last "
                 "assistant turn of each conversation as a completion")
        return "completion_only"


def choose_loss_mask(data: Splits, tokenizer):
    """(train, eval, loss mask name) in the form TRL's own preparation needs for that mask: chat data whose
    template cannot mark assistant tokens becomes prompt (all but the last assistant turn) + completion."""
    mask = loss_mask_for(data, tokenizer)
    if data.form != "messages" or mask != "completion_only":
        return data.train, data.eval, mask
    conv = lambda ds: ds.map(_last_turn_as_completion, remove_columns=["messages"])  # noqa: E731
    return conv(data.train), conv(data.eval) if data.eval is not None else None, mask


def prepare_data(data: Splits, tokenizer, args, loss_mask: str, out: Path):
    """(train, eval, how they were prepared): tokenized and masked by ``dataprep`` (cached under ``out``) and
    handed to TRL ready (``skip_prepare_dataset``); where dataprep cannot, TRL prepares them as usual. Each
    node's first process prepares (and caches); the others then read its cache."""
    prepared = None
    cache = out / DATAPREP_CACHE
    if distributed.is_node_main():
        prepared = dataprep.prepare_for_training(data, tokenizer, args, loss_mask=loss_mask, cache_dir=cache)
    distributed.barrier()
    if not distributed.is_node_main():
        prepared = dataprep.prepare_for_training(data, tokenizer, args, loss_mask=loss_mask, cache_dir=cache)
    if prepared is None:
        train, eval_, _ = choose_loss_mask(data, tokenizer)
        return train, eval_, {"by": "trl"}
    # the masks are in the labels: TRL neither prepares the rows again nor looks for the chat turns they came from
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    args.assistant_only_loss = False
    return prepared.train, prepared.eval, {"by": "dataprep", "cached": prepared.cached,
                                           "seconds": round(prepared.seconds, 2), "tokens": prepared.tokens,
                                           "rows": len(prepared.train)}


def _last_turn_as_completion(row: dict) -> dict:
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {"prompt": msgs[:last], "completion": [msgs[last]]}


def liger_available() -> bool:
    """liger-kernel (the optional [gpu] extra) is installed, in a version transformers can apply."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return False
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()


def gpu_kernels(on_gpu: bool, user: dict) -> dict:
    """SFTConfig arguments for Liger's Triton kernels (fused linear cross-entropy: no vocabulary-sized logits;
    RMSNorm, RoPE, SwiGLU), applied by transformers to the architectures Liger knows: only on CUDA, only when
    liger-kernel is installed, never over the ConfigMap's own ``use_liger_kernel``. Nothing on a CPU."""
    if not on_gpu or "use_liger_kernel" in user or not liger_available():
        return {}
    log.info("liger-kernel: fused linear cross-entropy, RMSNorm, RoPE and SwiGLU kernels on")
    return {"use_liger_kernel": True}


def lora_arguments(preset_modules, user: dict) -> dict:
    """peft.LoraConfig keyword arguments: the preset's target modules unless the config names its own."""
    args = {"target_modules": list(preset_modules) or "all-linear", "task_type": "CAUSAL_LM", **user}
    names = args["target_modules"]
    # Kaito's "q_proj,k_proj" (peft would read a string as one regular expression)
    if isinstance(names, str) and names != "all-linear" and re.fullmatch(r"[\w.,\s-]+", names):
        args["target_modules"] = [n.strip() for n in names.split(",") if n.strip()]
    return args


def training_arguments(user: dict, *, ckpt_dir: Path, plan: hardware.Plan, has_eval: bool, loss_mask: str,
                       seed: int, max_steps: int | None, show_progress: bool) -> dict:
    """SFTConfig keyword arguments: defaults < the device's plan < the ConfigMap < what this run must have.
    No per-step cache flush: ``torch_empty_cache_steps`` is the ConfigMap's alone."""
    args = {
        "report_to": "none", "logging_steps": 10, "save_strategy": "steps", "save_steps": 200,
        "save_total_limit": 2, "seed": seed, "data_seed": seed, "packing_strategy": "bfd",
        "eval_strategy": "no", **plan.defaults(),
    }
    if has_eval:
        args.update(eval_strategy="steps", eval_steps=user.get("save_steps", 200))
    args.update({k: v for k, v in user.items() if k != "output_dir"})
    # the batch the plan sized (from the ConfigMap's global batch); on a CPU, what a CPU must have
    args.update(plan.overrides())
    args.setdefault("per_device_eval_batch_size", args.get("per_device_train_batch_size", 8))
    args["output_dir"] = str(ckpt_dir)
    args["disable_tqdm"] = not show_progress
    if distributed.world_size() > 1:
        # LoRA leaves most parameters frozen: DDP need not search for unused ones (Kaito sets this too);
        # several nodes keep checkpoints each (no shared disk), so every rank can resume
        args.setdefault("ddp_find_unused_parameters", False)
        args.setdefault("ddp_timeout", int(os.environ.get(distributed.ENV_DIST_TIMEOUT) or distributed.DEFAULT_TIMEOUT_S))
        if distributed.nnodes() > 1:
            args["save_on_each_node"] = True
    args["assistant_only_loss"] = loss_mask == "assistant_only"
    if loss_mask == "completion_only":
        args.setdefault("completion_only_loss", True)
    if max_steps is not None:
        args["max_steps"] = max_steps
    if not has_eval:
        args["eval_strategy"] = "no"
    return args


def _read_template(value: str) -> str:
    if "{{" in value or "{%" in value:
        return value
    try:
        return Path(value).read_text()
    except OSError as e:
        raise UserError(f"is neither a Jinja template nor a readable file ({e.strerror})",
                        field="ModelConfig.chat_template") from None


def _last(history: list[dict], key: str):
    vals = [h[key] for h in history if key in h]
    return float(vals[-1]) if vals else None


def _tokens_per_second(history: list[dict], resumed_step: int, seconds: float) -> float | None:
    marks = [(h.get("step", 0), h["num_tokens"]) for h in history if "num_tokens" in h]
    if not marks or seconds <= 0:
        return None
    before = max((t for s, t in marks if s <= resumed_step), default=0.0)
    return round((marks[-1][1] - before) / seconds, 1)


