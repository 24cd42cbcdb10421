"""How a tuning run uses the GPUs it gets: one whole model per GPU (DDP), the model sharded (FSDP), or refused.

The estimate is per training process, from the preset's measured need for the method
(``tuning.gpu_memory_gib`` in the preset YAML: weights, LoRA states, activations at the default
ConfigMap's batch, CUDA context) split into the base weights, which FSDP shards across every GPU of
the run, and the rest, which every GPU holds whole:

    weights  = parameters × bytes per parameter (2 for LoRA's bf16/fp16 weights, 0.55 for QLoRA's 4-bit)
    per GPU  = need                      (DDP: every GPU holds the whole model)
             = weights / GPUs + rest     (FSDP, FULL_SHARD over every GPU of every node)

DDP is chosen when one GPU holds the whole need (it is the faster of the two: no all-gather per
layer), FSDP when it does not but the sharded estimate fits, and the workspace is refused otherwise
(the message names instance types that fit). CPU offload is never chosen: it trades a 3-10x slower
step for memory, a decision left to the user's ConfigMap.

An estimate, not a measurement: a ConfigMap with a much larger batch or ``max_length`` than the
default needs more; the tuner's out-of-memory error (exit 66) names the settings to lower.
"""

from __future__ import annotations

from dataclasses import dataclass

from kaito_tuning.spec.instances import InstanceType
from kaito_tuning.spec.presets import Preset

DDP, FSDP = "ddp", "fsdp"
GIB = 1024 ** 3
#: bytes per parameter of the frozen base weights as loaded for the method
WEIGHT_BYTES = {"lora": 2.0, "qlora": 0.55}
#: what every GPU holds besides its shard of the weights is never estimated below this (CUDA context, buffers)
MIN_REST_GIB = 2.0


@dataclass(frozen=True)
class Parallelism:
    mode: str                 # ddp or fsdp
    reason: str               # one line: the estimate and why this mode, e.g. for kaito.sh/parallelism
    fits: bool = True         # False: neither mode fits (the workspace is refused)
    need_gib: float | None = None        # the single-GPU estimate
    per_gpu_gib: float | None = None     # the estimate per GPU in the chosen mode

    def __str__(self) -> str:
        return f"{self.mode}: {self.reason}"


def _g(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}".rstrip("0").rstrip(".")


def weights_gib(preset: Preset, method: str) -> float:
    return preset.parameters_b * 1e9 * WEIGHT_BYTES.get(method, 2.0) / GIB


def sharded_gib(preset: Preset, method: str, need: float, gpus: int) -> float:
    """The FSDP estimate per GPU when the weights are sharded over ``gpus`` GPUs."""
    w = min(weights_gib(preset, method), need)
    rest = max(need - w, MIN_REST_GIB)
    return w / max(gpus, 1) + rest


def choose(preset: Preset | None, method: str | None, instance: InstanceType | None, nodes: int = 1) -> Parallelism:
    """DDP when one GPU of ``instance`` holds the preset's estimate; FSDP when ``nodes`` × its GPUs do; else not fit."""
    need = preset.gpu_memory_gib.get(method) if preset is not None and method else None
    if instance is None:
        return Parallelism(DDP, "no instanceType: GPU memory unknown; one whole model per GPU", need_gib=need)
    gpus = instance.gpu_count * max(nodes, 1)
    per = instance.gpu_memory_gib
    shape = f"{nodes}x{instance.gpu_count}x{per} GiB" if nodes > 1 else f"{instance.gpu_count}x{per} GiB"
    if not need:
        name = preset.name if preset is not None else "the preset"
        return Parallelism(DDP, f"no memory estimate for {name} with {method}; one whole model per GPU ({shape})")
    if need <= per:
        return Parallelism(DDP, f"{_g(need)} GiB estimate fits one {per} GiB GPU; {gpus} process(es), one whole "
                                f"model each", need_gib=need, per_gpu_gib=need)
    sharded = sharded_gib(preset, method, need, gpus)
    if gpus > 1 and sharded <= per:
        return Parallelism(FSDP, f"{_g(need)} GiB estimate > {per} GiB per GPU; sharded over {gpus} GPUs "
                                 f"({shape}): about {_g(sharded)} GiB per GPU", need_gib=need, per_gpu_gib=sharded)
    why = f"{_g(need)} GiB estimate > {per} GiB per GPU"
    if gpus > 1:
        why += f", and sharded over {gpus} GPUs ({shape}) still about {_g(sharded)} GiB per GPU"
    return Parallelism(FSDP if gpus > 1 else DDP, why, fits=False, need_gib=need, per_gpu_gib=sharded)
