"""Kaito's default tuning recipe vs ours, side by side in one run, on this machine (CPU).

Runs on a GPU when there is one (bf16, peak GPU memory reported), else on the CPU.
Same base model (the embedded default, SmolLM2-135M-Instruct, real weights), same data (dolly-like
chat rows: lognormal answer lengths), same method, each variant in its own process so peak memory is
its own. Tokens/s counts the non-pad tokens trained per second of ``trainer.train()`` (TRL's
``num_tokens``), the same definition for both.

- ``kaito``: what Kaito's tuner does with its default template: batch 1, r=8, lora_alpha=8, dropout 0,
  PEFT's default target modules, transformers' DataCollatorForLanguageModeling (loss on every token),
  ``prepare_model_for_kbit_training`` (gradient checkpointing) for QLoRA, ``torch.cuda.empty_cache()``
  after every step (a no-op on CPU).
- ``ours``: ``kaito_tuning.tuner.recipe.train`` with our shipped default config for the method (8 rows per step,
  r=16, the preset's target modules = every linear projection, loss on assistant tokens), i.e. the code
  path of ``kaito-tuning run`` and the Job. On CPU our recipe turns packing and gradient checkpointing
  off (on a GPU it packs with flex_attention; that path needs a GPU to measure).

    .venv/bin/python bench/bench_recipes.py [--methods lora,qlora] [--kaito-steps 48] [--ours-steps 6]

Prints one JSON line per variant and a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS_PER_STEP = 8  # our default: 8 rows per optimizer step (8 x 1 on GPUs, 1 x 8 accumulated on CPUs)
WORDS = ("the a of to and in is that for it as with was on be by this are or from at which an have not can "
         "model data train token layer adapter cluster node image registry python kernel batch memory speed "
         "answer question river mountain city garden music history science water light energy system").split()


def make_data(folder: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    msgs = []
    for _ in range(rows):
        q = sentence(rng.randint(6, 30))
        n = int(min(300, max(8, math.exp(rng.gauss(math.log(60), 0.8)))))
        msgs.append([{"role": "user", "content": q}, {"role": "assistant", "content": sentence(n)}])
    pq.write_table(pa.table({"messages": msgs}), folder / "dolly-like.parquet")


def splits(folder: Path):
    from kaito_tuning.spec.training_config import DatasetConfig
    from kaito_tuning.tuner.formats import prepare
    from kaito_tuning.tuner.inputs import collect_dir

    return prepare(collect_dir(folder), DatasetConfig(train_test_split=1.0))


def run_kaito(method: str, data, steps: int, out: Path) -> dict:
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kaito_tuning.tuner.base_model import load_base

    cuda = torch.cuda.is_available()
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True} \
        if method == "qlora" else None
    model, tok = load_base("smollm2-135m-instruct", quantization=quant,
                           dtype=torch.bfloat16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
    if quant:
        model = prepare_model_for_kbit_training(model)

    class EmptyCache(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=1, save_strategy="no", report_to="none",
                     max_steps=steps, logging_steps=1, use_cpu=not cuda, bf16=cuda, disable_tqdm=True,
                     gradient_checkpointing=bool(quant), ddp_find_unused_parameters=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, processing_class=tok,
                         data_collator=DataCollatorForLanguageModeling(tokenizer=tok, mlm=False),
                         peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"),
                         callbacks=[EmptyCache()])
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    return {"tokens_per_second": round(tokens / seconds, 1), "steps": steps, "samples": steps,
            "tokens": int(tokens), "seconds": round(seconds, 1)}


def run_ours(method: str, data, steps: int, out: Path) -> dict:
    from kaito_tuning.spec.training_config import load_config
    from kaito_tuning.tuner.recipe import train

    result = train(preset="smollm2-135m-instruct", method=method, config=load_config(None, method), data=data,
                   output_dir=out, max_steps=steps, show_progress=False)
    return {"tokens_per_second": result.tokens_per_second, "steps": result.steps,
            "samples": result.steps * DEFAULT_ROWS_PER_STEP,
            "seconds": result.metadata.get("train_seconds")}


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = splits(Path(args.data))
    with tempfile.TemporaryDirectory() as out:
        fn = run_kaito if args.recipe == "kaito" else run_ours
        steps = args.kaito_steps if args.recipe == "kaito" else args.ours_steps
        r = fn(args.method, data, steps, Path(out))
    r.update(recipe=args.recipe, method=args.method,
             peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    import torch

    if torch.cuda.is_available():
        r["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="lora,qlora")
    p.add_argument("--kaito-steps", type=int, default=48)
    p.add_argument("--ours-steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.recipe:
        return child(args)
    results = []
    with tempfile.TemporaryDirectory() as data:
        make_data(Path(data), args.rows)
        for method in args.methods.split(","):
            for recipe in ("kaito", "ours"):
                cmd = [sys.executable, __file__, "--recipe", recipe, "--method", method, "--data", data,
                       "--kaito-steps", str(args.kaito_steps), "--ours-steps", str(args.ours_steps)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{recipe}/{method} failed")
                r = json.loads(line[7:])
                print(json.dumps(r), flush=True)
                results.append(r)
    print("\n| method | recipe | tokens/s | samples | train s | peak RSS GiB | ratio |\n|---|---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        k, o = (next(r for r in results if r["method"] == method and r["recipe"] == x) for x in ("kaito", "ours"))
        for r in (k, o):
            ratio = f"{r['tokens_per_second'] / k['tokens_per_second']:.2f}x"
            print(f"| {method} | {r['recipe']} | {r['tokens_per_second']:,.0f} | {r['samples']} | {r['seconds']} | "
                  f"{r['peak_rss_gib']} | {ratio} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
