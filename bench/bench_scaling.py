"""Scaling of the distributed path: 1 process vs N processes (torch.distributed, gloo on CPU), side by side.

Both runs are ``kaito-tuning run`` on the same data, model and global batch (per-device rows ×
accumulation × processes equal), one after the other in this one invocation; each reports the
trainer's tokens/s from its training metadata. Efficiency = (tokens/s with N) / (N × tokens/s with 1):
on a CPU a single process already uses every core, so this measures what the distributed path costs,
not a speed-up (that needs one device per process: a GPU node).

    .venv/bin/python bench/bench_scaling.py --nproc 2 --steps 12

Default model: the embedded SmolLM2-135M-Instruct (offline); ``--model-dir`` takes another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROWS = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 4}]} for i in range(256)]


def write_data(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS), d / "train.parquet")
    return d


def spec(data: Path, per_device: int, accumulation: int) -> list[dict]:
    ws = {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "bench-scaling"},
          "resource": {"instanceType": "Standard_NC24ads_A100_v4", "labelSelector": {"matchLabels": {"app": "b"}}},
          "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "bench",
                     "input": {"volumeSource": {"hostPath": {"path": str(data)}}},
                     "output": {"volumeSource": {"emptyDir": {}}}}}
    cfg = {"training_config": {
        "ModelConfig": {}, "QuantizationConfig": {"load_in_4bit": False},
        "LoraConfig": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "TrainingArguments": {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                              "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "max_length": 128},
        "DataCollator": {}, "DatasetConfig": {"train_test_split": 1.0}}}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bench"},
          "data": {"training_config.yaml": yaml.safe_dump(cfg)}}
    return [ws, cm]


def one_run(work: Path, data: Path, nproc: int, per_device: int, accumulation: int, steps: int, model_dir) -> dict:
    f = work / f"ws-{nproc}.yaml"
    f.write_text(yaml.safe_dump_all(spec(data, per_device, accumulation)))
    out = work / f"out-{nproc}"
    cmd = [sys.executable, "-m", "kaito_tuning.cli", "run", str(f), "--output-dir", str(out), "--max-steps",
           str(steps), "--no-progress", "--nproc", str(nproc)]
    if model_dir:
        cmd += ["--model-dir", model_dir]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    meta = json.loads((out / "training_metadata.json").read_text())
    return {"processes": nproc, "steps": meta["steps"], "tokens_seen": meta["tokens_seen"],
            "tokens_per_second": meta["tokens_per_second"], "train_seconds": meta["train_seconds"],
            "wall_seconds": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--per-device", type=int, default=2)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        work = Path(tmp)
        data = write_data(work)
        load = os.getloadavg()[0]
        single = one_run(work, data, 1, a.per_device, a.nproc, a.steps, a.model_dir)
        multi = one_run(work, data, a.nproc, a.per_device, 1, a.steps, a.model_dir)
    eff = multi["tokens_per_second"] / (a.nproc * single["tokens_per_second"]) if single["tokens_per_second"] else None
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_1min_before": round(load, 2),
              "global_batch": a.per_device * a.nproc, "one": single, "many": multi,
              "throughput_ratio": round(multi["tokens_per_second"] / single["tokens_per_second"], 3),
              "efficiency_per_process": round(eff, 3) if eff else None}
    print(json.dumps(result, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
