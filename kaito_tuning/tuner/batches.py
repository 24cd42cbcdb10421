"""How a batch's rows reach the model: padded to its longest row, or end to end in one row (padding-free),
whichever costs the model fewer FLOPs for that batch.

Padded, every row costs as much as the longest one. End to end, each token is computed once and
``position_ids`` restart at each row; transformers' sdpa and eager masks (``masking_utils``) then keep
each row's attention to itself, at the price of one dense mask over the whole line: attention grows
with the square of the total length. The loss and its gradients are the same either way (TRL's own
padding-free collator drops the labels that would cross from one row into the next), as long as the
model runs without a KV cache (``SFTTrainer.compute_loss`` sets ``use_cache=False``): with one,
transformers does not look for rows in ``position_ids``. Used where
``hardware.row_layout`` says so: a CPU, sdpa or eager, more than one row a step, no packing.
"""

from __future__ import annotations

from collections.abc import Sequence


def padding_free_is_cheaper(lengths: Sequence[int], *, token_flops: float, pair_flops: float) -> bool:
    """Whether rows of these lengths cost fewer FLOPs end to end than padded: ``token_flops`` per token
    (the linear layers), ``pair_flops`` per query-key pair the attention computes."""
    if len(lengths) < 2:
        return False
    longest, total = max(lengths), sum(lengths)
    padded = len(lengths) * longest * (token_flops + longest * pair_flops)
    return total * (token_flops + total * pair_flops) < padded


def model_flops(shape) -> tuple[float, float]:
    """(per token, per query-key pair) forward FLOPs of a ``hardware.ModelShape``: every layer's attention
    projections (4 h², an upper bound with grouped KV heads) and MLP (3 h × intermediate); scores and
    weighted values (4 h per pair). The backward pass scales both alike."""
    h, layers = shape.hidden_size, shape.num_layers
    inner = shape.intermediate_size or 4 * h
    return 2.0 * layers * (4 * h * h + 3 * h * inner), 4.0 * layers * h


class CheaperLayout:
    """A data collator: the trainer's own (TRL's ``DataCollatorForLanguageModeling``, padded) or the same with
    ``padding_free``, batch by batch."""

    def __init__(self, shape, padded):
        import dataclasses

        self.padded, self.free = padded, dataclasses.replace(padded, padding_free=True)
        self.token_flops, self.pair_flops = model_flops(shape)
        self.counts = {"padded": 0, "padding-free": 0}

    def __call__(self, examples, return_tensors=None):
        lengths = [len(e["input_ids"]) for e in examples]
        free = padding_free_is_cheaper(lengths, token_flops=self.token_flops, pair_flops=self.pair_flops)
        self.counts["padding-free" if free else "padded"] += 1
        return (self.free if free else self.padded)(examples, return_tensors)
