"""Validating admission: ``kubectl apply`` of a bad Workspace is refused with the validator's messages.

The same checks as ``kaito-tuning validate`` (``parse_workspace`` + ``validate_workspace``, plus
``validate_update`` on UPDATE), and the named ConfigMap's ``training_config.yaml`` when it can be
read. The operator setting ``deny_private_urls`` is applied here: in the cluster, dataset URLs
may not point at private, loopback, link-local or metadata addresses; on a user's own machine
(``kaito-tuning run``) they still can.
"""

from __future__ import annotations

import logging
import os

import kopf

from kaito_tuning.controller.settings import Settings
from kaito_tuning.errors import Problem
from kaito_tuning.spec.rules import validate_update, validate_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, parse_config
from kaito_tuning.spec.workspace import GROUP, PLURAL, VERSIONS, parse_workspace

log = logging.getLogger("kaito_tuning.controller.admission")


def _strip(obj: dict | None) -> dict:
    return {k: v for k, v in dict(obj or {}).items() if k != "status"}


def review(body: dict, old: dict | None, operation: str, *, deny_private_urls: bool,
           read_config=None) -> list[Problem]:
    """Every problem with ``body`` (and with the change from ``old`` on UPDATE).

    ``read_config(namespace, name)`` returns the ConfigMap's training_config.yaml text, or None
    when it cannot be read (then the operator reports it in status instead).
    """
    ws, problems = parse_workspace(_strip(body))
    problems += validate_workspace(ws, allow_private_urls=not deny_private_urls)
    if operation == "UPDATE" and old:
        old_ws, _ = parse_workspace(_strip(old))
        problems += validate_update(old_ws, ws)
    if not problems and ws.tuning and ws.tuning.config and read_config is not None:
        text = read_config(ws.namespace, ws.tuning.config)
        if text is not None:
            _, found = parse_config(text, method=ws.tuning.method, source=f"ConfigMap {ws.tuning.config}")
            problems += [Problem(f"ConfigMap {ws.tuning.config}: {p.path}", p.message) for p in found]
    return problems


def read_config_text(namespace: str, name: str) -> str | None:
    """The ConfigMap's training_config.yaml, or None when it does not exist or cannot be read."""
    import kubernetes

    try:
        cm = kubernetes.client.CoreV1Api().read_namespaced_config_map(name, namespace)
    except Exception as e:  # noqa: BLE001 - admission must not fail because a read did
        log.debug("cannot read ConfigMap %s/%s: %s", namespace, name, e)
        return None
    return (cm.data or {}).get(CONFIG_KEY)


def register_admission(settings: Settings, registry: kopf.OperatorRegistry) -> None:
    """The validating handler (both served versions) and kopf's webhook server on ``settings.webhook_port``."""

    def validate(body, old, operation, namespace, **_):
        obj = dict(body)
        obj.setdefault("metadata", {}).setdefault("namespace", namespace or "default")
        problems = review(obj, old, operation or "CREATE", deny_private_urls=settings.deny_private_urls,
                          read_config=read_config_text)
        if problems:
            raise kopf.AdmissionError("; ".join(str(p) for p in problems), code=422)

    for version in VERSIONS:
        kopf.on.validate(GROUP, version, PLURAL, id=f"validate-{version}", registry=registry,
                         operations=["CREATE", "UPDATE"])(validate)

    conf = settings

    @kopf.on.startup(registry=registry)
    def webhook_server(settings: kopf.OperatorSettings, **_):
        cert_dir = conf.webhook_cert_dir
        kwargs = {"addr": "0.0.0.0", "port": conf.webhook_port}
        if cert_dir:
            kwargs.update(certfile=os.path.join(cert_dir, "tls.crt"), pkeyfile=os.path.join(cert_dir, "tls.key"))
        else:
            kwargs.update(addr="127.0.0.1", insecure=True)
        settings.admission.server = kopf.WebhookServer(**kwargs)
        settings.admission.managed = None  # operator/webhook.yaml declares the configuration
