"""The tuner's commands: ``kaito-tuning run`` (the whole pipeline here) and ``kaito-tuning job STEP``."""

from __future__ import annotations

import logging

from kaito_tuning.spec.files import load_documents


def cli_run(args) -> int:
    from kaito_tuning.tuner.local import run_local

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_local(load_documents(args.file), output_dir=args.output_dir, max_steps=args.max_steps, nproc=args.nproc,
                       model_dir=args.model_dir, pull_auth=args.auth_file, push_auth=args.auth_file,
                       plain_http=args.plain_http, allow_private_urls=args.allow_private_urls,
                       weights_image=getattr(args, "weights_image", None),
                       push=not args.no_push, show_progress=not args.no_progress)
    note = " (already trained: not trained again)" if result.already_trained else ""
    print(f"adapter: {result.adapter_dir} ({result.steps} steps, train loss {_fmt(result.train_loss)}, "
          f"eval loss {_fmt(result.eval_loss)}){note}")
    if result.image:
        print(f"pushed: {result.image}@{result.digest}")
    return 0


def cli_job(args) -> int:
    from kaito_tuning.tuner.distributed import Topology
    from kaito_tuning.tuner.job import run_step

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    topo = Topology(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                    rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)
    return run_step(args.step, topo)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"
