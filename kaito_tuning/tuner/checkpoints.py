"""Checkpoints of a run: where they live, which run they belong to, and which one to resume from.

Checkpoints go to ``<output_dir>/checkpoints``. A fingerprint of preset, method, config, data digests
and step limit names the run; checkpoints of another run are removed rather than resumed, and a
checkpoint counts only once ``trainer_state.json`` (written last) says it reached its step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from kaito_tuning.contract import ADAPTER_WEIGHTS
from kaito_tuning.spec.training_config import TuningConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def fingerprint(preset: str, method: str, config: TuningConfig, data_digests: list[str], max_steps: int | None) -> str:
    """Identifies a run: checkpoints and adapters of another run are never resumed or reused."""
    doc = {"preset": preset, "method": method, "config": config.sections, "max_steps": max_steps,
           "data": sorted(data_digests)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_checkpoints(ckpt_dir: Path, fp: str) -> Path:
    """The checkpoint directory for run ``fp``; checkpoints of a different run are removed."""
    marker = ckpt_dir / ".fingerprint"
    if ckpt_dir.exists() and (not marker.exists() or marker.read_text().strip() != fp):
        if any(ckpt_dir.glob("checkpoint-*")):
            log.warning("removing checkpoints of a different run (config or data changed) in %s", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp)
    return ckpt_dir


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that was written to the end (trainer_state.json is written last)."""
    found = []
    for d in ckpt_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.rsplit("-", 1)[1])
            state = json.loads((d / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        if state.get("global_step") == step and (d / ADAPTER_WEIGHTS).is_file():
            found.append((step, d))
    return max(found)[1] if found else None


def checkpoint_is_final(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was written at the run's last step (its trainer_state says so)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def restore_final_checkpoint(trainer, checkpoint: Path) -> dict:
    """Load a final checkpoint's adapter weights and trainer state into ``trainer`` (no step is taken)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / ADAPTER_WEIGHTS)))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return {}
