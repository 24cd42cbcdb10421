"""QLoRA of a Phi-3-mini-shaped model on one GPU: our tuner's code path vs Kaito's default recipe, one run.

Issue #3, last paragraph. Random weights (throughput and memory do not depend on weight values), saved
with a Phi-3-style tokenizer (WordLevel, 32,000 words + Phi-3's special tokens at their real ids, trl's
own ``phi3.jinja`` chat template, so assistant-only loss runs as it would on Phi-3's own template).
Data: dolly-like chat rows (OpenAI ``messages``, one user and one assistant turn), total lengths
log-normal with median 200 tokens (mean ~270), clipped to 16..2048, written as parquet.

- ``ours``: ``kaito_tuning.tuner.formats.prepare`` + ``kaito_tuning.tuner.recipe.train(preset="phi-3-mini-128k-instruct",
  method="qlora", config=<shipped qlora default>, model_dir=<the random model>, max_steps=--steps)``,
  i.e. the code path of the Job. Tokens/s: steady state from our own progress callback (trained tokens
  between the first log at step 10 and the last log: flex_attention compile and start-up excluded), and
  ``TrainResult.tokens_per_second`` (the whole ``trainer.train()``, start-up, compile and the final
  checkpoint included). Peak memory: ``torch.cuda.max_memory_allocated()`` over the whole call.
- ``kaito``: ``kaito_default_anchor.py --variants kaito`` (the script behind
  ../shared/reference/gpu-baseline.md: batch 1, no packing, empty_cache every step, r=8, Kaito's phi-3
  target names) for --seconds after 3 warm-up steps. It reuses ``<workdir>/model`` (same config as its own).
Both count every token the model trains over (prompt tokens too), as TRL's ``num_tokens`` does. Each
variant runs in its own process, so its peak memory is its own.

Device command (one H200; budget: the whole run under 8 minutes). Once, on this machine, in the repo root:

    printf '/.bench/\\n/.whl/\\n' >> .git/info/exclude
    mkdir -p .bench && cp ../shared/bench/kaito_default_anchor.py .bench/
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
      --platform manylinux2014_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 \\
      liger-kernel==0.8.5 multiprocess==0.70.19 dill==0.4.1 peft==0.21.2
    # (~46 MiB; xxhash and pandas are already in the GPU image: add xxhash==4.1.0 pandas==3.1.1 only if
    #  `import datasets` fails there. peft is pinned because the image's own version is unknown.)

then ``run`` with ``carry: [".bench", ".whl"]``, ``timeout_s: 560`` and the command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 -m pip install -q --no-deps
      --no-build-isolation -e . ; set -o pipefail; PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3
      bench/bench_gpu_tuner.py --anchor .bench/kaito_default_anchor.py --workdir /tmp/gpubench
      --json-out $OUT/gpu_tuner.jsonl 2>&1 | tee $OUT/log.txt

(one line; the script also puts the repo on ``sys.path``, so the editable install may fail harmlessly).
CPU smoke test (tiny model, hidden 64, 2 layers; numbers mean nothing):

    .venv/bin/python bench/bench_gpu_tuner.py --size tiny --steps 3 --seconds 20
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
PRESET = "phi-3-mini-128k-instruct"
N_PARAMS = {"phi3-mini": 3.82e9, "tiny": 1e6}  # non-embedding parameters, as the anchor's MFU uses
PEAK_TFLOPS = 790.0  # bf16 matmul rate measured on the H200 (gpu-baseline.md)
#: Phi-3's special tokens at their real ids; words fill 3..31999
SPECIAL = {32000: "<|endoftext|>", 32001: "<|assistant|>", 32002: "<|placeholder1|>", 32003: "<|placeholder2|>",
           32004: "<|placeholder3|>", 32005: "<|placeholder4|>", 32006: "<|system|>", 32007: "<|end|>",
           32008: "<|placeholder5|>", 32009: "<|placeholder6|>", 32010: "<|user|>"}
WORDS = range(3, 32000)


def phi3_config(size: str):
    """The anchor's config, field for field, so both variants train the very same model."""
    from transformers import Phi3Config

    shape = (dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32) if size == "phi3-mini" else
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4))
    return Phi3Config(vocab_size=32064, max_position_embeddings=4096, pad_token_id=32000, eos_token_id=32000,
                      bos_token_id=1, tie_word_embeddings=False, **shape)


def build_tokenizer():
    """WordLevel over ``w3``..``w31999`` split on whitespace, Phi-3's special tokens, trl's phi3 template."""
    import trl
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in WORDS}, **{t: i for i, t in SPECIAL.items()}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL.values()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = (Path(trl.__file__).parent / "chat_templates" / "phi3.jinja").read_text()
    return fast


def build_model(model_dir: Path, size: str) -> float:
    """Random bf16 weights + tokenizer in ``model_dir`` (kept when its config already matches); seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = phi3_config(size)
    t0 = time.monotonic()
    existing = model_dir / "config.json"
    if existing.is_file() and (model_dir / "tokenizer.json").is_file():
        old = json.loads(existing.read_text())
        if all(old.get(k) == v for k, v in cfg.to_diff_dict().items() if k not in ("dtype", "torch_dtype",
                                                                                    "transformers_version")):
            return 0.0
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.monotonic() - t0


def make_data(folder: Path, rows: int, seed: int = 0) -> dict:
    """Dolly-like chat rows as parquet: log-normal total length (median 200 tokens), ~1/3 user, ~2/3 answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    overhead = 5  # <|user|> <|end|> <|assistant|> <|end|> eos
    msgs, lengths = [], []
    for _ in range(rows):
        total = int(min(2048, max(16, math.exp(rng.gauss(math.log(200), 0.8)))))
        user = max(3, round((total - overhead) * 0.35))
        answer = max(3, total - overhead - user)
        words = lambda n: " ".join(f"w{rng.choice(WORDS)}" for _ in range(n))  # noqa: E731
        msgs.append([{"role": "user", "content": words(user)}, {"role": "assistant", "content": words(answer)}])
        lengths.append(user + answer + overhead)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"messages": msgs}), folder / "dolly-like.parquet")
    lengths.sort()
    return {"rows": rows, "median_tokens": lengths[rows // 2], "mean_tokens": round(sum(lengths) / rows, 1)}


class Recorder:
    """Stands in for kaito_tuning.tuner.progress.Progress: keeps what our progress callback reports."""

    def __init__(self):
        self.fields: dict = {}
        self.steady_tokens_per_second = None

    def update(self, **fields):
        self.fields.update(fields)
        if fields.get("tokens_per_second") is not None:
            self.steady_tokens_per_second = fields["tokens_per_second"]


def child_ours(args) -> dict:
    """Our code path, in this process."""
    import torch

    from kaito_tuning.spec.training_config import load_config
    from kaito_tuning.tuner.formats import prepare
    from kaito_tuning.tuner.inputs import collect_dir
    from kaito_tuning.tuner.recipe import train

    workdir = Path(args.workdir)
    config = load_config(None, "qlora")
    t0 = time.monotonic()
    data = prepare(collect_dir(workdir / "data"), config.dataset())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rec = Recorder()
    with tempfile.TemporaryDirectory(dir=workdir) as out:
        result = train(preset=PRESET, method="qlora", config=config, data=data, output_dir=out,
                       model_dir=str(workdir / "model"), max_steps=args.steps, progress=rec, show_progress=False)
    meta = result.metadata
    return {"variant": "ours", "tokens_per_s": rec.steady_tokens_per_second,
            "tokens_per_s_whole_run": result.tokens_per_second, "steps": result.steps,
            "train_seconds": meta.get("train_seconds"), "wall_seconds": round(time.monotonic() - t0, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "attn_implementation": meta.get("attn_implementation"), "packing": meta.get("packing"),
            "loss_mask": meta.get("loss_mask"), "dtype": meta.get("dtype"), "rank": meta.get("rank"),
            "train_loss": result.train_loss, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "hardware": meta.get("hardware")}  # the plan: checkpointing, rows x accumulation, estimate, reasons


def last_json(text: str, key: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{") and key in line:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("variant") in ("ours", "kaito"):
                return doc
    return None


def run_child(name: str, cmd: list[str], timeout: float) -> dict:
    t0 = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        sys.stderr.write(tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
        return {"variant": name, "error": f"timed out after {timeout:.0f} s"}
    doc = last_json(proc.stdout, '"variant"')
    if doc is None or "error" in doc or proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        doc = doc or {"variant": name, "error": f"exit {proc.returncode}, no result line"}
    doc["process_seconds"] = round(time.monotonic() - t0, 1)
    return doc


def table(ours: dict, kaito: dict, size: str) -> str:
    n = N_PARAMS[size]

    def cell(v, fmt="{:,.0f}"):
        return "–" if v is None else fmt.format(v)

    base = kaito.get("tokens_per_s")
    rows = ["| recipe | tokens/s (steady) | tokens/s (whole run) | steps | peak GPU memory GiB | MFU (4N) | vs Kaito |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("Kaito default (anchor script)", kaito), ("ours: kaito_tuning.tuner.recipe, qlora default", ours)):
        tps = r.get("tokens_per_s")
        mfu = tps * 4 * n / (PEAK_TFLOPS * 1e12) if tps else None
        ratio = f"{tps / base:.2f}x" if tps and base else "–"
        rows.append(f"| {name} | {cell(tps)} | {cell(r.get('tokens_per_s_whole_run'))} | {cell(r.get('steps'), '{}')} "
                    f"| {cell(r.get('peak_mem_gib'), '{:.1f}')} | {cell(mfu, '{:.1%}')} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("phi3-mini", "tiny"), default="phi3-mini")
    p.add_argument("--steps", type=int, default=60, help="our optimizer steps (8 packs of 1024 tokens each on a GPU)")
    p.add_argument("--seconds", type=float, default=60, help="Kaito's timed seconds, after 3 warm-up steps")
    p.add_argument("--rows", type=int, help="rows of dolly-like data, 5%% held out for eval (default: 4000; tiny: 200)")
    p.add_argument("--workdir", default=None, help="model, data and outputs (default: a temporary directory)")
    p.add_argument("--anchor", default=str(ROOT.parent / "shared" / "bench" / "kaito_default_anchor.py"),
                   help="path of kaito_default_anchor.py (copy it into the repo for a device run)")
    p.add_argument("--json-out", help="also append the result lines to this file")
    p.add_argument("--child", choices=("ours",), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.rows = args.rows or (4000 if args.size == "phi3-mini" else 200)
    if args.child:
        print(json.dumps(child_ours(args), default=str), flush=True)
        return
    if not Path(args.anchor).is_file():
        raise SystemExit(f"--anchor {args.anchor}: no such file; copy ../shared/bench/kaito_default_anchor.py "
                         "into the repo (e.g. .bench/) and name it here")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gpubench-")
        args.workdir = tmp.name
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    lines = [{"event": "model", "size": args.size, "build_seconds": round(build_model(workdir / "model", args.size), 1)},
             {"event": "data", **make_data(workdir / "data", args.rows)}]
    for doc in lines:
        print(json.dumps(doc), flush=True)
    ours = run_child("ours", [sys.executable, __file__, "--child", "ours", "--workdir", str(workdir),
                              "--steps", str(args.steps), "--size", args.size], timeout=330)
    print(json.dumps(ours), flush=True)
    kaito = run_child("kaito", [sys.executable, args.anchor, "--variants", "kaito", "--size", args.size,
                                "--seconds", str(args.seconds), "--workdir", str(workdir),
                                "--rows", str(min(args.rows, 2000))], timeout=args.seconds + 200)
    print(json.dumps(kaito), flush=True)
    done = {"event": "done", "total_seconds": round(time.monotonic() - t_all, 1)}
    print(json.dumps(done), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as fh:
            for doc in (*lines, ours, kaito, done):
                fh.write(json.dumps(doc, default=str) + "\n")
    print("\n" + table(ours, kaito, args.size))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
