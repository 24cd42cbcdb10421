"""Validating admission: ``kubectl apply`` of a bad Workspace is refused with the validator's messages.

The same checks as ``kaito-tuning validate`` (``parse_workspace`` + ``validate_workspace``, plus
``validate_update`` on UPDATE), and the named ConfigMap's ``training_config.yaml`` when it can be
read. The operator setting ``deny_private_urls`` is applied here: in the cluster, dataset URLs
may not point at private, loopback, link-local or metadata addresses; on a user's own machine
(``kaito-tuning run``) they still can.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import tempfile

import kopf

from kaito_tuning.controller import decisions as d
from kaito_tuning.controller.settings import Settings
from kaito_tuning.errors import Problem
from kaito_tuning.spec.rules import validate_update, validate_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, parse_config
from kaito_tuning.spec.workspace import GROUP, PLURAL, VERSIONS, parse_workspace

log = logging.getLogger("kaito_tuning.controller.admission")
#: the ConfigMap read, made while the API server waits for the webhook's answer (10 s by default)
ADMISSION_READ_TIMEOUT_SECONDS = 5.0


def _strip(obj: dict | None) -> dict:
    return {k: v for k, v in dict(obj or {}).items() if k != "status"}


def review(body: dict, old: dict | None, operation: str, *, deny_private_urls: bool,
           read_config=None, volume_types: tuple[str, ...] | None = None, list_workspaces=None) -> list[Problem]:
    """Every problem with ``body`` (and with the change from ``old`` on UPDATE).

    ``read_config(namespace, name)`` returns the ConfigMap's training_config.yaml text, or None
    when it cannot be read (then the operator reports it in status instead). ``volume_types``: the
    operator's allow-list. ``list_workspaces()`` returns every workspace of the cluster (or None when
    they cannot be read): a new output image that an existing workspace already pushes to is refused.
    """
    ws, problems = parse_workspace(_strip(body))
    problems += validate_workspace(ws, allow_private_urls=not deny_private_urls, volume_types=volume_types)
    if not problems and list_workspaces is not None and ws.tuning and ws.tuning.output and ws.tuning.output.image:
        changed = operation != "UPDATE" or not old or \
            d.image_key(((old.get("tuning") or {}).get("output") or {}).get("image") or "") != \
            d.image_key(ws.tuning.output.image)
        others = list_workspaces() if changed else None
        if others is not None and (first := d.output_image_owner(_strip(body), others)):
            problems.append(Problem("tuning.output.image", f"is already the output of workspace {first}: each run "
                                                           "would overwrite the other's adapter; choose another tag"))
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
        cm = kubernetes.client.CoreV1Api().read_namespaced_config_map(name, namespace,
                                                                      _request_timeout=ADMISSION_READ_TIMEOUT_SECONDS)
    except Exception as e:  # noqa: BLE001 - admission must not fail because a read did
        log.debug("cannot read ConfigMap %s/%s: %s", namespace, name, e)
        return None
    return (cm.data or {}).get(CONFIG_KEY)


def register_admission(settings: Settings, registry: kopf.OperatorRegistry) -> None:
    """The validating handler (both served versions) and kopf's webhook server on ``settings.webhook_port``.

    The handler's id is the webhook's path (``/validate-v1beta1``); with ``webhook_configuration`` set,
    kopf creates that ValidatingWebhookConfiguration and keeps its clientConfig and caBundle current.
    """

    def validate(body, old, operation, namespace, output_images, **_):
        obj = dict(body)
        obj.setdefault("metadata", {}).setdefault("namespace", namespace or "default")
        # the workspaces pushing anywhere, from the operator's index of output images (handlers.py): no LIST
        problems = review(obj, old, operation or "CREATE", deny_private_urls=settings.deny_private_urls,
                          read_config=read_config_text, volume_types=settings.volume_types,
                          list_workspaces=lambda: [w for store in output_images.values() for w in store])
        if problems:
            raise kopf.AdmissionError("; ".join(str(p) for p in problems), code=422)

    for version in VERSIONS:
        kopf.on.validate(GROUP, version, PLURAL, id=f"validate-{version}", registry=registry,
                         operations=["CREATE", "UPDATE"])(validate)

    conf = settings

    @kopf.on.startup(registry=registry)
    def webhook_server(settings: kopf.OperatorSettings, **_):
        settings.admission.server = webhook_server_for(conf)
        settings.admission.managed = conf.webhook_configuration or None


def webhook_server_for(settings: Settings) -> kopf.WebhookServer:
    """kopf's webhook server as the settings say.

    Default: TLS with a certificate kopf generates (self-signed; its CA goes into the managed
    configuration's caBundle), named for the Service ``webhook_service`` so the API server can call
    it; no cert-manager needed. With ``webhook_cert_dir``: that tls.crt/tls.key (cert-manager).
    ``webhook_insecure``: plain HTTP on loopback, for tests.
    """
    if settings.webhook_insecure:
        return kopf.WebhookServer(addr="127.0.0.1", port=settings.webhook_port, insecure=True)
    kwargs: dict = {"addr": "0.0.0.0", "port": settings.webhook_port}
    if settings.webhook_cert_dir:
        kwargs.update(certfile=os.path.join(settings.webhook_cert_dir, "tls.crt"),
                      pkeyfile=os.path.join(settings.webhook_cert_dir, "tls.key"))
    if settings.webhook_service:
        namespace, name = settings.webhook_service.split("/")
        return ServiceWebhookServer(service=name, namespace=namespace, host=f"{name}.{namespace}.svc",
                                    extra_sans=[f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}"],
                                    **kwargs)
    return SelfSignedWebhookServer(**kwargs)


class SelfSignedWebhookServer(kopf.WebhookServer):
    """kopf's server, its self-signed certificate made by the ``openssl`` CLI (in every Debian-based image,
    as a dependency of ca-certificates) instead of kopf's optional ``certbuilder`` package."""

    @staticmethod
    def build_certificate(hostnames, password=None) -> tuple[bytes, bytes]:
        if password:
            raise ValueError("a generated webhook certificate has no password")
        names = [h for h in dict.fromkeys(hostnames) if h]
        sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in names)
        with tempfile.TemporaryDirectory() as tmp:
            key, crt = os.path.join(tmp, "tls.key"), os.path.join(tmp, "tls.crt")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-days", "3650", "-subj", f"/CN={names[0][:64]}", "-addext",
                            f"subjectAltName={sans}", "-keyout", key, "-out", crt],
                           check=True, capture_output=True, timeout=60)
            with open(crt, "rb") as c, open(key, "rb") as k:
                return c.read(), k.read()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ServiceWebhookServer(SelfSignedWebhookServer):
    """kopf's server, announced to the API server as a Service reference (``clientConfig.service``).

    kopf's own server announces a URL (``https://host:port/...``); the API server resolves a URL with
    the node's DNS, where ``*.svc`` names usually do not resolve, while a Service reference is resolved
    by the API server itself (Service port 443 -> the container's webhook port).
    """

    def __init__(self, *, service: str, namespace: str, service_port: int = 443, **kwargs):
        super().__init__(**kwargs)
        self.service, self.namespace, self.service_port = service, namespace, service_port

    async def __call__(self, fn):
        async for config in super().__call__(fn):
            out = {"service": {"name": self.service, "namespace": self.namespace, "port": self.service_port,
                               "path": (self.path or "").rstrip("/")}}
            if "caBundle" in config:
                out["caBundle"] = config["caBundle"]
            yield out
