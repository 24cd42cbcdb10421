"""Preset models: one YAML per model in ``presets/``, loaded into typed ``Preset`` objects.

A preset is data, not code (torchtune's per-model configs): where the weights come from, which
methods it can be tuned with, which modules LoRA targets, and how much GPU memory that takes.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kaito_tuning.contract import ENV_PRESETS_DIR

METHODS = ("lora", "qlora")


@dataclass(frozen=True)
class Preset:
    name: str
    repo: str
    revision: str
    architecture: str
    model_type: str
    parameters_b: float
    context_length: int
    methods: tuple[str, ...]
    target_modules: tuple[str, ...]
    gpu_memory_gib: dict[str, float]
    chat_template: str = "tokenizer"
    license: str = ""
    gating: str = ""
    offline: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # other names Kaito uses for it (e.g. its tuning table's key)
    weights_image: str = ""  # Kaito's weights artifact, ``kaito-<model>:<tag>``, relative to a preset registry

    def supports(self, method: str) -> bool:
        return method in self.methods

    @property
    def source(self) -> str:
        """``repo@revision``: what ``base_model_name_or_path`` and annotations name."""
        return self.repo


def presets_dir() -> Path:
    env = os.environ.get(ENV_PRESETS_DIR)
    if env:
        return Path(env)
    return Path(__file__).parent / "presets"


def _parse(path: Path) -> Preset:
    d = yaml.safe_load(path.read_text())
    src, tuning = d["source"], d.get("tuning") or {}
    return Preset(
        name=d["name"],
        repo=src["repo"],
        revision=str(src.get("revision", "main")),
        architecture=d["architecture"],
        model_type=d["model_type"],
        parameters_b=float(d["parameters_b"]),
        context_length=int(d["context_length"]),
        methods=tuple(tuning.get("methods") or ()),
        target_modules=tuple(tuning.get("target_modules") or ()),
        gpu_memory_gib={k: float(v) for k, v in (tuning.get("gpu_memory_gib") or {}).items()},
        chat_template=d.get("chat_template", "tokenizer"),
        license=d.get("license", ""),
        gating=d.get("gating", ""),
        offline=src.get("offline") or {},
        aliases=tuple(str(a).lower() for a in d.get("aliases") or ()),
        weights_image=str(src.get("weights_image") or ""),
    )


@functools.cache
def all_presets() -> dict[str, Preset]:
    presets = {}
    for path in sorted(presets_dir().glob("*.yaml")):
        p = _parse(path)
        if p.name != path.stem:
            raise ValueError(f"{path}: name {p.name!r} does not match the file name")
        presets[p.name] = p
    return presets


class UnknownPreset(LookupError):
    pass


def get_preset(name: str, *, purpose: str = "tuning") -> Preset:
    """A preset by its short name, an alias, or its Hugging Face repo id (case-insensitive).

    ``purpose`` (tuning or inference) decides which presets an unknown name's message lists.
    """
    presets = all_presets()
    key = name.strip().lower()
    for p in presets.values():
        if key in (p.name, p.repo.lower(), *p.aliases):
            return p
    candidates = sorted(n for n, p in presets.items() if p.methods or purpose != "tuning")
    close = difflib.get_close_matches(key[:80], candidates, n=3, cutoff=0.5)
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    hint = f"did you mean {', '.join(close)}?" if close else f"{purpose} presets: {', '.join(candidates)}"
    raise UnknownPreset(f"unknown preset {shown}; {hint}")


DEFAULT_PRESET = "smollm2-135m-instruct"


def weights_image(preset: Preset, preset_options: dict | None, registry: str | None) -> str | None:
    """The image the base weights are pulled from, or None for the preset's own source (the hub).

    ``presetOptions.image`` when the workspace gives one; else, when a preset registry is set
    (Kaito's ``PRESET_REGISTRY_NAME``; here ``KAITO_PRESET_REGISTRY``) and Kaito ships the preset's
    weights as an artifact, ``<registry>/<weights_image>`` (e.g. ``mcr.microsoft.com/aks/kaito/
    kaito-phi-4:0.2.0``); else None.
    """
    given = (preset_options or {}).get("image")
    if given:
        return str(given)
    if registry and preset.weights_image:
        return f"{registry.strip().rstrip('/')}/{preset.weights_image}"
    return None
