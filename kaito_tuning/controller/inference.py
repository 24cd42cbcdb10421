"""What an inference workspace becomes: a Deployment of the server (image adapters pulled by init
containers into ``/mnt/adapter/<name>``, volume adapters mounted there; base weights from a weights image
when ``presetOptions.image`` or the preset registry names one) and a Service in front of it.
Pure functions, no API calls; the pieces every pod shares come from ``manifests.py``."""

from __future__ import annotations

from kaito_tuning.contract import (
    ADAPTER_DIR,
    ANNOTATION_SPEC_HASH,
    HF_CACHE_DIR,
    LABEL_WORKSPACE,
    PULL_SECRETS_DIR,
    SERVER_PORT,
)
from kaito_tuning.controller.manifests import (
    _COMMON_ENV,
    _TMP_MOUNT,
    SIZE_ADAPTER,
    _common_volumes,
    _container,
    _docker_config_volume,
    _fresh,
    _gpu_pod_spec,
    _gpu_resources,
    _model_env,
    _weights_env,
    base_weights_image,
    spec_hash,
    weights_pull_secrets,
    workspace_labels,
)
from kaito_tuning.controller.settings import Settings
from kaito_tuning.spec.workspace import Workspace


def adapter_path(name: str) -> str:
    return f"{ADAPTER_DIR}/{name}"


def inference_deployment(ws: Workspace, settings: Settings) -> dict:
    """The server Deployment: image adapters pulled by init containers, volume adapters mounted."""
    inf = ws.inference
    image = settings.tuner_image
    labels = workspace_labels(ws)
    volumes = [*_common_volumes(ws.inference.preset.name if ws.inference.preset else None)]
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
            volumes.append({"name": vol, "emptyDir": {"sizeLimit": SIZE_ADAPTER}})
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
    weights = base_weights_image(ws, settings)
    if weights:  # the server pulls the base weights into the cache volume at start, as the tuning Job's download does
        args += ["--weights-image", weights]
        if (secrets := weights_pull_secrets(ws, settings)):
            volumes.append(_docker_config_volume("pull-weights", secrets))
            server_mounts.append({"name": "pull-weights", "mountPath": PULL_SECRETS_DIR, "readOnly": True})
            args += ["--auth-file", PULL_SECRETS_DIR]
    args += ["--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    server = _container("server", image, args, [*_COMMON_ENV, *_weights_env(weights), *_model_env(ws, inf.preset)],
                        server_mounts,
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
