"""``kaito-tuning run``: a tuning Workspace file turned into a ``Plan`` on this machine, no Kubernetes.

The file holds the Workspace and, when ``tuning.config`` names one, its ConfigMap; both are
validated exactly as the operator validates them. Inputs: URLs and images are fetched into a
working directory; a ``hostPath`` volume is read where it is (other volume kinds exist only in a
cluster). Then ``pipeline.run`` does what the Job's steps do.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from kaito_tuning.contract import CONFIG_KEY
from kaito_tuning.errors import UserError
from kaito_tuning.spec.files import split_documents
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import TuningConfig, load_config
from kaito_tuning.spec.workspace import Workspace
from kaito_tuning.tuner.pipeline import Plan, RunResult, make_plan, run

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
              push: bool = True, show_progress: bool = True, **options) -> RunResult:
    """Run the pipeline for the workspace in ``docs``; ``options`` are ``Plan`` fields (model_dir,
    pull_auth, push_auth, plain_http, max_steps, allow_private_urls)."""
    ws, config = load_spec(docs)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kaito-run-"))
    try:
        out = Path(output_dir or f"{ws.name}-adapter").resolve()
        plan: Plan = make_plan(ws, config, data_dir=input_dir(ws, work), output_dir=out, prefetch_weights=True,
                               **options)
        return run(plan, push=push, show_progress=show_progress)
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
