"""``kaito-tuning job download|train|push``: the steps of the tuning Job (docs/design.md, "The tuning Job").

Every step reads the workspace from ``$KAITO_WORKSPACE`` (JSON), does one thing and exits: 0 on
success, the error's exit code otherwise (65 bad input, 66 out of memory: the Job is failed at once;
75 transient and 1 unexpected: the Job retries). The failure reason goes to the termination log
as one line (``Reason: field: message``); the last step writes its JSON result there.

Paths (overridable for tests): ``KAITO_DATA_DIR`` (/mnt/data), ``KAITO_CONFIG_DIR`` (/mnt/config),
``KAITO_OUTPUT_DIR`` (the config's ``output_dir``), ``KAITO_PUSH_AUTH_FILE`` or ``KAITO_PUSH_SECRET``
(/mnt/push-secret/.dockerconfigjson), ``KAITO_PULL_SECRETS_DIR`` (image input credentials, one
``<secret>.json`` per secret), ``KAITO_MODEL_DIR`` (base weights from a directory),
``KAITO_PLAIN_HTTP=1`` (local registries), ``KAITO_PROGRESS_PORT`` (5000; 0 = off).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kaito_tuning.errors import KaitoError, UserError
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, TuningConfig, load_config
from kaito_tuning.spec.workspace import Workspace

log = logging.getLogger(__name__)

DATA_DIR = "/mnt/data"
CONFIG_DIR = "/mnt/config"
PUSH_AUTH_FILE = "/mnt/push-secret/.dockerconfigjson"


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def workspace_from_env() -> Workspace:
    raw = os.environ.get("KAITO_WORKSPACE")
    if not raw:
        raise UserError("is not set: the Job passes the workspace as JSON in this variable", field="KAITO_WORKSPACE")
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise UserError(f"is not valid JSON ({e})", field="KAITO_WORKSPACE") from None
    ws = load_workspace(obj)
    if ws.tuning is None:
        raise UserError("the workspace has no tuning section", field="KAITO_WORKSPACE")
    return ws


def config_from_mount(ws: Workspace) -> TuningConfig:
    path = _env_path("KAITO_CONFIG_DIR", CONFIG_DIR) / CONFIG_KEY
    text = path.read_text() if path.is_file() else None
    if text is None:
        log.info("no %s; using the %s defaults", path, ws.tuning.method)
    return load_config(text, ws.tuning.method, source=str(path))


def output_dir(config: TuningConfig) -> Path:
    return Path(os.environ.get("KAITO_OUTPUT_DIR") or config.output_dir)


def _plain_http() -> bool:
    return os.environ.get("KAITO_PLAIN_HTTP", "").lower() in ("1", "true", "yes")


# ------------------------------------------------------------------ steps

def step_download(ws: Workspace) -> None:
    from kaito_tuning.tuner.inputs import download_urls

    inp = ws.tuning.input
    dest = _env_path("KAITO_DATA_DIR", DATA_DIR)
    if inp.urls:
        files = download_urls(inp.urls, dest)
        log.info("downloaded %d file(s): %s", len(files), ", ".join(f"{f.name} ({f.size} bytes)" for f in files))
    elif inp.image:
        _pull_input_image(inp.image, dest)
    else:
        log.info("input is a volume; nothing to download")


def _pull_input_image(image: str, dest: Path) -> None:
    """Pull the image's /data with each pull secret in turn (anonymously when there is none)."""
    from kaito_tuning.artifacts import RegistryAuthFailed, pull_data

    secrets_dir = os.environ.get("KAITO_PULL_SECRETS_DIR")
    auth_files = sorted(Path(secrets_dir).glob("*.json")) if secrets_dir else []
    failure: KaitoError | None = None
    for auth in auth_files or [None]:
        try:
            pulled = pull_data(image, dest, auth_file=auth, plain_http=_plain_http())
            log.info("pulled %s (%s): %d file(s)", image, pulled.digest, len(pulled.files))
            return
        except RegistryAuthFailed as e:
            log.info("credentials %s rejected for %s", auth, image)
            failure = e
    raise failure


def step_train(ws: Workspace, config: TuningConfig) -> dict:
    from kaito_tuning.tuner.formats import prepare
    from kaito_tuning.tuner.inputs import collect_dir
    from kaito_tuning.tuner.progress import Progress, progress_port
    from kaito_tuning.tuner.recipe import completed_adapter, fingerprint, train

    out = output_dir(config)
    ds_cfg = config.dataset()
    files = collect_dir(_env_path("KAITO_DATA_DIR", DATA_DIR), dataset_path=ds_cfg.dataset_path,
                        extension=ds_cfg.dataset_extension)
    data = prepare(files, ds_cfg)
    done = completed_adapter(out, fingerprint(ws.tuning.preset.name, ws.tuning.method, config, data, None))
    if done:
        log.info("%s already holds the adapter of this run (%s steps); not training again", out, done.get("steps"))
        return {"outputDir": str(out), "steps": done.get("steps"), "trainLoss": done.get("train_loss"),
                "evalLoss": done.get("eval_loss")}
    progress = Progress(out / "progress.json")
    progress.serve(progress_port())
    try:
        r = train(preset=ws.tuning.preset.name, method=ws.tuning.method, config=config, data=data, output_dir=out,
                  model_dir=os.environ.get("KAITO_MODEL_DIR") or None, progress=progress, show_progress=False,
                  workspace=ws.name)
        progress.update(phase="succeeded")
    except BaseException:
        progress.update(phase="failed")
        raise
    finally:
        progress.close()
    return {"outputDir": str(out), "steps": r.steps, "trainLoss": r.train_loss, "evalLoss": r.eval_loss}


def step_push(ws: Workspace, config: TuningConfig) -> dict:
    from kaito_tuning.artifacts import push_adapter
    from kaito_tuning.tuner.recipe import completed_adapter

    out = output_dir(config)
    image = ws.tuning.output.image
    if not image:
        raise UserError("is not set: nothing to push to", field="tuning.output.image")
    if completed_adapter(out) is None:
        raise UserError(f"{out} holds no complete adapter (adapter_config.json, adapter_model.safetensors, "
                        "training_metadata.json): the train step did not finish", field="output", reason="NoAdapter")
    auth = os.environ.get("KAITO_PUSH_AUTH_FILE") or os.environ.get("KAITO_PUSH_SECRET") or PUSH_AUTH_FILE
    pushed = push_adapter(out, image, auth_file=auth if Path(auth).is_file() else None, plain_http=_plain_http(),
                          annotations={"kaito.sh/workspace": ws.name})
    log.info("pushed %s (%s)", pushed.reference, pushed.digest)
    return {"image": pushed.reference, "digest": pushed.digest}


def cli_job(args) -> int:
    from kaito_tuning.tuner.progress import write_termination

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        ws = workspace_from_env()
        if args.step == "download":
            step_download(ws)
            return 0
        config = config_from_mount(ws)
        result = step_train(ws, config) if args.step == "train" else step_push(ws, config)
        write_termination(result)
        return 0
    except KaitoError as e:
        write_termination(e.one_line())
        raise
    except Exception as e:
        write_termination(f"Error: {args.step} step failed: {type(e).__name__}: {e}")
        raise
