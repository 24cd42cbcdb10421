"""``kaito-tuning run``: a tuning Workspace file turned into a ``Plan`` on this machine, no Kubernetes.

The file holds the Workspace and, when ``tuning.config`` names one, its ConfigMap; both are
validated exactly as the operator validates them. Inputs: URLs and images are fetched into a
working directory; a ``hostPath`` volume is read where it is (other volume kinds exist only in a
cluster). Then ``pipeline.run`` does what the Job's steps do.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import yaml

from kaito_tuning import contract as c
from kaito_tuning.contract import CONFIG_KEY
from kaito_tuning.errors import (
    EXIT_OUT_OF_MEMORY,
    EXIT_TRANSIENT,
    EXIT_USER_ERROR,
    KaitoError,
    OutOfMemoryError,
    TransientError,
    UserError,
)
from kaito_tuning.spec.files import split_documents
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import TuningConfig, load_config
from kaito_tuning.spec.workspace import Workspace
from kaito_tuning.tuner import distributed
from kaito_tuning.tuner.pipeline import Plan, RunResult, fetch_inputs, make_plan, push_step, run

log = logging.getLogger(__name__)


def load_spec(docs: list[dict]) -> tuple[Workspace, TuningConfig]:
    """The one tuning Workspace among ``docs`` and its training config (its ConfigMap, else the defaults)."""
    workspaces, configmaps, _ = split_documents(docs)
    if len(workspaces) != 1:
        raise UserError(f"expected exactly one Workspace, found {len(workspaces)}", field="file")
    ws = load_workspace(workspaces[0], local=True)  # hostPath input is fine on this machine
    if ws.tuning is None:
        raise UserError("this workspace has no tuning section; `run` trains adapters (use `serve` for inference)",
                        field="tuning")
    name = ws.tuning.config
    text = None
    if name:
        cm = configmaps.get(name)
        if cm is None:
            raise UserError(f"names ConfigMap {name!r}, which is not in the file; add it (data.{CONFIG_KEY}) or "
                            f"remove tuning.config to use the {ws.tuning.method} defaults", field="tuning.config")
        text = (cm.get("data") or {}).get(CONFIG_KEY)
        if text is None:
            raise UserError(f"has no key {CONFIG_KEY!r} under data", field=f"ConfigMap {name}")
    elif configmaps:
        log.warning("ignoring ConfigMap(s) %s: tuning.config does not name one", ", ".join(configmaps))
    return ws, load_config(text, ws.tuning.method, source=f"ConfigMap {name}" if name else CONFIG_KEY)


def input_dir(ws: Workspace, workdir: Path) -> Path:
    """Where the input is read from on this machine."""
    inp = ws.tuning.input
    if inp.urls or inp.image:
        return workdir / "data"
    host = (inp.volume_source or {}).get("hostPath", {}).get("path")
    if host:
        return Path(host)
    kinds = ", ".join(inp.volume_source or {}) or "none"
    raise UserError(f"a {kinds} volume cannot be read outside Kubernetes; use urls, an image or a hostPath volume "
                    "for local runs", field="tuning.input.volumeSource")


def run_local(docs: list[dict], *, output_dir: str | None = None, workdir: str | None = None,
              push: bool = True, show_progress: bool = True, nproc: int = 1, **options) -> RunResult:
    """Run the pipeline for the workspace in ``docs``; ``options`` are ``Plan`` fields (model_dir,
    pull_auth, push_auth, plain_http, max_steps, allow_private_urls, weights_image). ``nproc`` > 1 trains with that
    many processes (torch.distributed), exactly as the Job's train step does on a node with that many GPUs."""
    ws, config = load_spec(docs)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kaito-run-"))
    try:
        out = Path(output_dir or f"{ws.name}-adapter").resolve()
        plan: Plan = make_plan(ws, config, data_dir=input_dir(ws, work), output_dir=out, prefetch_weights=True,
                               **options)
        if nproc > 1:
            return run_distributed(plan, nproc, work, push=push)
        return run(plan, push=push, show_progress=show_progress)
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def run_distributed(plan: Plan, nproc: int, work: Path, *, push: bool = True) -> RunResult:
    """Inputs here, then the Job's own train step as ``nproc`` ranks (torchrun), then the push here."""
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    fetch_inputs(plan)
    config_dir = work / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / c.CONFIG_KEY).write_text(yaml.safe_dump({"training_config": plan.config.sections}))
    termination = work / "termination-log"
    termination.unlink(missing_ok=True)
    env = {c.ENV_WORKSPACE: json.dumps(plan.workspace.to_dict()), c.ENV_CONFIG_DIR: str(config_dir),
           c.ENV_DATA_DIR: str(plan.data_dir), c.ENV_OUTPUT_DIR: str(plan.output_dir),
           c.ENV_MODEL_DIR: plan.model_dir or "", c.ENV_PROGRESS_PORT: "0",
           c.ENV_TERMINATION_LOG: str(termination), c.ENV_MAX_STEPS: str(plan.max_steps or ""), c.ENV_LOCAL_RUN: "1",
           c.ENV_WEIGHTS_IMAGE: plan.weights_image or ""}
    rc = distributed.launch(distributed.Topology(nproc_per_node=nproc), ["job", "train"], env=env)
    told = termination.read_text().strip() if termination.exists() else ""
    if rc != 0:
        raise _failure(rc, told or f"the training processes failed (exit {rc})")
    done = json.loads(told)
    result = RunResult(adapter_dir=str(plan.output_dir), steps=done.get("steps"), train_loss=done.get("trainLoss"),
                       eval_loss=done.get("evalLoss"))
    if push and plan.workspace.tuning.output.image:
        pushed = push_step(plan)
        result.image, result.digest = pushed.reference, pushed.digest
    return result


def _failure(code: int, line: str) -> KaitoError:
    """The ranks' one-line failure as the error it was (its exit code decides whether a Job retries it)."""
    reason, _, message = line.partition(": ")
    cls = {EXIT_USER_ERROR: UserError, EXIT_OUT_OF_MEMORY: OutOfMemoryError, EXIT_TRANSIENT: TransientError}.get(
        code, KaitoError)
    return cls(message or line, reason=reason or None)
