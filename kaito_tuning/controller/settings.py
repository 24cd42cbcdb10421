"""Operator settings, read once from environment variables into one frozen dataclass.

Every setting has a default that works on a cluster with bring-your-own GPU nodes; the
operator's Deployment (``operator/deployment.yaml``) sets them explicitly.

=====================================  ==========================================================
KAITO_TUNER_IMAGE                      image of the Job steps and the inference server
KAITO_JOB_ACTIVE_DEADLINE_SECONDS      a tuning Job is stopped after this long (default 2 days)
KAITO_JOB_BACKOFF_LIMIT                retries of a failed pod (user errors are never retried)
KAITO_NODE_AUTO_PROVISIONING           true: create a Karpenter NodeClaim per workspace
KAITO_NODECLAIM_RELEASE                OnCompletion (delete the NodeClaim when the run ends) or
                                       OnDelete (keep it until the workspace is deleted)
KAITO_DENY_PRIVATE_URLS                true (default): dataset URLs on private, loopback, link-local,
                                       CGNAT or metadata addresses are refused at admission, by the
                                       Job's downloader on every hop, and by an egress NetworkPolicy;
                                       false: allowed everywhere (in-cluster dataset servers)
KAITO_CHECKPOINT_STORAGE               true: a PVC per workspace holds the output directory, so a
                                       retried pod resumes from the newest checkpoint
KAITO_CHECKPOINT_STORAGE_CLASS         storage class of that PVC (default: the cluster's default)
KAITO_CHECKPOINT_STORAGE_SIZE          its size (default 100Gi)
KAITO_PROGRESS_POLL_SECONDS            how often a running pod's /progress is read
KAITO_RETRY_DELAY_SECONDS              how long to wait before re-checking a missing ConfigMap,
                                       secret or a node that is not ready yet
KAITO_WEBHOOK_PORT                     port of the admission webhook server (0: no webhook server)
KAITO_WEBHOOK_CERT_DIR                 directory with tls.crt and tls.key for it (the cert-manager
                                       overlay); empty: kopf generates a self-signed certificate
KAITO_WEBHOOK_SERVICE                  namespace/name of the Service in front of the webhook port
                                       (what the API server calls; the generated certificate's name)
KAITO_WEBHOOK_CONFIGURATION            name of the ValidatingWebhookConfiguration the operator
                                       creates and keeps current (caBundle included); empty: it is
                                       declared by hand (operator/cert-manager/)
KAITO_WEBHOOK_INSECURE                 true: plain HTTP on 127.0.0.1 (tests only)
KAITO_LOG_LEVEL                        DEBUG, INFO (default), WARNING or ERROR; the log is JSON lines
KAITO_PRESET_REGISTRY                  Kaito's PRESET_REGISTRY_NAME (e.g. mcr.microsoft.com/aks/kaito):
                                       presets Kaito ships as weights artifacts are pulled from
                                       <registry>/kaito-<model>:<tag> instead of the Hugging Face hub
                                       (no hub access needed); empty (default): the hub.
                                       tuning.preset.presetOptions.image overrides it per workspace
KAITO_ALLOWED_VOLUME_TYPES             comma list of the volume types a workspace may mount (input,
                                       adapters; output: the same less configMap); default:
                                       persistentVolumeClaim,emptyDir,csi,nfs,azureFile,configMap
=====================================  ==========================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from kaito_tuning.artifacts import reference as imageref
from kaito_tuning.errors import UserError
from kaito_tuning.spec.rules import INPUT_VOLUME_TYPES

DEFAULT_TUNER_IMAGE = "ghcr.io/kaito-tuning/tuner:0.1.0"
RELEASE_POLICIES = ("OnCompletion", "OnDelete")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: every volume type of a Kubernetes VolumeSource (what an allow-list may name)
KUBERNETES_VOLUME_TYPES = (
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
    "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath",
    "image", "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume", "projected",
    "quobyte", "rbd", "scaleIO", "secret", "storageos", "vsphereVolume")


@dataclass(frozen=True)
class Settings:
    tuner_image: str = DEFAULT_TUNER_IMAGE
    job_active_deadline_seconds: int = 2 * 24 * 3600
    job_backoff_limit: int = 3
    node_auto_provisioning: bool = False
    nodeclaim_release: str = "OnCompletion"
    deny_private_urls: bool = True  # dataset URLs on private, loopback, CGNAT or metadata addresses (addresses.py)
    checkpoint_storage: bool = False
    checkpoint_storage_class: str | None = None
    checkpoint_storage_size: str = "100Gi"
    progress_poll_seconds: float = 15.0
    retry_delay_seconds: float = 30.0
    webhook_port: int = 0
    webhook_cert_dir: str | None = None
    webhook_service: str | None = None
    webhook_configuration: str | None = None
    webhook_insecure: bool = False
    log_level: str = "INFO"
    allowed_volume_types: str = ",".join(INPUT_VOLUME_TYPES)
    preset_registry: str | None = None

    @property
    def volume_types(self) -> tuple[str, ...]:
        """``allowed_volume_types`` as the tuple ``validate_workspace(volume_types=...)`` takes."""
        return tuple(t.strip() for t in self.allowed_volume_types.split(",") if t.strip())

    def __post_init__(self):
        if self.nodeclaim_release not in RELEASE_POLICIES:
            raise UserError(f"must be one of {', '.join(RELEASE_POLICIES)}, got {self.nodeclaim_release!r}",
                            field="KAITO_NODECLAIM_RELEASE", reason="InvalidSetting")
        for name in ("job_active_deadline_seconds", "progress_poll_seconds", "retry_delay_seconds"):
            if getattr(self, name) <= 0:
                raise UserError(f"must be positive, got {getattr(self, name)}", field=env_name(name),
                                reason="InvalidSetting")
        object.__setattr__(self, "log_level", str(self.log_level).strip().upper())
        if self.log_level not in LOG_LEVELS:
            raise UserError(f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}",
                            field=env_name("log_level"), reason="InvalidSetting")
        if self.webhook_service and (self.webhook_service.count("/") != 1 or not all(self.webhook_service.split("/"))):
            raise UserError(f"must be namespace/name of a Service, got {self.webhook_service!r}",
                            field=env_name("webhook_service"), reason="InvalidSetting")
        if not 0 <= self.webhook_port <= 65535:
            raise UserError(f"must be a port (0: no webhook), got {self.webhook_port}",
                            field=env_name("webhook_port"), reason="InvalidSetting")
        unknown = [t for t in self.volume_types if t not in KUBERNETES_VOLUME_TYPES]
        if unknown or not self.volume_types:
            raise UserError(f"must be a comma list of Kubernetes volume types ({', '.join(INPUT_VOLUME_TYPES)}, ...); "
                            + (f"unknown: {', '.join(unknown)}" if unknown else "it is empty"),
                            field=env_name("allowed_volume_types"), reason="InvalidSetting")
        if self.preset_registry and (why := _registry_problem(self.preset_registry)):
            raise UserError(why, field=env_name("preset_registry"), reason="InvalidSetting")
        if self.job_backoff_limit < 0:
            raise UserError(f"must be 0 or more, got {self.job_backoff_limit}", field=env_name("job_backoff_limit"),
                            reason="InvalidSetting")


def _registry_problem(value: str) -> str | None:
    """Why ``value`` is not a registry host with an optional path (``host[:port][/path]``), or None."""
    try:
        ref = imageref.parse(f"{value.rstrip('/')}/kaito-probe:0")
    except imageref.InvalidReference:
        ref = None
    if ref is None or ref.registry == imageref.DOCKER_HUB and not value.startswith("docker.io"):
        return f"must be a registry host with an optional path, e.g. mcr.microsoft.com/aks/kaito; got {value!r}"
    return None


def env_name(field_name: str) -> str:
    return "KAITO_" + field_name.upper()


def _convert(raw: str, kind: type | str, var: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    if "bool" in kind:
        v = raw.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
        raise UserError(f"must be true or false, got {raw!r}", field=var, reason="InvalidSetting")
    for typ in (int, float):
        if kind.startswith(typ.__name__):
            try:
                return typ(raw)
            except ValueError:
                raise UserError(f"must be {'an integer' if typ is int else 'a number'}, got {raw!r}",
                                field=var, reason="InvalidSetting") from None
    return raw or None if "None" in kind else raw


def from_env(environ: dict[str, str] | None = None) -> Settings:
    """Settings from ``KAITO_*`` variables; unset ones keep their defaults."""
    env = os.environ if environ is None else environ
    values = {}
    for f in fields(Settings):
        var = env_name(f.name)
        if var in env:
            values[f.name] = _convert(env[var], f.type, var)
    return Settings(**values)
