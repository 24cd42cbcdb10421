"""``kaito-tuning job download|train|push``: one step of the pipeline per container of the tuning Job.

The contract with the operator (``kaito_tuning/contract.py``, docs/design.md "The tuning Job"): the
workspace comes as JSON in ``$KAITO_WORKSPACE``; the training ConfigMap is mounted at
``/mnt/config``; the input is at ``/mnt/data``; the output directory is the config's ``output_dir``.
Each path can be overridden by its ``KAITO_*`` variable (tests, other mounts). The pod's environment
becomes the same ``Plan`` that ``kaito-tuning run`` builds, and the step calls the pipeline.

Every step does one thing and exits: 0 on success, else the error's exit code (65 bad input and
66 out of memory fail the Job at once; 75 transient and 1 unexpected are retried). The failure goes
to the termination log as one redacted line (``Reason: field: message``); the train and push steps
write their JSON result there on success.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kaito_tuning import contract as c
from kaito_tuning import redact
from kaito_tuning.errors import KaitoError, UserError
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import load_config
from kaito_tuning.spec.workspace import Workspace
from kaito_tuning.tuner import distributed, pipeline
from kaito_tuning.tuner.progress import Progress, progress_port, write_termination

log = logging.getLogger(__name__)
STEPS = ("download", "train", "push")


def _path(env: str, default: str) -> Path:
    return Path(os.environ.get(env) or default)


def workspace_from_env() -> Workspace:
    raw = os.environ.get(c.ENV_WORKSPACE)
    if not raw:
        raise UserError("is not set: the Job passes the workspace as JSON in this variable", field=c.ENV_WORKSPACE)
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise UserError(f"is not valid JSON ({e})", field=c.ENV_WORKSPACE) from None
    # a local multi-process run (``kaito-tuning run --nproc``) runs this step on the user's machine
    ws = load_workspace(obj, local=c.env_flag(c.ENV_LOCAL_RUN))
    if ws.tuning is None:
        raise UserError("the workspace has no tuning section", field=c.ENV_WORKSPACE)
    return ws


def plan_from_env() -> pipeline.Plan:
    ws = workspace_from_env()
    path = _path(c.ENV_CONFIG_DIR, c.CONFIG_DIR) / c.CONFIG_KEY
    text = path.read_text() if path.is_file() else None
    if text is None:
        log.info("no %s; using the %s defaults", path, ws.tuning.method)
    config = load_config(text, ws.tuning.method, source=str(path))
    push_auth = os.environ.get(c.ENV_PUSH_AUTH_FILE) or c.PUSH_AUTH_FILE
    pull_auth = os.environ.get(c.ENV_PULL_SECRETS_DIR)
    return pipeline.make_plan(
        ws, config,
        data_dir=_path(c.ENV_DATA_DIR, c.DATA_DIR),
        output_dir=Path(os.environ.get(c.ENV_OUTPUT_DIR) or config.output_dir),
        model_dir=os.environ.get(c.ENV_MODEL_DIR) or None,
        pull_auth=pull_auth if pull_auth and Path(pull_auth).exists() else None,
        push_auth=push_auth if Path(push_auth).is_file() else None,
        plain_http=c.env_flag(c.ENV_PLAIN_HTTP),
        allow_private_urls=c.env_flag(c.ENV_ALLOW_PRIVATE_URLS),
        prefetch_weights=c.env_flag(c.ENV_PREFETCH_WEIGHTS),
        max_steps=int(os.environ[c.ENV_MAX_STEPS]) if os.environ.get(c.ENV_MAX_STEPS) else None,
        weights_image=os.environ.get(c.ENV_WEIGHTS_IMAGE) or None,  # else the workspace's presetOptions.image
    )


def train(plan: pipeline.Plan) -> dict:
    if not distributed.is_main():  # another rank reports progress and results
        return pipeline.train_step(plan, progress=None, show_progress=False).to_dict()
    progress = Progress(plan.output_dir / c.PROGRESS_FILE)
    progress.serve(progress_port())
    try:
        outcome = pipeline.train_step(plan, progress=progress, show_progress=False)
        progress.update(phase="succeeded")
    except BaseException:
        progress.update(phase="failed")
        raise
    finally:
        progress.close()
    return outcome.to_dict()


def run_step(step: str, topology: distributed.Topology | None = None) -> int:
    """Run one step; report its result or failure in the termination log.

    A train step with more than one process (``topology``) re-launches itself under torchrun, once
    per process of this node; each of those runs this function again as one rank.
    """
    topo = topology or distributed.Topology()
    if step == "train" and topo.world_size > 1 and not distributed.is_rank():
        return distributed.launch(topo, ["job", "train"])
    if step == "push" and topo.node_rank != 0:
        log.info("node %d of %d: node 0 pushes the adapter", topo.node_rank, topo.nnodes)
        return 0
    try:
        plan = plan_from_env()
        if step == "download":
            pipeline.fetch_inputs(plan)
            return 0
        if step == "train":
            result = train(plan)
        else:
            pushed = pipeline.push_step(plan)
            result = {"image": pushed.reference, "digest": pushed.digest}
        if distributed.is_main():
            write_termination(result)
        return 0
    except KaitoError as e:
        write_termination(redact.text(e.one_line()))
        raise
    except Exception as e:
        write_termination(redact.text(f"Error: {step} step failed: {type(e).__name__}: {e}"))
        raise
