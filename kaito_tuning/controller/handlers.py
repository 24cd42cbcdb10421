"""The kopf handlers: each a few lines that call ``Reconciler`` and write what it computed.

What triggers a reconcile: the workspace's create/update/resume, an event of a Job, Deployment or pod
labelled ``kaito.sh/workspace`` that changes something its status is computed from (``SeenObjects``;
a deletion always does, so a Job deleted by hand is recreated at once), and a timer that polls the
tuner's ``/progress`` while the workspace is Running. A ConfigMap, secret or node that is not there
yet is shown in status and re-checked every ``retry_delay_seconds`` (kopf.TemporaryError), never in
a hot loop. Workspaces are watched in the storage version (v1beta1): the API server serves every
workspace, applied as v1alpha1 or v1beta1, through it. kopf's record of each workspace as last handled is
kept in the operator's memory (``seen.HandledSpecs``), not in an annotation: a reconcile that succeeds writes
only the workspace's status.

Every status write replaces the previous status (``decisions.status_patch``); every phase change and
every failure is an Event on the Workspace and a JSON log line; a handler that raises leaves a status
condition saying why (``OperatorError``) before kopf retries it after ``retry_delay_seconds``. A refresh
(an event of a Job, Deployment or pod) whose API calls fail is retried a few times at once (1, 2, 4 s):
kopf never retries an event handler, and the event that would have brought the status up to date does
not come again. Every API request ends within ``reconciler.API_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys

import kopf
import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from kaito_tuning import retry
from kaito_tuning.contract import FINALIZER, LABEL_WORKSPACE
from kaito_tuning.controller import decisions as d
from kaito_tuning.controller import logs, reconciler
from kaito_tuning.controller import status as st
from kaito_tuning.controller.reconciler import Outcome, Reconciler, api_error_text, ws_key
from kaito_tuning.controller.seen import HandledSpecs
from kaito_tuning.controller.settings import Settings, from_env
from kaito_tuning.errors import KaitoError, TransientError, UserError
from kaito_tuning.spec.workspace import GROUP, PLURAL, STORAGE_VERSION


def _post(body, outcome: Outcome) -> None:
    for e in outcome.events:
        kopf.event(body, type=e["type"], reason=e["reason"], message=e["message"])


REFRESH_ATTEMPTS = 4
_API_FAILURES = (ApiException, urllib3.exceptions.HTTPError)  # an answer with an error, a timeout, no connection


class ApiCallFailed(TransientError):
    """A failed API call of a refresh, in one line (retried by the retry policy, then reported)."""

    reason = "OperatorError"


CHANGED_RETRY_SECONDS = 1.0
#: how long a thread holds the GIL before another may take it (Python's default: 5 ms). The reconciles run in
#: kopf's threads and mostly wait on the API server; each answer needs the GIL back, which kopf's event loop
#: otherwise keeps for up to 5 ms each time. 1,000 workspaces at once, alternating runs: all Jobs made in
#: 0.85-1.0x the time, the last one 0.5-1.3 s after kubectl returned instead of 3.0-4.8 s (docs/benchmarks.md)
GIL_SWITCH_SECONDS = 0.001


def _write_status(rec: Reconciler, body, new: dict) -> None:
    """The handler's status, written by us (not kopf's patch, which kopf retries on its own and may land after
    a newer status) and only onto the workspace it was computed from (its resourceVersion). A 409: the
    workspace changed meanwhile; kopf runs the handler again on the new one."""
    meta = body["metadata"]
    if dict(body.get("status") or {}) == new:
        return  # nothing to change (a blocker re-checked every retry_delay_seconds)
    try:
        rec.write_status(meta.get("namespace") or "default", meta["name"], body.get("status"), new,
                         meta.get("resourceVersion"))
    except ApiException as e:
        if e.status != 409:
            raise
        raise kopf.TemporaryError("the workspace changed while it was reconciled: again with the new one",
                                  delay=CHANGED_RETRY_SECONDS) from None


def _reported(fn, rec: Reconciler, delay: float = 30.0):
    """A handler whose failure leaves a status condition, an Event and a log line, then is retried by kopf
    after ``delay`` seconds."""
    @functools.wraps(fn)
    def wrapper(body, **kwargs):
        try:
            return fn(body=body, **kwargs)
        except (kopf.TemporaryError, kopf.PermanentError):
            raise
        except Exception as e:  # noqa: BLE001 - reported, then retried
            _report_failure(rec, body, e)
            raise kopf.TemporaryError(_failure_status(body, e)[3], delay=delay) from e
    return wrapper


def register(settings: Settings, registry: kopf.OperatorRegistry | None = None,
             api_client=None) -> kopf.OperatorRegistry:
    """Register the handlers into ``registry`` (a fresh one by default) and return it."""
    registry = registry or kopf.OperatorRegistry()
    rec = Reconciler(settings, api_client)
    reported = functools.partial(_reported, rec=rec, delay=settings.retry_delay_seconds)
    wsres = (GROUP, STORAGE_VERSION, PLURAL)
    labelled = {LABEL_WORKSPACE: kopf.PRESENT}

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_):
        settings.persistence.finalizer = FINALIZER
        memo.executor = settings.execution.executor  # kopf's thread pool, where its sync handlers run
        # kopf's default also reads progress from status.kopf, which this operator never writes; each of its two
        # storages deep-copies the object on every event (together a tenth of the operator's CPU at 1,000
        # workspaces)
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(v1=True)
        # what kopf handled, in memory: no PATCH of the workspace after each reconcile
        settings.persistence.diffbase_storage = HandledSpecs(kinds=("Workspace",))
        settings.posting.enabled = True  # our kopf.event() calls: phase changes and failures
        settings.posting.loggers = False  # not every log line
        settings.networking.request_timeout = reconciler.API_TIMEOUT_SECONDS  # kopf's default: 5 minutes
        settings.networking.connect_timeout = reconciler.API_TIMEOUT_SECONDS

    @kopf.index(*wsres, registry=registry, id="output_images")  # the kwarg name handlers receive it by
    async def output_images(body, **_):  # async: kopf runs it in the loop, not through its thread pool
        """Which workspaces push to which image, kept from the watch (a reconcile must not list them all)."""
        claim = d.output_image_claim(dict(body))
        return dict([claim]) if claim else None

    @kopf.on.resume(*wsres, registry=registry)
    @kopf.on.create(*wsres, registry=registry)
    @kopf.on.update(*wsres, registry=registry)
    @reported
    def reconcile_workspace(body, output_images, **_):
        outcome = rec.reconcile(body, images=output_images)
        _write_status(rec, body, outcome.status)
        _post(body, outcome)
        if outcome.retry_after:
            raise kopf.TemporaryError(outcome.retry_reason, delay=outcome.retry_after)

    @kopf.on.delete(*wsres, registry=registry, optional=not settings.node_auto_provisioning)
    def release_nodes(body, **_):
        if settings.node_auto_provisioning:
            rec.release(body)

    @kopf.timer(*wsres, registry=registry, interval=settings.progress_poll_seconds, initial_delay=1,
                when=lambda status, **_: status.get("state") == st.RUNNING and
                (status.get("tuning") or {}).get("stage") == "training")
    @reported
    def poll_progress(body, output_images, **_):
        if (progress := rec.poll_progress(body)) is not None:
            outcome = rec.reconcile(body, progress=progress, images=output_images)
            _write_status(rec, body, outcome.status)
            _post(body, outcome)

    def refresher(kind: str):
        async def refresh(body, type, output_images, memo: kopf.Memo, **_):
            # async, so that the many events that change nothing are dismissed in the loop: only a change
            # goes to kopf's thread pool, as a sync handler would (each trip there ~1 ms of CPU)
            owner = _owner_workspace(body)
            if owner is None or not rec.seen.changed(kind, body, deleted=type == "DELETED"):
                return
            call = functools.partial(contextvars.copy_context().run, update, owner, output_images)
            await asyncio.get_running_loop().run_in_executor(memo.get("executor"), call)

        def update(owner: tuple[str, str], output_images) -> None:
            last: list[dict] = []

            def once() -> None:
                try:
                    ws = rec.get_workspace(*owner)  # read again on each attempt: a 409 means it changed
                    if ws is None or ws["metadata"].get("deletionTimestamp"):
                        return
                    last[:] = [ws]
                    outcome = rec.reconcile(ws, images=output_images)
                    rec.write_status(*owner, ws.get("status"), outcome.status, ws["metadata"].get("resourceVersion"))
                except _API_FAILURES as e:
                    raise ApiCallFailed(api_error_text(e)) from e
                _post(ws, outcome)

            try:
                retry.call(once, attempts=REFRESH_ATTEMPTS)
            except Exception as e:  # noqa: BLE001 - reported here; the next event or the timer retries
                if last:
                    _report_failure(rec, last[0], e)
                else:
                    logs.failure(f"{owner[0]}/{owner[1]}", "OperatorError", d.clip(api_error_text(e)), e)
        refresh.__name__ = f"refresh_from_{kind.lower()}"  # kopf's handler id
        return refresh

    kopf.on.event("batch", "v1", "jobs", labels=labelled, registry=registry)(refresher("Job"))
    kopf.on.event("apps", "v1", "deployments", labels=labelled, registry=registry)(refresher("Deployment"))
    kopf.on.event("", "v1", "pods", labels=labelled, registry=registry)(refresher("Pod"))

    if settings.webhook_port:
        from kaito_tuning.controller.admission import register_admission
        register_admission(settings, registry)
    return registry


def _failure_status(body, e: Exception) -> tuple[dict, dict, str, str]:
    """(previous status, new status, reason, message) after a reconcile of ``body`` raised ``e``."""
    reason = (getattr(e, "reason", None) if isinstance(e, KaitoError) else None) or "OperatorError"
    message = d.clip(f"the operator failed to reconcile this workspace: {api_error_text(e)}; it retries (see its log)")
    prev = dict(body.get("status") or {})
    new = d.error_status(prev, inference="inference" in body, reason=reason, message=message,
                         generation=(body.get("metadata") or {}).get("generation"))
    return prev, new, reason, message


def _report_failure(rec: Reconciler, ws: dict, e: Exception) -> None:
    """A failed reconcile: a condition (if the workspace has not changed since it was read), an Event and a
    log line."""
    prev, new, reason, message = _failure_status(ws, e)
    logs.failure(ws_key(ws), reason, message, e)
    kopf.event(ws, type="Warning", reason=reason, message=message)
    try:
        rec.write_status(ws["metadata"].get("namespace") or "default", ws["metadata"]["name"], prev, new,
                         ws["metadata"].get("resourceVersion"))
    except Exception as again:  # noqa: BLE001 - the API server is the problem: the log line is what is left
        logs.failure(ws_key(ws), "StatusWriteFailed", f"cannot write the failure to status: "
                     f"{d.clip(api_error_text(again))}", again)


def _owner_workspace(body) -> tuple[str, str] | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    name = labels.get(LABEL_WORKSPACE)
    return (body["metadata"].get("namespace") or "default", name) if name else None


def cli_operator(args) -> int:
    """``kaito-tuning operator``: JSON logs, the cluster's credentials, then the handlers until interrupted."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    settings = from_env()
    logs.configure(settings.log_level)
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()
        except (kubernetes.config.ConfigException, OSError) as e:
            raise UserError(f"no cluster to talk to: not in a pod and no usable kubeconfig ({e})",
                            field="KUBECONFIG") from None
    registry = register(settings)
    logs.log.info("operator starting", extra={"namespaces": args.namespace or "all", "settings": {
        "webhook": settings.webhook_port or None, "nodeAutoProvisioning": settings.node_auto_provisioning}})
    asyncio.run(kopf.operator(registry=registry, standalone=args.standalone,
                              namespaces=args.namespace, clusterwide=not args.namespace,
                              liveness_endpoint=args.liveness))
    return 0
