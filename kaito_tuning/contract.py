"""The contract between the operator and the tuner: every path, port, label, annotation and env name.

The operator writes these into the Job and the inference Deployment (``controller/manifests.py``);
the tuner's steps and the server read them (``tuner/``, ``serving/``). Both sides import them from
here, so they cannot drift apart. Nothing here imports anything.
"""

from __future__ import annotations

# ---- API group and the names on the objects the operator owns
GROUP = "kaito.sh"
LABEL_WORKSPACE = "kaito.sh/workspace"
LABEL_WORKSPACE_NAMESPACE = "kaito.sh/workspace-namespace"
LABEL_TUNING_METHOD = "kaito.sh/tuning-method"
ANNOTATION_REVISION = "workspace.kaito.io/revision"  # Kaito's own name for it
ANNOTATION_SPEC_HASH = "kaito.sh/spec-hash"
FINALIZER = "kaito.sh/operator"

# ---- mounts inside the tuning pod
MOUNT_ROOT = "/mnt"                      # DatasetConfig.dataset_path is relative to this (as in Kaito)
DATA_DIR = "/mnt/data"                   # the input: downloaded files, an input image's /data, or a volume
CONFIG_DIR = "/mnt/config"               # the training ConfigMap
CONFIG_KEY = "training_config.yaml"      # its key
DEFAULT_OUTPUT_DIR = "/mnt/results"      # TrainingArguments.output_dir unless the ConfigMap says otherwise
ADAPTER_DIR = "/mnt/adapter"             # inference: one directory per adapter
PUSH_SECRET_DIR = "/mnt/push-secret"
PUSH_AUTH_FILE = f"{PUSH_SECRET_DIR}/.dockerconfigjson"
PULL_SECRETS_DIR = "/mnt/pull-secrets"   # one <secret>.json per image pull secret
HF_CACHE_DIR = "/mnt/hf-cache"
WEIGHTS_CACHE_DIR = f"{HF_CACHE_DIR}/weights"  # base weights pulled from an image (beside the hub's cache)
RESERVED_DIRS = (DATA_DIR, CONFIG_DIR, ADAPTER_DIR)
TERMINATION_LOG = "/dev/termination-log"

# ---- ports
PROGRESS_PORT = 5000                     # the train step's GET /progress and /metrics
SERVER_PORT = 5000                       # the inference server

# ---- environment of the Job's containers (each step reads the workspace from KAITO_WORKSPACE)
ENV_WORKSPACE = "KAITO_WORKSPACE"
ENV_DATA_DIR = "KAITO_DATA_DIR"
ENV_CONFIG_DIR = "KAITO_CONFIG_DIR"
ENV_OUTPUT_DIR = "KAITO_OUTPUT_DIR"
ENV_PUSH_AUTH_FILE = "KAITO_PUSH_AUTH_FILE"
ENV_PULL_SECRETS_DIR = "KAITO_PULL_SECRETS_DIR"
ENV_MODEL_DIR = "KAITO_MODEL_DIR"
ENV_PLAIN_HTTP = "KAITO_PLAIN_HTTP"
ENV_PROGRESS_PORT = "KAITO_PROGRESS_PORT"
ENV_TERMINATION_LOG = "KAITO_TERMINATION_LOG"
ENV_CACHE_DIR = "KAITO_CACHE_DIR"
ENV_PRESETS_DIR = "KAITO_PRESETS_DIR"
ENV_MAX_DOWNLOAD_BYTES = "KAITO_MAX_DOWNLOAD_BYTES"
ENV_ALLOW_PRIVATE_URLS = "KAITO_ALLOW_PRIVATE_URLS"  # dataset URLs on private addresses: off unless set
ENV_LOCAL_RUN = "KAITO_LOCAL_RUN"  # the Job's step run by `kaito-tuning run` on the user's machine (hostPath ok)
ENV_MAX_STEPS = "KAITO_MAX_STEPS"  # stop after this many optimizer steps (local runs, tests)
ENV_PREFETCH_WEIGHTS = "KAITO_PREFETCH_WEIGHTS"  # the download step also fills the weights cache (HF_HOME)
ENV_WEIGHTS_IMAGE = "KAITO_WEIGHTS_IMAGE"  # the base weights come from this image (presetOptions.image, ...)
ENV_WEIGHTS_DIR = "KAITO_WEIGHTS_DIR"  # where pulled weights are cached (default $KAITO_CACHE_DIR/weights)
ENV_PRESET_REGISTRY = "KAITO_PRESET_REGISTRY"  # Kaito's PRESET_REGISTRY_NAME: where its weights artifacts are
ENV_PARALLELISM = "KAITO_PARALLELISM"  # ddp or fsdp: how the train step spreads the model over the GPUs (spec/memory.py)

# ---- the adapter directory (what training writes, what is pushed, what serving loads)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA_FILE = "training_metadata.json"
PROGRESS_FILE = "progress.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)

# ---- annotations on a pushed adapter image
IMAGE_ANNOTATION_WORKSPACE = LABEL_WORKSPACE
IMAGE_ANNOTATION_PRESET = "kaito.sh/preset"
IMAGE_ANNOTATION_BASE_MODEL = "kaito.sh/base-model"
IMAGE_ANNOTATION_METHOD = "kaito.sh/method"
IMAGE_ANNOTATION_RANK = "kaito.sh/lora-rank"
IMAGE_ANNOTATION_DATASETS = "kaito.sh/dataset-digests"


def dataset_location(dataset_path: str) -> str:
    """Where ``DatasetConfig.dataset_path`` points inside the pod, as Kaito reads it: relative to ``/mnt``
    (``/data/x.parquet`` and ``data/x.parquet`` are ``/mnt/data/x.parquet``); a path already under
    ``/mnt/`` is taken as it is. The caller checks that the result lies under ``DATA_DIR``."""
    import posixpath

    p = dataset_path.strip()
    if p == MOUNT_ROOT or p.startswith(MOUNT_ROOT + "/"):
        return posixpath.normpath(p)
    return posixpath.normpath(MOUNT_ROOT + "/" + p.lstrip("/"))


def in_data_dir(location: str) -> str | None:
    """``location`` relative to ``DATA_DIR`` ("" for the directory itself), or None when it lies outside."""
    if location == DATA_DIR:
        return ""
    if location.startswith(DATA_DIR + "/"):
        return location[len(DATA_DIR) + 1:]
    return None


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, true, yes, on)."""
    import os

    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
