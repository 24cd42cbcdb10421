"""Training-ready data, fast: row for row what TRL's SFTTrainer would prepare, computed in bulk and cached.

TRL 1.16's ``SFTTrainer._prepare_dataset`` works one row at a time: a Jinja render and a one-text
tokenizer call per row (two for prompt/completion rows), then Python list comprehensions to build the
labels, truncate and filter, each step written back to Arrow row by row. Here the same result
(``input_ids``, ``labels``, and ``seq_lengths`` when packed, in the same order) is computed in bulk:

- every conversation rendered with the same template in one call (``render_jinja_template``);
- every text tokenized in one call of the tokenizer's Rust batch encoder (all cores; offsets only
  when the loss mask needs them);
- prompt/completion chat rows: the rendered prompt and prompt+completion are the same text up to the
  last special token before they differ (``<|im_start|>`` of the generation prompt, say). Tokenizers
  split added tokens out before anything else, so the text before it tokenizes the same in both:
  it is tokenized once, and only the short prompt tail and the completion on their own. Checked
  against whole-text tokenization on the first rows; a tokenizer that disagrees gets whole texts;
- labels, truncation and the filter of rows left without a trained token: numpy on the flat token array;
- packing: TRL's own ``pack_dataset`` (Arrow already).

The trainer then gets ``dataset_kwargs={"skip_prepare_dataset": True}``. A setting this module does not
cover (a tokenizer without a Rust backend, a custom ``dataset_text_field``, ``chat_template_path``, a
per-row ``tools`` column, ...) is left to TRL: ``prepare_for_training`` returns None.

The result is cached under the output directory (``<output_dir>/.cache/dataprep-<key>``), keyed by the
data (file digests and how rows were selected), the tokenizer, the template and every setting that changes
the result, so a restarted pod does not redo it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaito_tuning.tuner.encoding import (
    IGNORE,
    ChatPairsWork,
    Encoder,
    MessagesWork,
    TextPairsWork,
    TextWork,
    drop_unlabelled,
    run_work,
    to_table,
    token_count,
    truncate,
)

log = logging.getLogger(__name__)

#: bump when what this module produces changes: part of the cache key
VERSION = 1
CACHE_PREFIX = "dataprep-"


@dataclass
class Prepared:
    """Tokenized, masked (and truncated or packed) train/eval datasets for ``skip_prepare_dataset``."""

    train: Any  # datasets.Dataset: input_ids, labels[, seq_lengths]
    eval: Any | None
    key: str
    cached: bool
    seconds: float
    tokens: int  # tokens in the train dataset


# ------------------------------------------------------------------ entry point

def prepare_for_training(data, tokenizer, args, *, loss_mask: str, cache_dir: str | Path | None = None,
                         key_extra: str = "") -> Prepared | None:
    """What ``SFTTrainer(args=args, processing_class=tokenizer)`` would make of ``data`` (a ``formats.Splits``),
    or None where TRL must prepare it itself. ``loss_mask`` is the recipe's choice (``recipe.loss_mask_for``):
    ``completion_only`` on chat data means the last assistant turn is the completion."""
    t0 = time.monotonic()
    why = unsupported(data, tokenizer, args)
    if why:
        log.info("data preparation left to TRL: %s", why)
        return None
    template = training_template(tokenizer, args) if data.form != "text" else None
    key = cache_key(data, tokenizer, args, loss_mask, template, key_extra)
    entry = Path(cache_dir) / f"{CACHE_PREFIX}{key[:24]}" if cache_dir else None
    if entry is not None:
        hit = _load(entry, key)
        if hit is not None:
            train, eval_ = hit
            log.info("prepared data from the cache (%s): %d train rows", entry, len(train))
            return Prepared(train=train, eval=eval_, key=key, cached=True, seconds=time.monotonic() - t0,
                            tokens=token_count(train))
    enc = Encoder(tokenizer)
    train = _prepare_split(data.train, data.form, enc, args, loss_mask, template, args.packing, "train", key)
    eval_ = None
    if data.eval is not None:
        packing = args.packing if args.eval_packing is None else args.eval_packing
        eval_ = _prepare_split(data.eval, data.form, enc, args, loss_mask, template, packing, "eval", key)
    if entry is not None:
        _store(entry, key, train, eval_)
    seconds = time.monotonic() - t0
    tokens = token_count(train)
    log.info("prepared %d train rows (%d tokens) in %.1f s", len(train), tokens, seconds)
    return Prepared(train=train, eval=eval_, key=key, cached=False, seconds=seconds, tokens=tokens)


def unsupported(data, tokenizer, args) -> str | None:
    """Why TRL must prepare this data itself, or None."""
    if getattr(tokenizer, "_tokenizer", None) is None or not hasattr(tokenizer._tokenizer, "encode_batch_fast"):
        return f"{type(tokenizer).__name__} has no Rust tokenizer"
    if getattr(args, "chat_template_path", None):
        return "chat_template_path is set"
    if args.dataset_text_field != "text":
        return f"dataset_text_field is {args.dataset_text_field!r}"
    if args.truncation_mode not in ("keep_start", "keep_end"):
        return f"truncation_mode {args.truncation_mode!r}"
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return "skip_prepare_dataset is already set"
    cols = set(data.train.column_names)
    expected = {"messages": {"messages"}, "prompt_completion": {"prompt", "completion"}, "text": {"text"}}[data.form]
    if cols != expected:
        return f"columns {sorted(cols)}"
    if args.assistant_only_loss and data.form == "text":
        return "assistant_only_loss on text data"
    return None


def training_template(tokenizer, args) -> str:
    """The chat template TRL renders with: a training template with ``{% generation %}`` markers for
    assistant-only loss when the tokenizer's own has none, else the tokenizer's own."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        return get_training_chat_template(tokenizer)
    return tokenizer.get_chat_template(None, None)


# ------------------------------------------------------------------ cache

def cache_key(data, tokenizer, args, loss_mask: str, template: str | None, extra: str = "") -> str:
    import tokenizers
    import transformers
    import trl

    backend = tokenizer._tokenizer
    parts = {
        "version": VERSION, "data": getattr(data, "key", None) or data.digests, "form": data.form,
        "train_rows": len(data.train), "eval_rows": len(data.eval) if data.eval is not None else 0,
        "tokenizer": hashlib.sha256(backend.to_str().encode()).hexdigest(),
        "tokenizer_class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", False),
        "template": template, "loss_mask": loss_mask, "eos": _eos(tokenizer, args),
        **{k: getattr(args, k, None) for k in ("max_length", "truncation_mode", "packing", "packing_strategy",
                                               "eval_packing", "shuffle_dataset", "seed", "dataset_num_proc",
                                               "completion_only_loss", "assistant_only_loss")},
        "libraries": [trl.__version__, transformers.__version__, tokenizers.__version__], "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _load(entry: Path, key: str):
    from datasets import Dataset

    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("key") != key:
            return None
        train = Dataset.from_file(str(entry / "train.arrow"))
        eval_ = Dataset.from_file(str(entry / "eval.arrow")) if meta.get("eval") else None
        return train, eval_
    except (OSError, ValueError, KeyError) as e:
        if entry.exists():
            log.warning("ignoring an unreadable data cache at %s (%s)", entry, e)
        return None


def _store(entry: Path, key: str, train, eval_) -> None:
    """Write the entry beside its final place and rename it there (a crash never leaves half an entry);
    older entries of the same directory are removed (a changed config makes them dead weight)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".{entry.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_arrow(train, tmp / "train.arrow")
        if eval_ is not None:
            _write_arrow(eval_, tmp / "eval.arrow")
        (tmp / "meta.json").write_text(json.dumps({"key": key, "version": VERSION, "eval": eval_ is not None}))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        for old in entry.parent.glob(f"{CACHE_PREFIX}*"):
            if old != entry:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a cache that cannot be written costs the next run time, not this one its result
        log.warning("could not cache the prepared data at %s: %s", entry, e)


def _write_arrow(ds, path: Path) -> None:
    """One Arrow stream file (what ``Dataset.from_file`` memory-maps), rows in the dataset's order."""
    import pyarrow as pa

    table = ds.with_format("arrow")[:] if len(ds) else ds.data.table.slice(0, 0)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


# ------------------------------------------------------------------ one split

def _prepare_split(ds, form: str, enc: Encoder, args, loss_mask: str, template: str | None, packing: bool,
                   name: str, key: str):
    from datasets import Dataset

    completion_only = args.completion_only_loss
    eos = _eos(enc.tokenizer, args)
    # tokens past max_length are dropped (truncation keeping the start, or bfd packing): long texts are cut first
    keeps_start = (args.truncation_mode == "keep_start") if not packing else (args.packing_strategy == "bfd")
    cut = args.max_length if args.max_length and keeps_start and enc.prefix_cut_ok() else None
    if form == "messages" and loss_mask != "completion_only":
        work = MessagesWork(enc, _column(ds, "messages"), template, args.assistant_only_loss, name,
                             None if args.assistant_only_loss else cut)
        completion_only = False  # TRL: a language-modeling dataset has no completion mask
    elif form in ("messages", "prompt_completion"):
        if form == "messages":  # the last assistant turn is the completion (templates without generation markers)
            prompts, completions = _last_turn_split(_column(ds, "messages"))
        else:
            prompts, completions = _column(ds, "prompt"), _column(ds, "completion")
        if completion_only is None:
            completion_only = True
        if prompts and isinstance(prompts[0], list):
            work = ChatPairsWork(enc, prompts, completions, template, args.assistant_only_loss, name, cut)
        else:
            completions = [c if c.endswith(eos) else c + eos for c in completions]
            work = TextPairsWork(enc, prompts, completions)
    else:
        work = TextWork(enc, [t if t.endswith(eos) else t + eos for t in _column(ds, "text")], cut)
        completion_only = False
    ids, masks = run_work(work, enc)
    # labels: -100 wherever an applicable mask is 0 (the completion mask only with completion_only_loss)
    keep = np.ones(ids.values.size, dtype=bool)
    if completion_only and "completion" in masks:
        keep &= masks["completion"]
    if "assistant" in masks:
        keep &= masks["assistant"]
    values, labels, lengths = ids.values, np.where(keep, ids.values, IGNORE), ids.lengths
    if args.max_length is not None and not packing:
        values, labels, lengths = truncate(values, labels, lengths, args.max_length, args.truncation_mode)
        values, labels, lengths = drop_unlabelled(values, labels, lengths)
    # the cache key names these rows: datasets need not hash the whole table for a fingerprint (0.3 s for 8 M tokens)
    out = Dataset(to_table(values, labels, lengths), fingerprint=f"{key[:32]}-{name}")
    map_kwargs = {"num_proc": args.dataset_num_proc} if args.dataset_num_proc else {}
    if packing:
        from trl.data_utils import pack_dataset

        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        if args.shuffle_dataset:
            out = out.shuffle(seed=args.seed)
        out = pack_dataset(out, args.max_length, args.packing_strategy, map_kwargs)
    if args.shuffle_dataset:
        out = out.shuffle(seed=args.seed)
    return out


def _column(ds, name: str) -> list:
    """A column as Python values, read through Arrow (with the dataset's row selection applied)."""
    return ds.with_format("arrow")[name].to_pylist()


def _last_turn_split(convs: list[list[dict]]) -> tuple[list, list]:
    prompts, completions = [], []
    for msgs in convs:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:last])
        completions.append([msgs[last]])
    return prompts, completions


def _eos(tokenizer, args) -> str:
    return getattr(args, "eos_token", None) or tokenizer.eos_token
