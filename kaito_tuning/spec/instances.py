"""GPU instance types the tuner can run on: GPU count, memory per GPU, bf16 support.

Every SKU of Kaito's tables (``pkg/sku``: Azure, AWS, Azure Arc) plus the V100/T4 sizes Kaito
dropped (the tuner runs fp16 there) and AWS g6e. Memory is per GPU (Kaito's tables give the
instance total), rounded down to whole GiB. Sizes whose accelerators are not NVIDIA GPUs (AMD
Radeon, AWS Trainium and Inferentia) are known, so a Kaito file naming one gets a clear answer,
but refused: the tuner and server run on CUDA.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass

from kaito_tuning.spec.files import short


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu_count: int
    gpu_memory_gib: int  # per GPU
    gpu_model: str
    bf16: bool
    cloud: str
    vendor: str = "nvidia"  # nvidia, amd or aws (Trainium/Inferentia): only nvidia runs here
    aliases: tuple[str, ...] = ()

    @property
    def cuda(self) -> bool:
        return self.vendor == "nvidia"

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
    ("Standard_ND96asr_v4", 8, 40, "A100", True),  # Kaito's table calls it Standard_ND96asr_A100_v4
    ("Standard_ND96amsr_A100_v4", 8, 80, "A100", True),
    ("Standard_NC40ads_H100_v5", 1, 94, "H100 NVL", True),
    ("Standard_NCC40ads_H100_v5", 1, 94, "H100 NVL", True),
    ("Standard_NC80adis_H100_v5", 2, 94, "H100 NVL", True),
    ("Standard_ND96isr_H100_v5", 8, 80, "H100", True),
    ("Standard_ND96isr_H200_v5", 8, 141, "H200", True),
    # Azure Arc (Kaito's arc table)
    ("Standard_NC4_A2", 1, 16, "A2", True),
    ("Standard_NC8_A2", 1, 16, "A2", True),
    ("Standard_NC16_A2", 2, 16, "A2", True),
    ("Standard_NC32_A2", 2, 16, "A2", True),
    ("Standard_NC4_A16", 1, 16, "A16", True),
    ("Standard_NC8_A16", 1, 16, "A16", True),
    ("Standard_NC16_A16", 2, 16, "A16", True),
    ("Standard_NC32_A16", 2, 16, "A16", True),
]
_AZURE_OTHER = [
    ("Standard_NG32ads_V620_v1", 1, 32, "AMD Radeon PRO V620", True, "amd"),
    ("Standard_NG32adms_V620_v1", 1, 32, "AMD Radeon PRO V620", True, "amd"),
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
    ("p5en.48xlarge", 8, 141, "H200", True),
    ("gr6.4xlarge", 1, 24, "L4", True),
    ("gr6.8xlarge", 1, 24, "L4", True),
]
_AWS_OTHER = [
    *[(f"g4ad.{s}", 1, 8, "AMD Radeon Pro V520", False, "amd") for s in ("xlarge", "2xlarge", "4xlarge")],
    ("g4ad.8xlarge", 2, 8, "AMD Radeon Pro V520", False, "amd"),
    ("g4ad.16xlarge", 4, 8, "AMD Radeon Pro V520", False, "amd"),
    ("trn1.2xlarge", 1, 32, "AWS Trainium", True, "aws"),
    ("trn1.32xlarge", 16, 32, "AWS Trainium", True, "aws"),
    ("trn1n.32xlarge", 16, 32, "AWS Trainium", True, "aws"),
    ("inf2.xlarge", 1, 32, "AWS Inferentia2", True, "aws"),
    ("inf2.8xlarge", 1, 32, "AWS Inferentia2", True, "aws"),
    ("inf2.24xlarge", 6, 32, "AWS Inferentia2", True, "aws"),
    ("inf2.48xlarge", 12, 32, "AWS Inferentia2", True, "aws"),
]
#: Kaito's names for sizes Azure spells differently
_ALIASES = {"Standard_ND96asr_A100_v4": "Standard_ND96asr_v4"}

INSTANCE_TYPES: dict[str, InstanceType] = {
    **{n: InstanceType(n, c, m, g, b, "azure") for n, c, m, g, b in _AZURE},
    **{n: InstanceType(n, c, m, g, b, "azure", v) for n, c, m, g, b, v in _AZURE_OTHER},
    **{n: InstanceType(n, c, m, g, b, "aws") for n, c, m, g, b in _AWS},
    **{n: InstanceType(n, c, m, g, b, "aws", v) for n, c, m, g, b, v in _AWS_OTHER},
}
for _alias, _name in _ALIASES.items():
    INSTANCE_TYPES[_name] = dataclasses.replace(INSTANCE_TYPES[_name], aliases=(_alias,))
    INSTANCE_TYPES[_alias] = INSTANCE_TYPES[_name]

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
    shown = short(name, 60)
    if _AZURE_CPU.match(name) or _AWS_CPU.match(name):
        raise UnknownInstanceType(
            f"instance type {shown} has no GPU; tuning needs a GPU instance type such as "
            "Standard_NC24ads_A100_v4 or Standard_NV36ads_A10_v5")
    close = difflib.get_close_matches(name[:60], INSTANCE_TYPES, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `kaito-tuning instances` for the list"
    raise UnknownInstanceType(f"unknown instance type {shown}{hint}")


def fitting(min_gpu_memory_gib: float, limit: int = 4) -> list[InstanceType]:
    """The smallest instance types whose single GPU holds ``min_gpu_memory_gib``."""
    fits = {t.name: t for t in INSTANCE_TYPES.values() if t.cuda and t.gpu_memory_gib >= min_gpu_memory_gib}.values()
    fits = list(fits)
    fits.sort(key=lambda t: (t.gpu_memory_gib, t.gpu_count, t.cloud != "azure", t.name))
    return fits[:limit]
