"""``kaito-tuning crd | presets | instances``: what this build knows."""

from __future__ import annotations

import argparse

from kaito_tuning.spec.crd import crd_yaml
from kaito_tuning.spec.instances import INSTANCE_TYPES
from kaito_tuning.spec.presets import all_presets


def cli_crd(args: argparse.Namespace) -> int:
    print(crd_yaml(), end="")
    return 0


def cli_presets(args: argparse.Namespace) -> int:
    print(f"{'PRESET':30} {'PARAMS':>7} {'CONTEXT':>8} {'METHODS':12} {'GPU GiB lora/qlora':18} SOURCE")
    for p in all_presets().values():
        mem = "/".join(f"{p.gpu_memory_gib[m]:g}" if m in p.gpu_memory_gib else "-" for m in ("lora", "qlora"))
        methods = ",".join(p.methods) or "(inference)"
        print(f"{p.name:30} {p.parameters_b:>6g}B {p.context_length:>8} {methods:12} {mem:18} {p.repo}")
    return 0


def cli_instances(args: argparse.Namespace) -> int:
    print(f"{'INSTANCE TYPE':28} {'GPUS':>4} {'GiB/GPU':>7} {'GPU':10} BF16")
    for key, t in INSTANCE_TYPES.items():
        if key != t.name:
            continue
        note = "" if t.cuda else "  (not NVIDIA: refused)"
        note += f"  (also {', '.join(t.aliases)})" if t.aliases else ""
        print(f"{t.name:28} {t.gpu_count:>4} {t.gpu_memory_gib:>7} {t.gpu_model:10} {'yes' if t.bf16 else 'no'}{note}")
    return 0
