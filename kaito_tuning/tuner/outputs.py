"""What a finished run leaves in its output directory, and how it gets there.

The adapter (``adapter_model.safetensors``, ``adapter_config.json``), the tokenizer, the training
metadata, a model card and the loss curve are staged in a temporary directory, fsynced, and moved
into place with ``adapter_config.json`` last: a run that dies never leaves an adapter that looks
complete, and ``completed_adapter`` is how every later step (push, a rerun) recognises a finished one.
Dataset URLs appear only redacted (``kaito_tuning.redact``): these files go into the pushed image.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from kaito_tuning import redact
from kaito_tuning.contract import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, METADATA_FILE
from kaito_tuning.errors import TransientError

LOSS_CURVE = "loss_curve.png"
MODEL_CARD = "README.md"


def completed_adapter(out: str | Path, fp: str | None = None) -> dict | None:
    """The metadata of a complete adapter in ``out`` (of run ``fp`` when given), else None."""
    out = Path(out)
    if not all((out / f).is_file() for f in ADAPTER_FILES):
        return None
    try:
        meta = json.loads((out / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if fp is None or meta.get("fingerprint") == fp else None


def clear_adapter(out: Path) -> None:
    """Remove a previous adapter so nothing looks complete until this run has written its own
    (and the staging directories of runs that died while saving)."""
    for stale in out.glob(".adapter-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for name in (ADAPTER_CONFIG, METADATA_FILE, ADAPTER_WEIGHTS):
        (out / name).unlink(missing_ok=True)


def publish(stage: Path, out: Path) -> None:
    """Move the staged files into ``out`` (each fsynced first); ``adapter_config.json`` goes last (it makes
    the adapter loadable), and the directory is fsynced so a crash never leaves a complete-looking adapter."""
    for f in stage.rglob("*"):
        if f.is_file():
            _fsync(f)
    names = sorted(p.name for p in stage.iterdir())
    for name in [n for n in names if n != ADAPTER_CONFIG] + [ADAPTER_CONFIG]:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(stage / name, target)
    stage.rmdir()
    _fsync(out)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_at_source(path: Path, repo: str, revision: str | None) -> None:
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = repo
    cfg["revision"] = revision
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def write_loss_curve(history: list[dict], path: Path) -> bool:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def model_card(meta: dict) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))

    data = "\n".join(f"- `{d['name']}` ({d['size']} bytes, sha256 `{d['sha256'][:16]}…`)"
                     + (f" from {redact.url(d['url'])}" if d.get("url") else "") for d in meta["datasets"])
    return f"""---
base_model: {meta['base_model']}
library_name: peft
tags: [lora, {meta['method']}, kaito-tuning]
---

# {meta.get('workspace') or meta['preset']} — {meta['method'].upper()} adapter for {meta['base_model']}

Trained by kaito-tuning from preset `{meta['preset']}` (base revision `{meta['base_revision']}`).

| | |
|---|---|
| method | {meta['method']} (rank {meta['rank']}, alpha {meta['lora_alpha']}) |
| target modules | {', '.join(meta['target_modules']) if isinstance(meta['target_modules'], list) else meta['target_modules']} |
| loss on | {meta['loss_mask'].replace('_', ' ')} tokens |
| steps | {meta['steps']} (epochs {fmt(meta['epochs'])}) |
| train loss | {fmt(meta['train_loss'])} |
| eval loss | {fmt(meta['initial_eval_loss'])} before → {fmt(meta['eval_loss'])} after |
| tokens/s | {fmt(meta['tokens_per_second'])} |
| rows | {meta['train_rows']} train, {meta['eval_rows']} eval |

## Data

{data}

![loss curve]({LOSS_CURVE})

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("{meta['base_model']}", revision="{meta['base_revision']}")
model = PeftModel.from_pretrained(base, "<this directory>")
```
"""


@contextlib.contextmanager
def disk_full_is_clear(out: Path):
    """A full output volume (checkpoints, the adapter) is one line that says so, not a library's traceback."""
    try:
        yield
    except Exception as e:
        if not _no_space(e):
            raise
        raise TransientError(f"the output volume at {out} is full (no space left on the device); give it more "
                             "space or lower TrainingArguments.save_total_limit", field="output",
                             reason="NoSpaceLeft") from None


def _no_space(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "StorageFull" in text or "code: 28," in text:
            return True
        e = e.__cause__ or e.__context__
    return False
