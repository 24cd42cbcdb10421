"""What the operator creates for a Workspace, as plain dicts: pure functions, no API calls.

A tuning workspace becomes one ``batch/v1`` Job (the contract is in docs/design.md: steps as
containers, each step exits, user errors are not retried), plus the method's default ConfigMap
when the workspace names none, a Karpenter NodeClaim when auto-provisioning is on, and a PVC for
checkpoints when checkpoint storage is on. An inference workspace becomes a Deployment and a
Service. ``kaito-tuning render FILE`` prints them.

Owner references are not set here: the controller adds them with ``kopf.adopt``.
"""

from __future__ import annotations

import hashlib
import json
import sys

import yaml

from kaito_tuning.contract import (
    ADAPTER_DIR,
    ANNOTATION_REVISION,
    ANNOTATION_SPEC_HASH,
    CONFIG_DIR,
    DATA_DIR,
    ENV_PULL_SECRETS_DIR,
    ENV_PUSH_AUTH_FILE,
    ENV_WORKSPACE,
    HF_CACHE_DIR,
    LABEL_WORKSPACE,
    LABEL_WORKSPACE_NAMESPACE,
    PROGRESS_PORT,
    PULL_SECRETS_DIR,
    PUSH_AUTH_FILE,
    PUSH_SECRET_DIR,
    SERVER_PORT,
)
from kaito_tuning.controller.settings import Settings
from kaito_tuning.errors import EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR, UserError
from kaito_tuning.spec.instances import get_instance_type
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import (
    CONFIG_KEY,
    TuningConfig,
    configmap_manifest,
    default_configmap_name,
    load_config,
)
from kaito_tuning.spec.workspace import Workspace

GPU_RESOURCE = "nvidia.com/gpu"
NODECLAIM_API = "karpenter.sh/v1"
#: taints GPU node pools commonly carry (NVIDIA's, and Kaito's own)
GPU_TOLERATIONS = [
    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
    {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
    {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
]
_UID = 1000
#: SIGKILL's exit code: what a kubelet reports for an OOM-killed container (reason OOMKilled)
EXIT_KILLED = 137
#: rules are matched in order, first match wins. A pod disrupted by the cluster (preemption, eviction,
#: node drain; all killed with 137) is retried without counting; then a user error (65) or an out of
#: memory fails the Job at once: a CUDA OOM caught in Python exits 66 from any step, and a kubelet
#: OOM-kill exits 137 -- counted only on the tuner, the one container whose memory grows with the
#: training settings (a retry would be killed again); the small steps' 137 is retried.
POD_FAILURE_RULES = [
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [EXIT_USER_ERROR, EXIT_OUT_OF_MEMORY]}},
    {"action": "FailJob", "onExitCodes": {"containerName": "tuner", "operator": "In", "values": [EXIT_KILLED]}},
]


# ------------------------------------------------------------------ shared pieces

def workspace_labels(ws: Workspace) -> dict[str, str]:
    return {LABEL_WORKSPACE: ws.name, "app.kubernetes.io/managed-by": "kaito-tuning"}


def spec_hash(ws: Workspace) -> str:
    """SHA-256 (16 hex digits) over what decides a run or a deployment: resource, tuning, inference."""
    d = ws.to_dict()
    material = {k: d.get(k) for k in ("resource", "tuning", "inference")}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def node_affinity(ws: Workspace) -> dict:
    """Required node affinity: every matchLabels entry (as In) and every matchExpression, ANDed."""
    sel = ws.resource.label_selector if ws.resource else None
    exprs = []
    if sel:
        exprs += [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(sel.match_labels.items())]
        for e in sel.match_expressions:
            expr = {"key": e.key, "operator": e.operator}
            if e.operator in ("In", "NotIn"):
                expr["values"] = list(e.values)
            exprs.append(expr)
    if not exprs:
        return {}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": exprs}]}}}


def gpu_count(ws: Workspace) -> int:
    """GPUs of the workspace's instance type (1 when it has none set, as with bring-your-own nodes)."""
    if ws.resource and ws.resource.instance_type:
        return get_instance_type(ws.resource.instance_type).gpu_count
    return 1


def _gpu_pod_spec(ws: Workspace, init_containers: list, containers: list, volumes: list) -> dict:
    """What every pod on the workspace's GPU nodes has: restricted security, node pinning, GPU tolerations."""
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "affinity": node_affinity(ws),
        "tolerations": [dict(t) for t in GPU_TOLERATIONS],
        "initContainers": init_containers,
        "containers": containers,
        "volumes": volumes,
    }


def _pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": _UID, "runAsGroup": _UID, "fsGroup": _UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict:
    """Pod Security "restricted", plus a read-only root filesystem (writable paths are emptyDirs)."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def _container(name: str, image: str, args: list[str], env: list[dict], mounts: list[dict], *,
               resources: dict | None = None) -> dict:
    return {"name": name, "image": image, "command": ["kaito-tuning"], "args": args, "env": env,
         "volumeMounts": mounts, "securityContext": _container_security(),
         "terminationMessagePolicy": "FallbackToLogsOnError",
         "resources": resources or {"requests": {"cpu": "100m", "memory": "256Mi"}}}


def tuner_args(ws: Workspace) -> list[str]:
    """``job train --nproc-per-node G``: one training process per GPU of the node (torchrun, DDP or FSDP)."""
    return ["job", "train", "--nproc-per-node", str(gpu_count(ws))]


def _gpu_resources(ws: Workspace, cpu: str, memory: str) -> dict:
    n = str(gpu_count(ws))
    return {"requests": {"cpu": cpu, "memory": memory, GPU_RESOURCE: n}, "limits": {GPU_RESOURCE: n}}


def _model_env(ws: Workspace, preset) -> list[dict]:
    """HF_TOKEN from presetOptions.modelAccessSecret (gated models), when given."""
    opts = (preset.preset_options or {}) if preset else {}
    secret = opts.get("modelAccessSecret")
    if not secret:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "HF_TOKEN"}}}]


_COMMON_VOLUMES = [
    {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    {"name": "tmp", "emptyDir": {}},
    {"name": "hf-cache", "emptyDir": {}},
]
_COMMON_ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": HF_CACHE_DIR}]
_TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}


def _docker_config_volume(volume: str, secrets: list[str]) -> dict:
    """Each dockerconfigjson secret as ``<secret>.json`` in one read-only projected volume."""
    return {"name": volume, "projected": {"sources": [
        {"secret": {"name": s, "items": [{"key": ".dockerconfigjson", "path": f"{s}.json"}]}} for s in secrets]}}


# ------------------------------------------------------------------ tuning

def config_map_name(ws: Workspace) -> str:
    """The ConfigMap the Job mounts: the workspace's, else the method's default."""
    return ws.tuning.config or default_configmap_name(ws.tuning.method)


def default_configmap(ws: Workspace) -> dict | None:
    """The default ConfigMap copy for the workspace's namespace, or None when it names its own."""
    if ws.tuning is None or ws.tuning.config:
        return None
    return configmap_manifest(ws.tuning.method, ws.namespace)


def checkpoint_pvc_name(ws: Workspace) -> str:
    return f"{ws.name}-checkpoints"


def checkpoint_pvc(ws: Workspace, settings: Settings) -> dict | None:
    """A PVC for the output directory (adapter + checkpoints) of an image-output run, if enabled."""
    if not settings.checkpoint_storage or ws.tuning is None or not ws.tuning.output or not ws.tuning.output.image:
        return None
    spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": settings.checkpoint_storage_size}}}
    if settings.checkpoint_storage_class:
        spec["storageClassName"] = settings.checkpoint_storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": checkpoint_pvc_name(ws), "namespace": ws.namespace, "labels": workspace_labels(ws)},
            "spec": spec}


def tuning_job(ws: Workspace, settings: Settings, config: TuningConfig, *, revision: int = 1) -> dict:
    """The tuning Job (docs/design.md, "The tuning Job")."""
    t = ws.tuning
    inp, out = t.input, t.output
    image = settings.tuner_image
    ws_env = [{"name": ENV_WORKSPACE, "value": json.dumps(_job_workspace(ws), sort_keys=True)}, *_COMMON_ENV]
    output_dir = config.output_dir

    volumes = [*_COMMON_VOLUMES,
               {"name": "config", "configMap": {"name": config_map_name(ws), "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}}]
    if inp.volume_source:
        volumes.append({"name": "data", **inp.volume_source})
    else:
        volumes.append({"name": "data", "emptyDir": {}})
    if out.volume_source:
        volumes.append({"name": "results", **out.volume_source})
    elif (pvc := checkpoint_pvc(ws, settings)):
        volumes.append({"name": "results", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}})
    else:
        volumes.append({"name": "results", "emptyDir": {}})

    init_containers, containers = [], []
    if inp.urls or inp.image:
        mounts = [{"name": "data", "mountPath": DATA_DIR}, _TMP_MOUNT]
        env = list(ws_env)
        if inp.image_pull_secrets:
            volumes.append(_docker_config_volume("pull-secrets", inp.image_pull_secrets))
            mounts.append({"name": "pull-secrets", "mountPath": PULL_SECRETS_DIR, "readOnly": True})
            env.append({"name": ENV_PULL_SECRETS_DIR, "value": PULL_SECRETS_DIR})
        init_containers.append(_container("download", image, ["job", "download"], env, mounts,
                                          resources={"requests": {"cpu": "500m", "memory": "1Gi"}}))

    tuner = _container(
        "tuner", image, tuner_args(ws),
        [*ws_env, {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
         *_model_env(ws, t.preset)],
        [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
         {"name": "data", "mountPath": DATA_DIR, "readOnly": True},
         {"name": "results", "mountPath": output_dir},
         {"name": "dshm", "mountPath": "/dev/shm"},
         {"name": "hf-cache", "mountPath": HF_CACHE_DIR}, _TMP_MOUNT],
        resources=_gpu_resources(ws, cpu="4", memory="16Gi"))
    tuner["ports"] = [{"name": "progress", "containerPort": PROGRESS_PORT, "protocol": "TCP"}]

    if out.image:
        init_containers.append(tuner)
        volumes.append({"name": "push-secret", "secret": {
            "secretName": out.image_push_secret, "items": [{"key": ".dockerconfigjson", "path": ".dockerconfigjson"}]}})
        containers.append(_container(
            "push", image, ["job", "push"],
            [*ws_env, {"name": ENV_PUSH_AUTH_FILE, "value": PUSH_AUTH_FILE}],
            [{"name": "results", "mountPath": output_dir, "readOnly": True},
             {"name": "push-secret", "mountPath": PUSH_SECRET_DIR, "readOnly": True}, _TMP_MOUNT],
            resources={"requests": {"cpu": "250m", "memory": "512Mi"}}))
    else:
        containers.append(tuner)

    labels = workspace_labels(ws)
    return _fresh({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": ws.name, "namespace": ws.namespace, "labels": labels,
                     "annotations": {ANNOTATION_REVISION: str(revision), ANNOTATION_SPEC_HASH: spec_hash(ws)}},
        "spec": {
            "backoffLimit": settings.job_backoff_limit,
            "activeDeadlineSeconds": settings.job_active_deadline_seconds,
            "podFailurePolicy": {"rules": POD_FAILURE_RULES},
            "template": {
                "metadata": {"labels": labels, "annotations": {ANNOTATION_REVISION: str(revision)}},
                "spec": {"restartPolicy": "Never", **_gpu_pod_spec(ws, init_containers, containers, volumes)},
            },
        },
    })


def _fresh(obj: dict) -> dict:
    """A deep copy: no dict is shared between manifests (or printed as a YAML alias)."""
    return json.loads(json.dumps(obj))


def _job_workspace(ws: Workspace) -> dict:
    """What the Job's steps read from $KAITO_WORKSPACE: no status, metadata reduced to name/namespace."""
    d = ws.to_dict()
    d.pop("status", None)
    d.pop("inference", None)
    d["metadata"] = {"name": ws.name, "namespace": ws.namespace}
    return d


def nodeclaim_name(ws: Workspace) -> str:
    digest = hashlib.sha256(f"{ws.namespace}/{ws.name}".encode()).hexdigest()[:8]
    return f"ws-{ws.name[:50]}-{digest}"


def nodeclaim(ws: Workspace) -> dict:
    """A Karpenter NodeClaim for one node of the instance type, labelled with the selector's labels."""
    sel = ws.resource.label_selector
    labels = {**(sel.match_labels if sel else {}), LABEL_WORKSPACE: ws.name, LABEL_WORKSPACE_NAMESPACE: ws.namespace}
    return {
        "apiVersion": NODECLAIM_API,
        "kind": "NodeClaim",
        "metadata": {"name": nodeclaim_name(ws), "labels": labels},
        "spec": {
            "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In",
                              "values": [ws.resource.instance_type]}],
            "taints": [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": "1"}},
            "nodeClassRef": {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"},
        },
    }


# ------------------------------------------------------------------ inference

def adapter_path(name: str) -> str:
    return f"{ADAPTER_DIR}/{name}"


def inference_deployment(ws: Workspace, settings: Settings) -> dict:
    """The server Deployment: image adapters pulled by init containers, volume adapters mounted."""
    inf = ws.inference
    image = settings.tuner_image
    labels = workspace_labels(ws)
    volumes = [*_COMMON_VOLUMES]
    init_containers = []
    server_mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "hf-cache", "mountPath": HF_CACHE_DIR},
                     _TMP_MOUNT]
    args = ["serve", "--preset", inf.preset.name]
    for a in inf.adapters:
        src = a.source
        vol = f"adapter-{src.name}"
        path = adapter_path(src.name)
        args += ["--adapter", f"{path}={a.strength or '1.0'}"]
        if src.volume_source:
            volumes.append({"name": vol, **src.volume_source})
        else:
            volumes.append({"name": vol, "emptyDir": {}})
            pull_args = ["pull", src.image, path]
            mounts = [{"name": vol, "mountPath": path}, _TMP_MOUNT]
            if src.image_pull_secrets:
                # every secret as <secret>.json in one folder; `pull --auth-file FOLDER` merges them
                secret_vol = f"pull-{src.name}"
                volumes.append(_docker_config_volume(secret_vol, src.image_pull_secrets))
                mounts.append({"name": secret_vol, "mountPath": PULL_SECRETS_DIR, "readOnly": True})
                pull_args += ["--auth-file", PULL_SECRETS_DIR]
            init_containers.append(_container(f"pull-{src.name}", image, pull_args, list(_COMMON_ENV), mounts))
        server_mounts.append({"name": vol, "mountPath": path, "readOnly": True})
    args += ["--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    server = _container("server", image, args, [*_COMMON_ENV, *_model_env(ws, inf.preset)], server_mounts,
                        resources=_gpu_resources(ws, cpu="2", memory="8Gi"))
    server["ports"] = [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}]
    server["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                                "failureThreshold": 3}
    server["startupProbe"] = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                              "failureThreshold": 180}
    replicas = ws.resource.count if ws.resource and ws.resource.count else 1
    return _fresh({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": ws.name, "namespace": ws.namespace, "labels": labels,
                     "annotations": {ANNOTATION_SPEC_HASH: spec_hash(ws)}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {LABEL_WORKSPACE: ws.name}},
            "strategy": {"type": "Recreate"},  # GPUs are scarce: do not run old and new side by side
            "template": {
                "metadata": {"labels": labels, "annotations": {ANNOTATION_SPEC_HASH: spec_hash(ws)}},
                "spec": _gpu_pod_spec(ws, init_containers, [server], volumes),
            },
        },
    })


def inference_service(ws: Workspace) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": ws.name, "namespace": ws.namespace, "labels": workspace_labels(ws)},
        "spec": {"type": "ClusterIP", "selector": {LABEL_WORKSPACE: ws.name},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }


# ------------------------------------------------------------------ everything for one workspace

def render(ws: Workspace, settings: Settings, config: TuningConfig | None = None, *, revision: int = 1) -> list[dict]:
    """Every object the operator creates for ``ws`` (``config``: the parsed ConfigMap; default: the method's)."""
    if ws.inference is not None:
        return [inference_deployment(ws, settings), inference_service(ws)]
    objs = []
    if settings.node_auto_provisioning:
        objs.append(nodeclaim(ws))
    if (cm := default_configmap(ws)):
        objs.append(cm)
    if (pvc := checkpoint_pvc(ws, settings)):
        objs.append(pvc)
    cfg = config or load_config(None, ws.tuning.method)
    objs.append(tuning_job(ws, settings, cfg, revision=revision))
    return objs


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's training_config.yaml) as literal blocks."""


_BlockDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def cli_render(args) -> int:
    """``kaito-tuning render FILE``: the manifests as multi-document YAML on stdout."""
    from dataclasses import replace

    from kaito_tuning.controller.settings import from_env
    from kaito_tuning.spec.files import load_documents, split_documents

    docs = load_documents(args.file)
    workspaces, configmaps, _ = split_documents(docs)
    if not workspaces:
        raise UserError("holds no Workspace", field=args.file, reason="InvalidFile")
    settings = from_env()
    if args.tuner_image:
        settings = replace(settings, tuner_image=args.tuner_image)
    out = []
    for obj in workspaces:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        if args.namespace:
            meta["namespace"] = args.namespace
        meta.setdefault("namespace", "default")
        ws = load_workspace(obj)
        config = None
        if ws.tuning and ws.tuning.config:
            cm = configmaps.get(ws.tuning.config)
            if cm is None:
                print(f"# ConfigMap {ws.tuning.config!r} is not in {args.file}; the Job mounts it by name and "
                      "the default settings are assumed for the output directory", file=sys.stderr)
            else:
                text = (cm.get("data") or {}).get(CONFIG_KEY)
                config = load_config(text, ws.tuning.method, source=f"ConfigMap {ws.tuning.config}")
        out += render(ws, settings, config)
    sys.stdout.write(yaml.dump_all(out, Dumper=_BlockDumper, sort_keys=False, width=120))
    return 0

