"""What the operator creates for a Workspace, as plain dicts: pure functions, no API calls.

A tuning workspace becomes one ``batch/v1`` Job (the contract is in docs/design.md: steps as
containers, each step exits, user errors are not retried) -- an Indexed Job with a headless
Service when it spans several nodes (``resource.count``) -- plus the Secret holding the workspace
the steps read, the method's default ConfigMap when the workspace names none, a Karpenter NodeClaim
per node when auto-provisioning is on, and a PVC for checkpoints when checkpoint storage is on. An inference workspace becomes a Deployment and a
Service (``inference.py``). ``kaito-tuning render FILE`` prints them (``render.py``).

Owner references are not set here: the controller adds them with ``kopf.adopt``.
"""

from __future__ import annotations

import hashlib
import json
import math

from kaito_tuning.contract import (
    ANNOTATION_REVISION,
    ANNOTATION_SPEC_HASH,
    CONFIG_DIR,
    DATA_DIR,
    ENV_ALLOW_PRIVATE_URLS,
    ENV_PARALLELISM,
    ENV_PREFETCH_WEIGHTS,
    ENV_PULL_SECRETS_DIR,
    ENV_PUSH_AUTH_FILE,
    ENV_WEIGHTS_DIR,
    ENV_WEIGHTS_IMAGE,
    ENV_WORKSPACE,
    HF_CACHE_DIR,
    LABEL_WORKSPACE,
    LABEL_WORKSPACE_NAMESPACE,
    PROGRESS_PORT,
    PULL_SECRETS_DIR,
    PUSH_AUTH_FILE,
    PUSH_SECRET_DIR,
    WEIGHTS_CACHE_DIR,
)
from kaito_tuning.controller.settings import Settings
from kaito_tuning.errors import EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR
from kaito_tuning.spec import memory
from kaito_tuning.spec.instances import get_instance_type
from kaito_tuning.spec.memory import Parallelism
from kaito_tuning.spec.presets import UnknownPreset, get_preset, weights_image
from kaito_tuning.spec.training_config import (
    CONFIG_KEY,
    TuningConfig,
    configmap_manifest,
    default_configmap_name,
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


def base_weights_image(ws: Workspace, settings: Settings) -> str | None:
    """The image the tuning Job (or the inference server) pulls the base weights from (``presetOptions.image``,
    else the operator's preset registry + the preset's Kaito artifact), or None: the preset's own source (the hub)."""
    t = ws.tuning or ws.inference
    if t is None or t.preset is None or not t.preset.name:
        return None
    try:
        preset = get_preset(t.preset.name)
    except UnknownPreset:  # reported at validation
        return None
    return weights_image(preset, t.preset.preset_options, settings.preset_registry)


def weights_pull_secrets(ws: Workspace, settings: Settings) -> list[str]:
    """``presetOptions.imagePullSecrets``, mounted (and so needed) only where the base weights come from an image."""
    part = ws.tuning or ws.inference
    if not base_weights_image(ws, settings):
        return []
    return list((part.preset.preset_options or {}).get("imagePullSecrets") or [])


def _weights_env(image: str | None) -> list[dict]:
    if not image:
        return []
    return [{"name": ENV_WEIGHTS_IMAGE, "value": image}, {"name": ENV_WEIGHTS_DIR, "value": WEIGHTS_CACHE_DIR}]


#: every scratch volume has a size limit (the kubelet evicts a pod that outgrows it, instead of the node's
#: disk or memory filling up): shared memory for the data loader and NCCL, /tmp, the base weights
SIZE_SHM, SIZE_TMP, SIZE_DATA, SIZE_RESULTS, SIZE_ADAPTER = "16Gi", "10Gi", "25Gi", "100Gi", "2Gi"


def _weights_size(preset_name: str | None) -> str:
    """Room for a preset's weights in the Hugging Face cache: 16-bit weights and 20 % more, at least 4 GiB."""
    try:
        params_b = get_preset(preset_name).parameters_b if preset_name else 8.0
    except Exception:  # noqa: BLE001 - an unknown preset was reported at validation
        params_b = 8.0
    return f"{max(4, math.ceil(params_b * 2 * 1.2))}Gi"


def _common_volumes(preset_name: str | None) -> list[dict]:
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SIZE_SHM}},
            {"name": "tmp", "emptyDir": {"sizeLimit": SIZE_TMP}},
            {"name": "hf-cache", "emptyDir": {"sizeLimit": _weights_size(preset_name)}}]
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
    """A PVC for the output directory (adapter + checkpoints) of an image-output run, if enabled.

    Several nodes mount it at once (ReadWriteMany, a storage class that offers it), each node in its own
    subdirectory ``node-<index>`` (``subPathExpr``): every node keeps its own checkpoints, so a retried
    gang resumes every rank; a ReadWriteOnce volume could not follow pods onto several nodes.
    """
    if not settings.checkpoint_storage or ws.tuning is None or not ws.tuning.output or not ws.tuning.output.image:
        return None
    mode = "ReadWriteMany" if node_count(ws) > 1 else "ReadWriteOnce"
    spec = {"accessModes": [mode], "resources": {"requests": {"storage": settings.checkpoint_storage_size}}}
    if settings.checkpoint_storage_class:
        spec["storageClassName"] = settings.checkpoint_storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": checkpoint_pvc_name(ws), "namespace": ws.namespace, "labels": workspace_labels(ws)},
            "spec": spec}


# ------------------------------------------------------------------ several GPUs, several nodes

#: the c10d rendezvous port of node 0's torchrun (torchrun's default)
RDZV_PORT = 29500
#: the Job's annotation (and status.tuning.parallelism): the mode chosen and why (spec/memory.py)
ANNOTATION_PARALLELISM = "kaito.sh/parallelism"
#: set by the Job controller on an Indexed Job's pods (annotation) and declared here as an env var,
#: so ``$(JOB_COMPLETION_INDEX)`` in args and ``subPathExpr`` is expanded by Kubernetes (no shell)
INDEX_ENV = "JOB_COMPLETION_INDEX"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def node_count(ws: Workspace) -> int:
    count = ws.resource.count if ws.resource else 1
    return count if isinstance(count, int) and count > 1 else 1


def workers_service_name(ws: Workspace) -> str:
    """The headless Service that gives node 0 of a multi-node run a DNS name (a tuning workspace has no other)."""
    return ws.name


def rendezvous_endpoint(ws: Workspace) -> str:
    """``<job>-0.<service>.<namespace>.svc:29500``: the Indexed Job's pod 0 (hostname <job>-<index>, subdomain)."""
    return f"{ws.name}-0.{workers_service_name(ws)}.{ws.namespace}.svc:{RDZV_PORT}"


def parallelism(ws: Workspace) -> Parallelism:
    """DDP or FSDP for the workspace's preset, method, instance type and node count (spec/memory.py)."""
    preset = get_preset(ws.tuning.preset.name) if ws.tuning and ws.tuning.preset and ws.tuning.preset.name else None
    inst = get_instance_type(ws.resource.instance_type) if ws.resource and ws.resource.instance_type else None
    return memory.choose(preset, ws.tuning.method if ws.tuning else None, inst, node_count(ws))


def tuner_args(ws: Workspace) -> list[str]:
    """``job train --nproc-per-node G``: one training process per GPU of the node (torchrun, DDP or FSDP);
    on several nodes also the gang: node count, this pod's index, node 0's rendezvous, the workspace as its id."""
    args = ["job", "train", "--nproc-per-node", str(gpu_count(ws))]
    if (n := node_count(ws)) > 1:
        args += ["--nnodes", str(n), "--node-rank", f"$({INDEX_ENV})", "--rdzv-endpoint", rendezvous_endpoint(ws),
                 "--rdzv-id", ws.name]
    return args


def workers_service(ws: Workspace) -> dict | None:
    """The headless Service of a multi-node run: DNS for each pod (``<job>-<index>.<service>``), ready or not
    (a pod waiting in the rendezvous is not Ready, and node 0 must be found before it is)."""
    if ws.tuning is None or node_count(ws) == 1:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": workers_service_name(ws), "namespace": ws.namespace, "labels": workspace_labels(ws)},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {LABEL_WORKSPACE: ws.name},
                 "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}]},
    }


#: what a tuning pod may not reach when private dataset URLs are refused (``addresses.py``'s ranges, IPv4 and IPv6)
PRIVATE_CIDRS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8",
                 "0.0.0.0/8", "224.0.0.0/3"]
PRIVATE_CIDRS_V6 = ["fc00::/7", "fe80::/10", "::1/128", "ff00::/8"]


def egress_policy(ws: Workspace, settings: Settings) -> dict | None:
    """A NetworkPolicy for the tuning pods: DNS to the cluster, and anything public, nothing private.

    The downloader already refuses private addresses on every hop (``tuner/inputs.py``); this is the
    cluster's own enforcement of the same rule, for code the pod runs that is not ours (the trainer,
    libraries). Only where the operator refuses private dataset URLs (``KAITO_DENY_PRIVATE_URLS``);
    where the cluster has no NetworkPolicy support it is inert.
    """
    if ws.tuning is None or not settings.deny_private_urls:
        return None
    public = [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_CIDRS}},
              {"ipBlock": {"cidr": "::/0", "except": PRIVATE_CIDRS_V6}}]
    rules = [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
              "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
             {"to": public}]
    if node_count(ws) > 1:  # the gang's own pods: rendezvous and collectives
        rules.append({"to": [{"podSelector": {"matchLabels": {LABEL_WORKSPACE: ws.name}}}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{ws.name}-egress", "namespace": ws.namespace, "labels": workspace_labels(ws)},
            "spec": {"podSelector": {"matchLabels": {LABEL_WORKSPACE: ws.name}}, "policyTypes": ["Egress"],
                     "egress": rules}}


def workspace_secret_name(ws: Workspace) -> str:
    return f"{ws.name}-workspace"


def workspace_secret(ws: Workspace) -> dict:
    """The workspace as the Job's steps read it ($KAITO_WORKSPACE), in a Secret: dataset URLs may carry
    signatures (SAS tokens, presigned queries), which must not be readable by everyone who can read Jobs
    or pods (``kubectl get job -o yaml``); the Secret is owned by the workspace and deleted with it."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": workspace_secret_name(ws), "namespace": ws.namespace, "labels": workspace_labels(ws)},
            "stringData": {WORKSPACE_SECRET_KEY: json.dumps(_job_workspace(ws), sort_keys=True)}}


WORKSPACE_SECRET_KEY = "workspace.json"


def tuning_job(ws: Workspace, settings: Settings, config: TuningConfig, *, revision: int = 1) -> dict:
    """The tuning Job (docs/design.md, "The tuning Job").

    One pod per node: on one node a plain Job; on ``resource.count`` nodes an Indexed Job
    (parallelism = completions = count) whose pod ``i`` is node ``i`` of the torchrun gang, found by
    the others through the headless Service (``workers_service``).
    """
    t = ws.tuning
    inp, out = t.input, t.output
    image = settings.tuner_image
    nodes = node_count(ws)
    mode = parallelism(ws)
    index_env = [{"name": INDEX_ENV, "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}}] if nodes > 1 else []
    ws_env = [{"name": ENV_WORKSPACE, "valueFrom": {"secretKeyRef": {
        "name": workspace_secret_name(ws), "key": WORKSPACE_SECRET_KEY}}}, *_COMMON_ENV, *index_env]
    output_dir = config.output_dir

    volumes = [*_common_volumes(t.preset.name if t.preset else None),
               {"name": "config", "configMap": {"name": config_map_name(ws), "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}}]
    if inp.volume_source:
        volumes.append({"name": "data", **inp.volume_source})
    else:
        volumes.append({"name": "data", "emptyDir": {"sizeLimit": SIZE_DATA}})
    if out.volume_source:
        volumes.append({"name": "results", **out.volume_source})
    elif (pvc := checkpoint_pvc(ws, settings)):
        volumes.append({"name": "results", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}})
    else:
        volumes.append({"name": "results", "emptyDir": {"sizeLimit": SIZE_RESULTS}})

    def results(read_only: bool = False) -> dict:
        mount = {"name": "results", "mountPath": output_dir}
        if read_only:
            mount["readOnly"] = True
        if nodes > 1:  # each node its own directory of a shared checkpoint volume (harmless on an emptyDir)
            mount["subPathExpr"] = f"node-$({INDEX_ENV})"
        return mount

    init_containers, containers = [], []
    # The download step: the inputs (URLs, an input image; a volume is already there) and the base weights
    # into the hf-cache volume, so training starts from local files (ModelConfig.local_files_only holds).
    # It runs in every pod of a multi-node run: no volume shared between nodes is assumed (a ReadWriteMany
    # volume is not on every cluster), and each node needs the data and weights on its own disk anyway.
    # It sees the output directory read-only: a retried pod whose run already finished downloads nothing.
    mounts = [{"name": "data", "mountPath": DATA_DIR, **({"readOnly": True} if inp.volume_source else {})},
              results(read_only=True), {"name": "hf-cache", "mountPath": HF_CACHE_DIR}, _TMP_MOUNT]
    # The base weights from an image (presetOptions.image, or the operator's preset registry) go to the same
    # cache volume; its pull secrets join the input image's in one projected folder.
    weights = base_weights_image(ws, settings)
    env = [*ws_env, {"name": ENV_PREFETCH_WEIGHTS, "value": "1"}, *_weights_env(weights), *_model_env(ws, t.preset)]
    if not settings.deny_private_urls:  # the cluster admin allows in-cluster dataset servers
        env.append({"name": ENV_ALLOW_PRIVATE_URLS, "value": "1"})
    pull_secrets = list(dict.fromkeys([*inp.image_pull_secrets, *weights_pull_secrets(ws, settings)]))
    if pull_secrets:
        volumes.append(_docker_config_volume("pull-secrets", pull_secrets))
        mounts.append({"name": "pull-secrets", "mountPath": PULL_SECRETS_DIR, "readOnly": True})
        env.append({"name": ENV_PULL_SECRETS_DIR, "value": PULL_SECRETS_DIR})
    init_containers.append(_container("download", image, ["job", "download"], env, mounts,
                                      resources={"requests": {"cpu": "500m", "memory": "1Gi"},
                                                 "limits": {"memory": "4Gi"}}))

    tuner = _container(
        "tuner", image, tuner_args(ws),
        [*ws_env, {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
         {"name": ENV_PARALLELISM, "value": mode.mode}, *_weights_env(weights), *_model_env(ws, t.preset)],
        [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
         {"name": "data", "mountPath": DATA_DIR, "readOnly": True},
         results(),
         {"name": "dshm", "mountPath": "/dev/shm"},
         {"name": "hf-cache", "mountPath": HF_CACHE_DIR}, _TMP_MOUNT],
        resources=_gpu_resources(ws, cpu="4", memory="16Gi"))
    tuner["ports"] = [{"name": "progress", "containerPort": PROGRESS_PORT, "protocol": "TCP"}]
    if nodes > 1:
        tuner["ports"].append({"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"})

    if out.image:
        init_containers.append(tuner)
        volumes.append({"name": "push-secret", "secret": {
            "secretName": out.image_push_secret, "items": [{"key": ".dockerconfigjson", "path": ".dockerconfigjson"}]}})
        # Every pod of an Indexed Job has the same containers: on a node other than 0 the push step is given
        # its index and exits 0 at once (node 0's rank 0 alone wrote the adapter; a pod that differed by index
        # would need a JobSet). One push per run, and every index still completes.
        push_args = ["job", "push"] + (["--node-rank", f"$({INDEX_ENV})"] if nodes > 1 else [])
        containers.append(_container(
            "push", image, push_args,
            [*ws_env, {"name": ENV_PUSH_AUTH_FILE, "value": PUSH_AUTH_FILE}],
            [results(read_only=True),
             {"name": "push-secret", "mountPath": PUSH_SECRET_DIR, "readOnly": True}, _TMP_MOUNT],
            resources={"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}))
    else:
        containers.append(tuner)

    labels = workspace_labels(ws)
    pod_spec = {"restartPolicy": "Never", **_gpu_pod_spec(ws, init_containers, containers, volumes)}
    spec = {"activeDeadlineSeconds": settings.job_active_deadline_seconds,
            "podFailurePolicy": {"rules": POD_FAILURE_RULES}}
    if nodes > 1:
        pod_spec["subdomain"] = workers_service_name(ws)
        # A gang: a rank that fails takes the others down within the collective timeout
        # (KAITO_DIST_TIMEOUT_SECONDS), so every index fails and each is recreated: the retry restarts all
        # ranks, which resume from their node's newest checkpoint. Each index may be retried backoffLimit
        # times; the first index past that fails the whole Job (maxFailedIndexes 0), never leaving the
        # other ranks to wait. User errors and out-of-memory still fail the Job at once (podFailurePolicy).
        spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes,
                    backoffLimitPerIndex=settings.job_backoff_limit, maxFailedIndexes=0)
    else:
        spec["backoffLimit"] = settings.job_backoff_limit
    spec["template"] = {"metadata": {"labels": labels, "annotations": {ANNOTATION_REVISION: str(revision)}},
                        "spec": pod_spec}
    return _fresh({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": ws.name, "namespace": ws.namespace, "labels": labels,
                     "annotations": {ANNOTATION_REVISION: str(revision), ANNOTATION_SPEC_HASH: spec_hash(ws),
                                     ANNOTATION_PARALLELISM: str(mode)}},
        "spec": spec,
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


def nodeclaim_name(ws: Workspace, index: int = 0) -> str:
    """``ws-<name>-<digest>``; node ``i`` > 0 of a multi-node run: ``...-<i>``."""
    digest = hashlib.sha256(f"{ws.namespace}/{ws.name}".encode()).hexdigest()[:8]
    return f"ws-{ws.name[:50]}-{digest}" + (f"-{index}" if index else "")


def nodeclaim_names(ws: Workspace) -> list[str]:
    """One NodeClaim per node of the run (tuning on ``resource.count`` nodes; inference makes none here)."""
    return [nodeclaim_name(ws, i) for i in range(node_count(ws))]


def nodeclaim(ws: Workspace, index: int = 0) -> dict:
    """A Karpenter NodeClaim for one node of the instance type, labelled with the selector's labels."""
    sel = ws.resource.label_selector
    labels = {**(sel.match_labels if sel else {}), LABEL_WORKSPACE: ws.name, LABEL_WORKSPACE_NAMESPACE: ws.namespace}
    return {
        "apiVersion": NODECLAIM_API,
        "kind": "NodeClaim",
        "metadata": {"name": nodeclaim_name(ws, index), "labels": labels},
        "spec": {
            "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In",
                              "values": [ws.resource.instance_type]}],
            "taints": [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": "1"}},
            "nodeClassRef": {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"},
        },
    }
