"""The tuning pipeline, once: inputs → data → weights → train → push.

Both ways of running it go through these functions with the same ``Plan``:

- ``kaito-tuning run WS.yaml`` (``tuner/cli.py``) builds the plan from the file and calls ``run``:
  every step in one process, with a progress bar.
- The operator's Job runs one step per container (``kaito-tuning job download|train|push``);
  ``tuner/job.py`` builds the same plan from the pod's environment and mounts and calls
  ``fetch_inputs``, ``train_step`` or ``push_step``.

The plan is resolved once, at the top (workspace, training config, preset, directories, credentials),
and the steps take it. A step that finds its work already done for this exact run (same preset,
method, config, data digests: the fingerprint) does not do it again: a rerun after a lost pod or a
failed push never retrains a finished adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from kaito_tuning import redact
from kaito_tuning.contract import ENV_PRESET_REGISTRY, LABEL_WORKSPACE, PROGRESS_FILE
from kaito_tuning.errors import UserError
from kaito_tuning.spec.presets import Preset, get_preset, weights_image
from kaito_tuning.spec.training_config import TuningConfig
from kaito_tuning.spec.workspace import Workspace
from kaito_tuning.tuner import distributed
from kaito_tuning.tuner.inputs import DataFile, collect_dir, download_urls
from kaito_tuning.tuner.outputs import completed_adapter, disk_full_is_clear
from kaito_tuning.tuner.progress import Progress

log = logging.getLogger(__name__)

INPUTS_MARKER = ".kaito-inputs-key"  # beside a finished adapter: which run it is (``inputs_key``)


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, resolved once."""

    workspace: Workspace
    config: TuningConfig
    preset: Preset
    data_dir: Path                      # the input files: downloaded here, pulled here, or a mounted volume
    output_dir: Path                    # adapter, checkpoints, progress.json
    model_dir: str | None = None        # base weights from a directory instead of the preset's source
    pull_auth: str | None = None        # docker config.json, or a folder of them, for an input image
    push_auth: str | None = None        # docker config.json for output.image
    plain_http: bool = False            # registries over plain HTTP (local ones)
    max_steps: int | None = None
    allow_private_urls: bool = False    # dataset URLs on loopback/private addresses (local runs, tests)
    prefetch_weights: bool = False      # the input step also makes the base weights local (the Job's download)
    annotations: dict[str, str] = field(default_factory=dict)  # extra annotations on the pushed image
    weights_image: str | None = None    # base weights from this image (presetOptions.image, a preset registry)

    @property
    def name(self) -> str:
        return self.workspace.name

    @property
    def method(self) -> str:
        return self.workspace.tuning.method


def make_plan(ws: Workspace, config: TuningConfig, *, data_dir: str | Path, output_dir: str | Path,
              **options) -> Plan:
    if ws.tuning is None:
        raise UserError("this workspace has no tuning section; `run` trains adapters (use `serve` for inference)",
                        field="tuning")
    preset = get_preset(ws.tuning.preset.name)
    if not options.get("weights_image"):  # given (--weights-image, the Job's env), else as the operator decides
        options["weights_image"] = weights_image(preset, ws.tuning.preset.preset_options,
                                                 os.environ.get(ENV_PRESET_REGISTRY))
    return Plan(workspace=ws, config=config, preset=preset, data_dir=Path(data_dir), output_dir=Path(output_dir),
                **options)


@dataclass
class TrainOutcome:
    output_dir: str
    steps: int | None
    train_loss: float | None
    eval_loss: float | None
    loss_curve: str | None = None
    already_trained: bool = False

    def to_dict(self) -> dict:
        return {"outputDir": self.output_dir, "steps": self.steps, "trainLoss": self.train_loss,
                "evalLoss": self.eval_loss}


@dataclass
class RunResult:
    adapter_dir: str
    steps: int | None = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    loss_curve: str | None = None
    image: str | None = None
    digest: str | None = None
    already_trained: bool = False


# ------------------------------------------------------------------ step 1: inputs (and weights)

def inputs_key(plan: Plan) -> str:
    """Names what a run was asked to do, before any data is read: preset, method, config, step limit and
    the inputs as written (URLs redacted, so a re-signed URL of the same file is the same input)."""
    inp = plan.workspace.tuning.input
    doc = {"preset": plan.preset.name, "method": plan.method, "config": plan.config.sections,
           "max_steps": plan.max_steps, "urls": [redact.url(u) for u in inp.urls or []], "image": inp.image,
           "volume": inp.volume_source}
    if plan.weights_image:  # other base weights: another run (absent otherwise, so older keys still hold)
        doc["weights"] = plan.weights_image
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished(plan: Plan) -> dict | None:
    """The metadata of the adapter this very run already finished in ``plan.output_dir``, else None.
    A retried pod (a failed push, a lost node after training) then neither downloads nor trains again:
    the dataset URLs may have expired by then."""
    done = completed_adapter(plan.output_dir)
    try:
        marker = (plan.output_dir / INPUTS_MARKER).read_text().strip()
    except OSError:
        return None
    return done if done is not None and marker == inputs_key(plan) else None


def fetch_inputs(plan: Plan) -> list[DataFile] | None:
    """Bring the input to ``plan.data_dir``: download the URLs or pull the input image's /data.
    A volume input is already there (mounted in the Job, a hostPath locally): nothing to fetch.
    With ``prefetch_weights`` the base model's weights are made local here too."""
    if finished(plan):
        log.info("%s already holds the finished adapter of this run; not downloading again", plan.output_dir)
        return None
    inp = plan.workspace.tuning.input
    files = None
    if inp.urls:
        files = download_urls(inp.urls, plan.data_dir, allow_private=plan.allow_private_urls)
        log.info("downloaded %d file(s): %s", len(files), ", ".join(f"{f.name} ({f.size} bytes)" for f in files))
    elif inp.image:
        from kaito_tuning.artifacts import pull_data

        pulled = pull_data(inp.image, plan.data_dir, auth_file=plan.pull_auth, plain_http=plan.plain_http)
        log.info("pulled %s (%s): %d file(s)", inp.image, pulled.digest, len(pulled.files))
    else:
        log.info("input is a volume at %s; nothing to fetch", plan.data_dir)
    if plan.prefetch_weights:
        fetch_weights(plan)
    return files


def fetch_weights(plan: Plan) -> Path:
    """The base model's weights as a local directory: downloaded now unless they already are local
    (``ModelConfig.local_files_only: true`` forbids a hub download: then they must be). A weights
    image (``plan.weights_image``) is pulled into the weights cache instead, the hub never asked."""
    from kaito_tuning.tuner.base_model import local_weights, model_dir_from_config

    m = plan.config.model()
    ignored = [k for k in ("proxies", "output_loading_info", "state_dict") if getattr(m, k)]
    if ignored:  # Kaito's ModelConfig passes them to from_pretrained; none changes what is trained here
        log.info("ModelConfig %s: accepted and not used (the hub client reads HTTPS_PROXY itself)", ", ".join(ignored))
    where = local_weights(plan.preset, model_dir=plan.model_dir or model_dir_from_config(m.pretrained_model_name_or_path),
                          local_files_only=m.local_files_only, revision=m.revision, cache_dir=m.cache_dir,
                          force_download=m.force_download, weights_image=plan.weights_image,
                          pull_auth=plan.pull_auth, plain_http=plan.plain_http)
    log.info("base weights of %s at %s", plan.preset.name, where)
    return where


# ------------------------------------------------------------------ step 2: train

def prepare_data(plan: Plan):
    from kaito_tuning.tuner.formats import prepare

    ds_cfg = plan.config.dataset()
    files = collect_dir(plan.data_dir, dataset_path=ds_cfg.dataset_path, extension=ds_cfg.dataset_extension)
    return prepare(files, ds_cfg)


def train_step(plan: Plan, *, progress: Progress | None, show_progress: bool = False) -> TrainOutcome:
    """Train the adapter into ``plan.output_dir``, unless a complete adapter of this very run is there."""
    from kaito_tuning.tuner.checkpoints import fingerprint

    if (done := finished(plan)):  # known before any data is read
        return _already_trained(plan, done)
    weights = fetch_weights(plan)  # a model that cannot be had fails here, before the data is read
    data = prepare_data(plan)
    fp = fingerprint(plan.preset.name, plan.method, plan.config, data.digests, plan.max_steps)
    if (done := completed_adapter(plan.output_dir, fp)):  # the same data, without the marker (a volume input)
        return _already_trained(plan, done)
    from kaito_tuning.tuner.recipe import train

    with disk_full_is_clear(plan.output_dir):
        r = train(preset=plan.preset, method=plan.method, config=plan.config, data=data, output_dir=plan.output_dir,
                  model_dir=str(weights), max_steps=plan.max_steps, progress=progress, show_progress=show_progress,
                  workspace=plan.name)
    if distributed.is_main():
        (plan.output_dir / INPUTS_MARKER).write_text(inputs_key(plan) + "\n")
    return TrainOutcome(output_dir=r.adapter_dir, steps=r.steps, train_loss=r.train_loss, eval_loss=r.eval_loss,
                        loss_curve=r.loss_curve)


def _already_trained(plan: Plan, meta: dict) -> TrainOutcome:
    log.info("%s already holds the adapter of this run (%s steps); not training again", plan.output_dir,
             meta.get("steps"))
    return TrainOutcome(output_dir=str(plan.output_dir), steps=meta.get("steps"), train_loss=meta.get("train_loss"),
                        eval_loss=meta.get("eval_loss"), already_trained=True)


# ------------------------------------------------------------------ step 3: push

def push_step(plan: Plan):
    """Push the finished adapter in ``plan.output_dir`` to ``tuning.output.image``."""
    from kaito_tuning.artifacts import push_adapter

    image = plan.workspace.tuning.output.image
    if not image:
        raise UserError("is not set: nothing to push to", field="tuning.output.image")
    if completed_adapter(plan.output_dir) is None:
        raise UserError(f"{plan.output_dir} holds no complete adapter (adapter_config.json, "
                        "adapter_model.safetensors, training_metadata.json): the train step did not finish",
                        field="output", reason="NoAdapter")
    pushed = push_adapter(plan.output_dir, image, auth_file=plan.push_auth, plain_http=plan.plain_http,
                          annotations={LABEL_WORKSPACE: plan.name, **plan.annotations})
    log.info("pushed %s (%s)", pushed.reference, pushed.digest)
    return pushed


# ------------------------------------------------------------------ all of it, in one process

def run(plan: Plan, *, push: bool = True, show_progress: bool = True) -> RunResult:
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(plan.output_dir / PROGRESS_FILE)
    try:
        progress.update(phase="downloading")
        fetch_inputs(plan)
        trained = train_step(plan, progress=progress, show_progress=show_progress)
        result = RunResult(adapter_dir=str(plan.output_dir), steps=trained.steps, train_loss=trained.train_loss,
                           eval_loss=trained.eval_loss, loss_curve=trained.loss_curve,
                           already_trained=trained.already_trained)
        if push and plan.workspace.tuning.output.image:
            progress.update(phase="pushing")
            pushed = push_step(plan)
            result.image, result.digest = pushed.reference, pushed.digest
        progress.update(phase="succeeded")
        return result
    except BaseException:
        progress.update(phase="failed")
        raise
