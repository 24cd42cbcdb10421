"""``kaito-tuning render FILE``: every object the operator would create for the workspaces in a file."""

from __future__ import annotations

import json
import sys

import yaml

from kaito_tuning.controller.inference import inference_deployment, inference_service
from kaito_tuning.controller.manifests import (
    checkpoint_pvc,
    default_configmap,
    egress_policy,
    node_count,
    nodeclaim,
    tuning_job,
    workers_service,
    workspace_secret,
)
from kaito_tuning.controller.settings import Settings
from kaito_tuning.errors import UserError
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, TuningConfig, load_config
from kaito_tuning.spec.workspace import Workspace


def render(ws: Workspace, settings: Settings, config: TuningConfig | None = None, *, revision: int = 1) -> list[dict]:
    """Every object the operator creates for ``ws`` (``config``: the parsed ConfigMap; default: the method's)."""
    if ws.inference is not None:
        return [inference_deployment(ws, settings), inference_service(ws)]
    objs = []
    if settings.node_auto_provisioning:
        objs += [nodeclaim(ws, i) for i in range(node_count(ws))]
    if (cm := default_configmap(ws)):
        objs.append(cm)
    if (pvc := checkpoint_pvc(ws, settings)):
        objs.append(pvc)
    objs.append(workspace_secret(ws))
    if (svc := workers_service(ws)):
        objs.append(svc)
    if (policy := egress_policy(ws, settings)):
        objs.append(policy)
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
