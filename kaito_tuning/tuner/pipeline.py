"""``kaito-tuning run WORKSPACE.yaml``: the whole tuning pipeline on one machine, no Kubernetes.

download → format → train → (push). The same steps the Job runs (``job.py``), in one process:
the Workspace and its ConfigMap (when the file holds one) are validated exactly as the operator
validates them, URLs are downloaded (a ``hostPath`` volume or an input image work too), and the
adapter is written to ``--output-dir`` and pushed to ``tuning.output.image`` unless ``--no-push``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kaito_tuning.errors import UserError
from kaito_tuning.spec.files import load_documents, split_documents
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, TuningConfig, load_config
from kaito_tuning.spec.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    adapter_dir: str
    image: str | None = None
    digest: str | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    steps: int = 0
    loss_curve: str | None = None


def load_spec(docs: list[dict]) -> tuple[Workspace, TuningConfig]:
    """The one tuning Workspace among ``docs`` and its training config (its ConfigMap, else the defaults)."""
    workspaces, configmaps, _ = split_documents(docs)
    if len(workspaces) != 1:
        raise UserError(f"expected exactly one Workspace, found {len(workspaces)}", field="file")
    ws = load_workspace(workspaces[0])
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


def fetch_input(ws: Workspace, data_dir: Path, *, auth_file: str | None = None, plain_http: bool = False) -> Path:
    """Bring the workspace's input to a local directory; return it."""
    from kaito_tuning.tuner.inputs import download_urls

    inp = ws.tuning.input
    if inp.urls:
        download_urls(inp.urls, data_dir)
        return data_dir
    if inp.image:
        from kaito_tuning.artifacts import pull_data

        pull_data(inp.image, data_dir, auth_file=auth_file, plain_http=plain_http)
        return data_dir
    host = (inp.volume_source or {}).get("hostPath", {}).get("path")
    if host:
        return Path(host)
    kinds = ", ".join(inp.volume_source or {}) or "none"
    raise UserError(f"a {kinds} volume cannot be read outside Kubernetes; use urls, an image or a hostPath volume "
                    "for local runs", field="tuning.input.volumeSource")


def run(docs: list[dict], *, output_dir: str | None = None, max_steps: int | None = None,
        model_dir: str | None = None, auth_file: str | None = None, plain_http: bool = False, push: bool = True,
        progress: bool = True, workdir: str | None = None) -> RunResult:
    from kaito_tuning.tuner.formats import prepare
    from kaito_tuning.tuner.inputs import collect_dir
    from kaito_tuning.tuner.progress import Progress
    from kaito_tuning.tuner.recipe import train

    ws, config = load_spec(docs)
    t = ws.tuning
    out = Path(output_dir or f"{ws.name}-adapter").resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = Progress(out / "progress.json")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kaito-run-"))
    try:
        state.update(phase="downloading")
        data_root = fetch_input(ws, work / "data", auth_file=auth_file, plain_http=plain_http)
        ds_cfg = config.dataset()
        files = collect_dir(data_root, dataset_path=ds_cfg.dataset_path, extension=ds_cfg.dataset_extension)
        data = prepare(files, ds_cfg)
        result = train(preset=t.preset.name, method=t.method, config=config, data=data, output_dir=out,
                       model_dir=model_dir, max_steps=max_steps, progress=state, show_progress=progress,
                       workspace=ws.name)
        run_result = RunResult(adapter_dir=result.adapter_dir, train_loss=result.train_loss,
                               eval_loss=result.eval_loss, steps=result.steps, loss_curve=result.loss_curve)
        if t.output.image and push:
            from kaito_tuning.artifacts import push_adapter

            state.update(phase="pushing")
            pushed = push_adapter(result.adapter_dir, t.output.image, auth_file=auth_file, plain_http=plain_http,
                                  annotations={"kaito.sh/workspace": ws.name})
            run_result.image, run_result.digest = _get(pushed, "reference"), _get(pushed, "digest")
        state.update(phase="succeeded")
        return run_result
    except BaseException:
        state.update(phase="failed")
        raise
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def _get(obj, key: str):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key)


def cli_run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(load_documents(args.file), output_dir=args.output_dir, max_steps=args.max_steps,
                 model_dir=args.model_dir, auth_file=args.auth_file, plain_http=args.plain_http,
                 push=not args.no_push, progress=not args.no_progress)
    print(f"adapter: {result.adapter_dir} ({result.steps} steps, train loss {_fmt(result.train_loss)}, "
          f"eval loss {_fmt(result.eval_loss)})")
    if result.image:
        print(f"pushed: {result.image}@{result.digest}")
    return 0


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"
