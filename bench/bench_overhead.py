"""`kaito-tuning run` vs a minimal plain SFTTrainer script, same recipe, side by side in one run (CPU).

Both train SmolLM2-135M-Instruct (the offline package's weights, fp32) with LoRA r=16, alpha 32,
dropout 0.05 on every linear layer, batch 4 (no accumulation), lr 1e-3 constant, the same max_length and
number of steps, on the same file: the dolly-shaped messages parquet of ``bench_dataprep.py`` (15,011
rows unless ``--rows``; context passages capped at max_length/5 words so that no prompt fills max_length and
both keep every row), rows in file order (our DatasetConfig does not shuffle; both trainers sample with seed
42, so both train on the same batches), no evaluation, no checkpoint. Each runs in its own process, one after
the other:

- ``plain``: the 30-line script a user would write (``Dataset.from_parquet``, ``SFTTrainer``, ``train``,
  ``save_model``), TRL preparing the data itself, in fp32 without gradient checkpointing as our recipe
  trains on a CPU (``plain-defaults``: the same script with TRL's defaults, bf16 autocast and gradient
  checkpointing, several times slower on CPUs without native bf16);
- ``ours``: ``kaito-tuning run WS.yaml --model-dir ... --no-push --no-progress`` with a Workspace whose input is
  a hostPath volume and a ConfigMap with the recipe above.

Reported per variant: steady tokens/s (tokens trained between the first and the last log, logging every 5
steps, TRL's ``num_tokens`` in both), wall time of the whole process and its parts (load: model and tokenizer;
prepare: data preparation and trainer set-up; train; save; other: interpreter start, imports, reading
the file), peak RSS of the process; then the ratios ours / plain.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_overhead.py [--steps 30] [--max-length 512] [--rows 15011]
        [--repeat N]  (N rounds, ABBA order, the median run of each variant in the table)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LOGGING_STEPS = 5

PLAIN = '''
import json, sys, time
t0 = time.monotonic()
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

file, model_dir, out, steps, max_length, lora = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \\
    int(sys.argv[5]), json.loads(sys.argv[6])
marks = []

class Marks(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "num_tokens" in logs:
            marks.append((logs["num_tokens"], time.monotonic()))

t_imports = time.monotonic()
dataset = Dataset.from_parquet(file)
t_read = time.monotonic()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
t_load = time.monotonic()
config = SFTConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                   lr_scheduler_type="constant", max_steps=steps, max_length=max_length, logging_steps=LOGGING,
                   save_strategy="no", report_to="none", use_cpu=True, seed=42, disable_tqdm=True,
                   **json.loads(sys.argv[7]))
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=LoraConfig(task_type="CAUSAL_LM", **lora), callbacks=[Marks()])
t_prep = time.monotonic()
trainer.train()
t_train = time.monotonic()
trainer.save_model(out)
t_save = time.monotonic()
steady = (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1]) if len(marks) > 1 else None
print("RESULT " + json.dumps({"load": t_load - t_read, "prepare": t_prep - t_load, "train": t_train - t_prep,
                              "save": t_save - t_train, "read": t_read - t_imports, "tokens_per_second": steady,
                              "steps": trainer.state.global_step, "tokens": marks[-1][0] if marks else None}))
'''.replace("LOGGING", str(LOGGING_STEPS))


def workspace_yaml(data_dir: Path, steps: int, max_length: int) -> str:
    import yaml

    ws = {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "bench-overhead"},
          "resource": {"instanceType": "Standard_NC24ads_A100_v4",
                       "labelSelector": {"matchLabels": {"app": "bench-overhead"}}},
          "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "bench-overhead",
                     "input": {"volumeSource": {"hostPath": {"path": str(data_dir)}}},
                     "output": {"volumeSource": {"emptyDir": {}}}}}
    sections = {
        "ModelConfig": {},
        "QuantizationConfig": {"load_in_4bit": False},
        "LoraConfig": LORA,
        "TrainingArguments": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                              "learning_rate": 0.001, "lr_scheduler_type": "constant", "max_steps": steps,
                              "max_length": max_length, "logging_steps": LOGGING_STEPS, "save_steps": 10 * steps,
                              "seed": 42},
        "DatasetConfig": {"train_test_split": 1.0, "shuffle_dataset": False},
    }
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bench-overhead"},
          "data": {"training_config.yaml": yaml.safe_dump({"training_config": sections}, sort_keys=False)}}
    return yaml.safe_dump_all([ws, cm], sort_keys=False)


def timed(cmd: list[str], env: dict) -> tuple[float, int, str, str]:
    """(wall seconds, peak RSS bytes, stdout, stderr) of one child process."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return wall, usage.ru_maxrss * 1024, stdout, stderr


#: the plain script's precision and memory settings: ours on a CPU (fp32, no gradient checkpointing); TRL's own
#: defaults (bf16 autocast, gradient checkpointing) are the ``plain-defaults`` variant
MATCHED = {"bf16": False, "gradient_checkpointing": False}


def run_plain(file: Path, model_dir: str, steps: int, max_length: int, env: dict, tmp: Path,
              variant: str = "plain") -> dict:
    script = tmp / "plain_sft.py"
    script.write_text(PLAIN)
    extra = MATCHED if variant == "plain" else {}
    out = tempfile.mkdtemp(prefix=f"{variant}-out-", dir=tmp)  # a fresh one per run
    wall, rss, stdout, _ = timed([sys.executable, str(script), str(file), model_dir, out,
                                  str(steps), str(max_length), json.dumps(LORA), json.dumps(extra)], env)
    res = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])
    return {"variant": variant, "wall": wall, "peak_rss_gib": rss / 2**30, **res}


def run_ours(file: Path, model_dir: str, steps: int, max_length: int, env: dict, tmp: Path) -> dict:
    ws = tmp / "ws.yaml"
    ws.write_text(workspace_yaml(file.parent, steps, max_length))
    out = Path(tempfile.mkdtemp(prefix="ours-out-", dir=tmp))  # a fresh one per run: a finished run is not redone
    cmd = [sys.executable, "-m", "kaito_tuning.cli", "run", str(ws), "--output-dir", str(out), "--model-dir",
           model_dir, "--no-push", "--no-progress"]
    wall, rss, stdout, stderr = timed(cmd, env)
    meta = json.loads((out / "training_metadata.json").read_text())
    progress = json.loads((out / "progress.json").read_text())
    timings = dict(meta["timings"])
    saved = re.search(r"seconds: .*save ([0-9.]+)", stderr)
    timings["save"] = float(saved.group(1)) if saved else None
    return {"variant": "ours", "wall": wall, "peak_rss_gib": rss / 2**30, **timings,
            "tokens_per_second": progress.get("tokens_per_second"), "steps": meta["steps"],
            "tokens": meta.get("tokens_seen"), "data_preparation": meta.get("data_preparation"),
            "layout_batches": (meta.get("hardware") or {}).get("layout_batches")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=None, help="rows of the generated file (default 15,011)")
    ap.add_argument("--file", help="a messages parquet to use instead of the generated one")
    ap.add_argument("--variants", default="plain,ours", help="plain, ours, plain-defaults")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; even rounds run the variants in reverse order (ABBA), medians compared")
    args = ap.parse_args()
    import bench_dataprep

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAITO_PROGRESS_PORT": "0", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        if args.file:
            file = tmp / "data" / Path(args.file).name
            file.parent.mkdir()
            file.symlink_to(Path(args.file).resolve())
        else:
            # contexts capped so that every prompt fits in max_length: both trainers keep every row, in the
            # same order (loss on the answer drops a row whose answer is cut off entirely; loss on every token
            # keeps it), so both train on the same rows and batches
            file = bench_dataprep.make_data(tmp / "data" / "dolly-like.parquet", args.rows or bench_dataprep.ROWS,
                                            max_context_words=args.max_length // 5)
        model_dir = bench_dataprep.smollm2_dir()
        print(f"# uptime: {os.popen('uptime').read().strip()}", flush=True)
        results = []
        order = args.variants.split(",")
        for v in [v for r in range(args.repeat) for v in (order if r % 2 == 0 else order[::-1])]:
            if v == "ours":
                res = run_ours(file, model_dir, args.steps, args.max_length, env, tmp)
            else:
                res = run_plain(file, model_dir, args.steps, args.max_length, env, tmp, v)
            res["other"] = res["wall"] - sum(res.get(k) or 0 for k in ("load", "prepare", "train", "save"))
            print(json.dumps(res), flush=True)
            results.append(res)
        print(f"# uptime: {os.popen('uptime').read().strip()}")
    by = {}  # per variant, the run with the median tokens/s (the only run when --repeat 1)
    for v in dict.fromkeys(r["variant"] for r in results):
        runs = sorted((r for r in results if r["variant"] == v), key=lambda r: r.get("tokens_per_second") or 0)
        by[v] = runs[(len(runs) - 1) // 2]
        if len(runs) > 1:
            print(f"# {v}: tokens/s " + ", ".join(f"{r.get('tokens_per_second') or 0:.1f}" for r in runs)
                  + "; wall s " + ", ".join(f"{r['wall']:.1f}" for r in runs))
    print("\n| variant | steady tokens/s | wall s | load s | prepare s | train s | save s | other s | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in by.values():
        cells = [r.get("tokens_per_second"), r["wall"], r.get("load"), r.get("prepare"), r.get("train"),
                 r.get("save"), r["other"], r["peak_rss_gib"]]
        print(f"| {r['variant']} | " + " | ".join("-" if c is None else f"{c:.1f}" if i < 7 else f"{c:.2f}"
                                                  for i, c in enumerate(cells)) + " |")
    if "plain" in by and "ours" in by:
        p, o = by["plain"], by["ours"]
        print(f"\nours / plain: tokens/s {o['tokens_per_second'] / p['tokens_per_second']:.2f}x (target >= 1.0), "
              f"whole-run wall {o['wall'] / p['wall']:.2f}x (target <= 1.1)")


if __name__ == "__main__":
    main()
