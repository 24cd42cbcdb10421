"""GPU instance types the tuner can run on: GPU count, memory per GPU, bf16 support.

Azure NC/ND/NV families as used by Kaito, and AWS g5/g6/g6e/p4d/p5. Memory is what the
driver reports as usable, rounded down to whole GiB. V100 and T4 have no bf16: the tuner
computes in fp16 there.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu_count: int
    gpu_memory_gib: int  # per GPU
    gpu_model: str
    bf16: bool
    cloud: str

    @property
    def total_gpu_memory_gib(self) -> int:
        return self.gpu_count * self.gpu_memory_gib


# name, GPUs, GiB per GPU, model, bf16
_AZURE = [
    ("Standard_NC6s_v3", 1, 16, "V100", False),
    ("Standard_NC12s_v3", 2, 16, "V100", False),
    ("Standard_NC24s_v3", 4, 16, "V100", False),
    ("Standard_NC24rs_v3", 4, 16, "V100", False),
    ("Standard_ND40rs_v2", 8, 32, "V100", False),
    ("Standard_NC4as_T4_v3", 1, 16, "T4", False),
    ("Standard_NC8as_T4_v3", 1, 16, "T4", False),
    ("Standard_NC16as_T4_v3", 1, 16, "T4", False),
    ("Standard_NC64as_T4_v3", 4, 16, "T4", False),
    ("Standard_NV6ads_A10_v5", 1, 4, "A10 (1/6)", True),
    ("Standard_NV12ads_A10_v5", 1, 8, "A10 (1/3)", True),
    ("Standard_NV18ads_A10_v5", 1, 12, "A10 (1/2)", True),
    ("Standard_NV36ads_A10_v5", 1, 24, "A10", True),
    ("Standard_NV36adms_A10_v5", 1, 24, "A10", True),
    ("Standard_NV72ads_A10_v5", 2, 24, "A10", True),
    ("Standard_NC24ads_A100_v4", 1, 80, "A100", True),
    ("Standard_NC48ads_A100_v4", 2, 80, "A100", True),
    ("Standard_NC96ads_A100_v4", 4, 80, "A100", True),
    ("Standard_ND96asr_v4", 8, 40, "A100", True),
    ("Standard_ND96amsr_A100_v4", 8, 80, "A100", True),
    ("Standard_NC40ads_H100_v5", 1, 94, "H100 NVL", True),
    ("Standard_NCC40ads_H100_v5", 1, 94, "H100 NVL", True),
    ("Standard_NC80adis_H100_v5", 2, 94, "H100 NVL", True),
    ("Standard_ND96isr_H100_v5", 8, 80, "H100", True),
    ("Standard_ND96isr_H200_v5", 8, 141, "H200", True),
]
_AWS = [
    *[(f"g5.{s}", 1, 24, "A10G", True) for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")],
    ("g5.12xlarge", 4, 24, "A10G", True),
    ("g5.24xlarge", 4, 24, "A10G", True),
    ("g5.48xlarge", 8, 24, "A10G", True),
    *[(f"g6.{s}", 1, 24, "L4", True) for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")],
    ("g6.12xlarge", 4, 24, "L4", True),
    ("g6.24xlarge", 4, 24, "L4", True),
    ("g6.48xlarge", 8, 24, "L4", True),
    *[(f"g6e.{s}", 1, 48, "L40S", True) for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")],
    ("g6e.12xlarge", 4, 48, "L40S", True),
    ("g6e.24xlarge", 4, 48, "L40S", True),
    ("g6e.48xlarge", 8, 48, "L40S", True),
    ("p4d.24xlarge", 8, 40, "A100", True),
    ("p4de.24xlarge", 8, 80, "A100", True),
    ("p5.48xlarge", 8, 80, "H100", True),
    ("p5e.48xlarge", 8, 141, "H200", True),
]

INSTANCE_TYPES: dict[str, InstanceType] = {
    **{n: InstanceType(n, c, m, g, b, "azure") for n, c, m, g, b in _AZURE},
    **{n: InstanceType(n, c, m, g, b, "aws") for n, c, m, g, b in _AWS},
}

# Azure sizes whose family letter is not N, and AWS families without GPUs: known, but GPU-less.
_AZURE_CPU = re.compile(r"^Standard_[A-MO-Z]", re.IGNORECASE)
_AWS_CPU = re.compile(r"^(t[234]g?|m[4-8][a-z]*|c[4-8][a-z]*|r[4-8][a-z]*)\.", re.IGNORECASE)


class UnknownInstanceType(LookupError):
    pass


def get_instance_type(name: str) -> InstanceType:
    """The GPU instance type called ``name``, or UnknownInstanceType with a message that helps."""
    if name in INSTANCE_TYPES:
        return INSTANCE_TYPES[name]
    folded = {k.lower(): v for k, v in INSTANCE_TYPES.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    if _AZURE_CPU.match(name) or _AWS_CPU.match(name):
        raise UnknownInstanceType(
            f"instance type {name!r} has no GPU; tuning needs a GPU instance type such as "
            "Standard_NC24ads_A100_v4 or Standard_NV36ads_A10_v5")
    close = difflib.get_close_matches(name, INSTANCE_TYPES, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `kaito-tuning instances` for the list"
    raise UnknownInstanceType(f"unknown instance type {name!r}{hint}")


def fitting(min_gpu_memory_gib: float, limit: int = 4) -> list[InstanceType]:
    """The smallest instance types whose single GPU holds ``min_gpu_memory_gib``."""
    fits = [t for t in INSTANCE_TYPES.values() if t.gpu_memory_gib >= min_gpu_memory_gib]
    fits.sort(key=lambda t: (t.gpu_memory_gib, t.gpu_count, t.cloud != "azure", t.name))
    return fits[:limit]
