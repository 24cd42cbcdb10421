"""More than one training process: torchrun (torch.distributed's elastic launcher) and the rank rules.

One process per GPU of a node (``--nproc-per-node``), on one node or several (``--nnodes``,
``--node-rank``, a c10d rendezvous at node 0's address): the train step re-launches itself under
``python -m torch.distributed.run`` and each rank runs the same train step. The HF Trainer then
trains with DDP (gloo on CPUs, NCCL on GPUs); the global batch is
``per_device_train_batch_size × gradient_accumulation_steps × processes``.

Who does what:

- every rank prepares the same data (deterministically) and trains its shard;
- the first process of each node (``LOCAL_RANK`` 0) prepares that node's output directory, and every
  node keeps its own checkpoints (``save_on_each_node``), so every rank can resume after a restart;
- the first process of all (``RANK`` 0) alone reports progress, writes the adapter, the metadata and
  the termination log (and, in the Job, the push step reads what it wrote).

A rank that dies takes the gang down: torchrun stops the node's other workers at once, and ranks on
other nodes leave their collectives after ``$KAITO_DIST_TIMEOUT_SECONDS`` (default 300 s), so nothing
waits forever; the Job's retry resumes every rank from the newest checkpoint.

The launcher returns the most telling of the ranks' exit codes (65 or 66: do not retry; 75: retry;
137: a rank was killed), so the Job's failure policy sees what happened.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

from kaito_tuning.contract import ENV_PARALLELISM
from kaito_tuning.errors import EXIT_OUT_OF_MEMORY, EXIT_TRANSIENT, EXIT_USER_ERROR, UserError

log = logging.getLogger(__name__)

ENV_DIST_TIMEOUT = "KAITO_DIST_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_S = 300
#: which exit code wins when ranks disagree: the user's error first (the Job must not retry it)
_PRIORITY = (EXIT_USER_ERROR, EXIT_OUT_OF_MEMORY, EXIT_TRANSIENT)


@dataclass(frozen=True)
class Topology:
    """How many training processes, on how many nodes, and where they meet."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0 (several nodes)
    rdzv_id: str = "kaito-tuning"

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# ---- inside a rank

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def nnodes() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))
    return max(1, world_size() // max(1, local))


def is_rank() -> bool:
    """Whether this process is one of several started by torchrun."""
    return "LOCAL_RANK" in os.environ and world_size() > 1


def is_main() -> bool:
    return rank() == 0


def is_node_main() -> bool:
    return local_rank() == 0


def init(on_gpu: bool) -> None:
    """Join the process group (before the Trainer does, so our own barriers work), with a timeout."""
    if not is_rank():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get(ENV_DIST_TIMEOUT) or DEFAULT_TIMEOUT_S))
    if on_gpu:
        import torch

        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
    log.info("rank %d of %d (local rank %d) joined", rank(), world_size(), local_rank())


def barrier() -> None:
    if not is_rank():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# ---- the launcher

def torchrun_argv(topo: Topology, command: list[str]) -> list[str]:
    """``python -m torch.distributed.run … -m kaito_tuning.cli <command>``."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={topo.nproc_per_node}",
            "--max-restarts=0"]
    if topo.nnodes > 1:
        if not topo.rdzv_endpoint:
            raise ValueError("several nodes need a rendezvous endpoint (node 0's host:port)")
        argv += [f"--nnodes={topo.nnodes}", f"--node-rank={topo.node_rank}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={topo.rdzv_endpoint}", f"--rdzv-id={topo.rdzv_id}"]
    else:
        argv += ["--standalone"]
    return [*argv, "-m", "kaito_tuning.cli", *command]


def launch(topo: Topology, command: list[str], *, env: dict[str, str] | None = None) -> int:
    """Run ``kaito-tuning <command>`` as ``topo.nproc_per_node`` ranks of this node; the most telling exit code.

    torchrun's launcher runs in this process (its API, not its command line): a failed gang is then a
    ``ChildFailedError`` whose per-rank exit codes we read, instead of a traceback and exit 1.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = torchrun_argv(topo, command)
    log.info("launching %d process(es) on node %d of %d: torchrun %s", topo.nproc_per_node, topo.node_rank,
             topo.nnodes, " ".join(argv[3:]))
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        run(parse_args(argv[3:]))
        return 0
    except ChildFailedError as e:
        return merge_exit_codes([f.exitcode for f in e.failures.values()])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def merge_exit_codes(rank_codes: list[int]) -> int:
    """The exit code of a failed gang: the most telling one any rank had (65, 66, 75 before the rest);
    a rank killed by a signal counts as 128 + signal, as a shell reports it (137: killed, e.g. out of memory)."""
    codes = [128 - c if c < 0 else c for c in rank_codes if c != 0]
    for code in _PRIORITY:
        if code in codes:
            return code
    return codes[0] if codes else 1


# ---- FSDP: when the operator found the model too large for one GPU (KAITO_PARALLELISM=fsdp, spec/memory.py)

def parallelism(requested: str | None, on_gpu: bool) -> str:
    """The mode this run trains in: the operator's choice (``KAITO_PARALLELISM``), except that FSDP falls back to
    DDP without GPUs. accelerate shards a model only across GPUs (on CPU it sets up DDP whatever it is asked), so
    a CPU run that asked for FSDP says so and trains whole models per process, as it would anyway."""
    mode = (requested or "ddp").strip().lower()
    if mode not in ("ddp", "fsdp"):
        raise UserError(f"{str(requested)[:40]!r} is not a mode: use ddp or fsdp", field=ENV_PARALLELISM)
    if mode == "fsdp" and not on_gpu:
        log.warning("%s=fsdp needs GPUs (accelerate shards models only across GPUs): training with DDP on CPU",
                    ENV_PARALLELISM)
        return "ddp"
    return mode


def fsdp_arguments(mode: str | None, quantized: bool) -> dict:
    """SFTConfig settings that shard the model over every rank (FSDP), or {} for DDP (one whole model per GPU).

    FULL_SHARD over all ranks, wrapped per decoder layer (transformers falls back to the model's
    ``_no_split_modules``; the Trainer wraps LoRA layers apart, so frozen and trainable weights are never
    in one flat parameter); weights read by rank 0 only and broadcast (``cpu_ram_efficient_loading``);
    FSDP's own activation checkpointing instead of the Trainer's (which adds an all-gather per layer);
    checkpoints saved sharded, one file per rank. CPU offload is off: it is never chosen for the user.
    FSDP2 for both methods (transformers deprecates FSDP1); with QLoRA (``quantized``) the 4-bit weights
    can only be sharded when stored in a float dtype: ``fsdp_quantization`` sets that where the model is
    loaded, and nothing here differs.

    Not run on this project's CPU machines (accelerate shards only across GPUs; ``parallelism`` falls back to
    DDP on CPU): only these arguments and the fallback are tested.
    """
    if mode != "fsdp":
        return {}
    config = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "reshard_after_forward": True, "cpu_offload": False, "cpu_ram_efficient_loading": True,
              "activation_checkpointing": True, "state_dict_type": "SHARDED_STATE_DICT"}
    return {"fsdp": True, "fsdp_config": config, "gradient_checkpointing": False}


def fsdp_quantization(mode: str | None, quantization: dict | None, compute_dtype: str) -> dict | None:
    """The QuantizationConfig section for FSDP: ``bnb_4bit_quant_storage`` = the compute dtype, so FSDP can
    shard the 4-bit weights (it shards tensors of one float dtype); unchanged under DDP or when the user set it."""
    if mode != "fsdp" or not quantization or not quantization.get("load_in_4bit"):
        return quantization
    return {"bnb_4bit_quant_storage": compute_dtype, **quantization}
