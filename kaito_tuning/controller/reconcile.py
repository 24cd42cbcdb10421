"""The operator: thin kopf handlers around one idempotent ``Reconciler.reconcile(workspace)``.

Every handler ends in the same function: it reads the world (ConfigMap, secrets, NodeClaim, Job,
pods), creates what is missing, and computes the whole status from scratch (``status.py``), so a
restart at any point converges on exactly one Job (the Job is named after the workspace; a second
create answers 409). Workspaces are watched in the storage version (v1beta1): the API server serves
every workspace, applied as v1alpha1 or v1beta1, through it.

What triggers a reconcile: the workspace's create/update/resume, an event of a Job, Deployment
or pod labelled ``kaito.sh/workspace`` that changes something its status is computed from (see
``SeenObjects``; a deletion always does, so a Job deleted by hand is recreated at once), and a
timer that polls a running tuner's ``/progress``. A ConfigMap, secret or node that is not there yet is
shown in status and re-checked every ``retry_delay_seconds`` (kopf.TemporaryError), never in a
hot loop.

NodeClaim release policy (``KAITO_NODECLAIM_RELEASE``): ``OnCompletion`` deletes the NodeClaim as
soon as the run has succeeded or failed (the GPU node is not held for nothing); ``OnDelete`` keeps
it until the workspace is deleted. Either way deleting the workspace deletes its NodeClaim (a
finalizer, since a cluster-scoped NodeClaim cannot be garbage-collected through an owner reference).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import urllib.request
from dataclasses import dataclass

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from kaito_tuning.controller import manifests as m
from kaito_tuning.controller import status as st
from kaito_tuning.controller.settings import Settings, from_env
from kaito_tuning.errors import UserError
from kaito_tuning.spec.rules import validate_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, TuningConfig, parse_config
from kaito_tuning.spec.workspace import (
    GROUP,
    PLURAL,
    STORAGE_VERSION,
    Workspace,
    parse_workspace,
)

log = logging.getLogger("kaito_tuning.operator")
DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"


@dataclass
class Outcome:
    status: dict
    retry_after: float | None = None
    retry_reason: str = ""


def _api_status(e: ApiException) -> int:
    return getattr(e, "status", 0) or 0


def _json(call, *args, **kwargs) -> dict:
    """The API server's JSON answer as plain dicts: the form watch events have, without the
    client's model round trip (parsing every field into models, then back to dicts)."""
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


@functools.lru_cache(maxsize=64)
def _parse_config(text: str, method: str, source: str) -> tuple[TuningConfig, tuple]:
    """``parse_config``, once per distinct ConfigMap text (every reconcile checks it)."""
    config, problems = parse_config(text, method=method, source=source)
    return config, tuple(problems)


class SeenObjects:
    """The last seen state of each Job, Deployment and pod the operator watches.

    An event of one of them reconciles its workspace only when something a status is computed
    from changed: its uid, labels, annotations, deletion, spec or status. Bookkeeping updates
    (resourceVersion, managedFields) and the watch echo of a Job the operator has just created
    (expected before the create, recorded from its answer: the echo may arrive in between) change
    none of these. The memory starts empty, so after a restart every object's first event reconciles.
    """

    def __init__(self) -> None:
        self._digests: dict[tuple, str] = {}
        self._expected: dict[tuple, str] = {}  # our creates in flight: key -> spec hash
        self._lock = threading.Lock()  # handlers run in kopf's thread pool

    @staticmethod
    def _key(kind: str, body) -> tuple:
        meta = body.get("metadata") or {}
        return kind, meta.get("namespace"), meta.get("name")

    @staticmethod
    def _digest(body) -> str:
        meta = body.get("metadata") or {}
        return json.dumps([meta.get("uid"), meta.get("labels") or {}, meta.get("annotations") or {},
                           meta.get("deletionTimestamp"), body.get("spec"), body.get("status") or {}],
                          sort_keys=True, default=str)

    def expect(self, kind: str, body) -> None:
        """Before our own create: its ADDED event may arrive before the create's answer is recorded."""
        with self._lock:
            self._expected[self._key(kind, body)] = _annotation(body, m.ANNOTATION_SPEC_HASH)

    def record(self, kind: str, body) -> None:
        """After our own create (``body`` is the answer), or with the request body when it failed."""
        with self._lock:
            key = self._key(kind, body)
            self._expected.pop(key, None)
            if (body.get("metadata") or {}).get("uid"):
                self._digests[key] = self._digest(body)

    def changed(self, kind: str, body, deleted: bool = False) -> bool:
        """Whether ``body`` differs from what was last seen (and remember it); a deletion always does."""
        key, digest = self._key(kind, body), self._digest(body)
        with self._lock:
            if deleted:
                self._digests.pop(key, None)
                return True
            if self._digests.get(key) == digest:
                return False
            own_echo = key not in self._digests and self._expected.get(key) is not None \
                and self._expected.get(key) == _annotation(body, m.ANNOTATION_SPEC_HASH)
            self._digests[key] = digest
            return not own_echo


class Reconciler:
    """Reads and writes the cluster through the kubernetes client; decisions come from manifests/status."""

    def __init__(self, settings: Settings, api_client=None):
        self.settings = settings
        self.seen = SeenObjects()
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)

    # ---------------------------------------------------------------- entry points

    def reconcile(self, body: dict, progress: dict | None = None) -> Outcome:
        obj = json.loads(json.dumps(dict(body)))  # plain dicts, no kopf views
        prev = obj.get("status") or {}
        gen = (obj.get("metadata") or {}).get("generation")
        ws, problems = parse_workspace({k: v for k, v in obj.items() if k != "status"})
        problems += validate_workspace(ws, allow_private_urls=not self.settings.deny_private_urls)
        if problems:
            msg = "; ".join(str(p) for p in problems)
            conds = [st.condition(t, False, "InvalidSpec", msg) for t in ("ResourceReady", "WorkspaceSucceeded")]
            return Outcome({"state": st.FAILED, "conditions": st.merge_conditions(prev.get("conditions"), conds, gen,
                                                                                 st.now_iso())})
        if ws.inference is not None:
            return self._inference(ws, obj, prev, gen)
        return self._tuning(ws, obj, prev, gen, progress)

    def poll_progress(self, body: dict) -> dict | None:
        """The running tuner's /progress JSON, or None when there is no running pod or it does not answer."""
        ws_name, ns = body["metadata"]["name"], body["metadata"].get("namespace", "default")
        pod = st.running_pod(self._pods(ns, ws_name, (body.get("status") or {}).get("tuning", {}).get("revision")))
        if pod is None:
            return None
        url = f"http://{pod['status']['podIP']}:{m.PROGRESS_PORT}/progress"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return json.loads(r.read(1 << 20))
        except (OSError, ValueError) as e:
            log.debug("progress of %s/%s from %s: %s", ns, ws_name, url, e)
            return None

    def get_workspace(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, STORAGE_VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if _api_status(e) == 404:
                return None
            raise

    def write_status(self, namespace: str, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, STORAGE_VERSION, namespace, PLURAL, name,
                                                          {"status": status})

    def release(self, body: dict) -> None:
        """Delete the workspace's NodeClaim (on workspace deletion)."""
        ws, _ = parse_workspace({k: v for k, v in dict(body).items() if k != "status"})
        self._delete_nodeclaim(ws)

    # ---------------------------------------------------------------- tuning

    def _tuning(self, ws: Workspace, obj: dict, prev: dict, gen, progress) -> Outcome:
        ns, name = ws.namespace, ws.name
        prev_t = prev.get("tuning") or {}
        digest = m.spec_hash(ws)
        job = self._get_job(ns, name)
        if job is not None and _annotation(job, m.ANNOTATION_SPEC_HASH) != digest:
            log.info("workspace %s/%s changed: deleting job of revision %s", ns, name, _annotation(job, m.ANNOTATION_REVISION))
            self._delete_job(ns, name)
            job = None
        revision = self._revision(job, prev_t, digest)
        finished_before = prev_t.get("specHash") == digest and prev.get("state") in (st.SUCCEEDED, st.FAILED)

        blocker, config = self._prerequisites(ws, obj)
        provisioning = self.settings.node_auto_provisioning
        claim = None
        if provisioning and not (finished_before and self.settings.nodeclaim_release == "OnCompletion"):
            claim, claim_blocker = self._ensure_nodeclaim(ws)
            blocker = blocker or claim_blocker
            if blocker is None and not st.nodeclaim_ready(claim)[0]:
                blocker = {"reason": st.nodeclaim_ready(claim)[1], "message": st.nodeclaim_ready(claim)[2]}

        if job is None and finished_before:
            # the Job of a finished run was deleted by hand: the result is kept, nothing re-runs
            status = dict(prev)
            status["tuning"] = {**prev_t, "jobName": None, "note": "the finished job was deleted; status kept"}
            return Outcome(status)
        recreated = job is None and prev_t.get("specHash") == digest and prev_t.get("jobName")
        created = False
        if job is None and blocker is None:
            job, blocker, created = self._create_job(ws, obj, config, revision)
        # a Job created just now has no pods yet: the job controller makes them once it exists
        pods = self._pods(ns, name, revision) if job is not None and not created else []
        status = st.tuning_status(prev, generation=gen, job=job, pods=pods, revision=revision, progress=progress,
                                  blocker=blocker, nodeclaim=claim, provisioning=provisioning,
                                  output_volume=bool(ws.tuning.output.volume_source))
        status["tuning"]["specHash"] = digest
        if recreated and job is not None:
            status["tuning"]["note"] = f"job {name} was deleted before the run finished; recreated it"
        if provisioning and status["state"] in (st.SUCCEEDED, st.FAILED) and \
                self.settings.nodeclaim_release == "OnCompletion":
            self._delete_nodeclaim(ws)
        if blocker is not None:
            return Outcome(status, self.settings.retry_delay_seconds, f"{blocker['reason']}: {blocker['message']}")
        return Outcome(status)

    @staticmethod
    def _revision(job: dict | None, prev_t: dict, digest: str) -> int:
        if job is not None:
            return int(_annotation(job, m.ANNOTATION_REVISION) or 1)
        if prev_t.get("specHash") == digest:
            return int(prev_t.get("revision") or 1)
        return int(prev_t.get("revision") or 0) + 1

    def _prerequisites(self, ws: Workspace, obj: dict) -> tuple[dict | None, TuningConfig | None]:
        """(blocker, parsed config): the ConfigMap and the secrets the Job needs must exist and be right."""
        ns, t = ws.namespace, ws.tuning
        config = None
        if t.config:
            try:
                cm = self.core.read_namespaced_config_map(t.config, ns)
            except ApiException as e:
                if _api_status(e) != 404:
                    raise
                return {"reason": "ConfigMapNotFound",
                        "message": f"tuning.config: ConfigMap {t.config!r} does not exist in namespace {ns!r}; "
                                   f"create it (key {CONFIG_KEY}) or remove tuning.config to use the defaults"}, None
            text = (cm.data or {}).get(CONFIG_KEY)
            if text is None:
                return {"reason": "ConfigInvalid",
                        "message": f"ConfigMap {t.config!r} has no key {CONFIG_KEY!r}"}, None
        else:
            text = self._ensure_default_configmap(ws)
        config, problems = _parse_config(text, t.method, f"ConfigMap {m.config_map_name(ws)}")
        if problems:
            return {"reason": "ConfigInvalid", "message": f"ConfigMap {m.config_map_name(ws)}: "
                                                          + "; ".join(str(p) for p in problems)}, None
        secrets = [("tuning.output.imagePushSecret", t.output.image_push_secret)] if t.output.image else []
        secrets += [(f"tuning.input.imagePullSecrets[{i}]", s) for i, s in enumerate(t.input.image_pull_secrets)]
        for field, secret in secrets:
            if (b := self._check_secret(ns, field, secret)):
                return b, config
        return None, config

    def _check_secret(self, ns: str, field: str, name: str) -> dict | None:
        try:
            secret = self.core.read_namespaced_secret(name, ns)
        except ApiException as e:
            if _api_status(e) != 404:
                raise
            return {"reason": "SecretNotFound",
                    "message": f"{field}: secret {name!r} does not exist in namespace {ns!r}; create it with "
                               f"`kubectl create secret docker-registry {name} -n {ns} --docker-server=... "
                               "--docker-username=... --docker-password=...`"}
        if secret.type != DOCKERCONFIGJSON or ".dockerconfigjson" not in (secret.data or {}):
            return {"reason": "SecretWrongType",
                    "message": f"{field}: secret {name!r} is of type {secret.type!r}; it must be {DOCKERCONFIGJSON} "
                               "with the key .dockerconfigjson (kubectl create secret docker-registry)"}
        return None

    def _ensure_default_configmap(self, ws: Workspace) -> str:
        """Create the method's default ConfigMap in the namespace if missing; return its config text."""
        cm = m.default_configmap(ws)
        self._create_ignoring_conflict(lambda: _json(self.core.create_namespaced_config_map, ws.namespace, cm))
        return cm["data"][CONFIG_KEY]

    def _create_job(self, ws: Workspace, obj: dict, config: TuningConfig,
                    revision: int) -> tuple[dict | None, dict | None, bool]:
        """(job, blocker, whether this call created the job)."""
        if (pvc := m.checkpoint_pvc(ws, self.settings)):
            kopf.adopt(pvc, owner=obj)
            self._create_ignoring_conflict(lambda: self.core.create_namespaced_persistent_volume_claim(ws.namespace, pvc))
        job = m.tuning_job(ws, self.settings, config, revision=revision)
        kopf.adopt(job, owner=obj)
        self.seen.expect("Job", job)
        try:
            created = _json(self.batch.create_namespaced_job, ws.namespace, job)
        except Exception as e:
            self.seen.record("Job", job)  # no uid: only ends the expectation
            if not isinstance(e, ApiException) or _api_status(e) != 409:
                raise
        else:
            log.info("created job %s/%s (revision %s)", ws.namespace, ws.name, revision)
            self.seen.record("Job", created)  # its ADDED event brings nothing new
            return created, None, True
        current = self._get_job(ws.namespace, ws.name)  # created meanwhile, maybe by a previous revision
        if current is not None and _annotation(current, m.ANNOTATION_SPEC_HASH) != m.spec_hash(ws):
            return None, {"reason": "PreviousJobDeleting",
                          "message": "waiting for the job of the previous revision to be deleted"}, False
        return current, None, False

    @staticmethod
    def _create_ignoring_conflict(create) -> None:
        try:
            create()
        except ApiException as e:
            if _api_status(e) != 409:
                raise

    def _get_job(self, ns: str, name: str) -> dict | None:
        try:
            return _json(self.batch.read_namespaced_job, name, ns)
        except ApiException as e:
            if _api_status(e) == 404:
                return None
            raise

    def _delete_job(self, ns: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, ns, propagation_policy="Background")
        except ApiException as e:
            if _api_status(e) != 404:
                raise

    def _pods(self, ns: str, ws_name: str, revision: int | None) -> list[dict]:
        sel = f"{m.LABEL_WORKSPACE}={ws_name}"
        items = _json(self.core.list_namespaced_pod, ns, label_selector=sel).get("items") or []
        # filter here as well: the selector is the server's job, but cheap to re-check
        pods = [p for p in items if (p.get("metadata", {}).get("labels") or {}).get(m.LABEL_WORKSPACE) == ws_name]
        if revision is not None:
            pods = [p for p in pods if (p["metadata"].get("annotations") or {}).get(m.ANNOTATION_REVISION,
                                                                                   str(revision)) == str(revision)]
        return pods

    # ---------------------------------------------------------------- nodes

    def _ensure_nodeclaim(self, ws: Workspace) -> tuple[dict | None, dict | None]:
        claim = m.nodeclaim(ws)
        name = claim["metadata"]["name"]
        try:
            return self.custom.get_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", name), None
        except ApiException as e:
            if _api_status(e) != 404:
                raise
        try:
            return self.custom.create_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", claim), None
        except ApiException as e:
            if _api_status(e) == 409:
                return self.custom.get_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", name), None
            if _api_status(e) == 404:
                return None, {"reason": "NodeClaimUnavailable",
                              "message": "node auto-provisioning is on but karpenter.sh/v1 NodeClaim is not installed"}
            raise

    def _delete_nodeclaim(self, ws: Workspace) -> None:
        try:
            self.custom.delete_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", m.nodeclaim_name(ws))
            log.info("released NodeClaim %s", m.nodeclaim_name(ws))
        except ApiException as e:
            if _api_status(e) != 404:
                raise

    # ---------------------------------------------------------------- inference

    def _inference(self, ws: Workspace, obj: dict, prev: dict, gen) -> Outcome:
        ns, name = ws.namespace, ws.name
        blocker = None
        for i, a in enumerate(ws.inference.adapters):
            for j, s in enumerate(a.source.image_pull_secrets if a.source.image else []):
                blocker = blocker or self._check_secret(ns, f"inference.adapters[{i}].source.imagePullSecrets[{j}]", s)
        deployment = None
        if blocker is None:
            want = m.inference_deployment(ws, self.settings)
            kopf.adopt(want, owner=obj)
            try:
                current = self.apps.read_namespaced_deployment(name, ns)
            except ApiException as e:
                if _api_status(e) != 404:
                    raise
                current = None
            if current is None:
                self._create_ignoring_conflict(lambda: self.apps.create_namespaced_deployment(ns, want))
            elif (current.metadata.annotations or {}).get(m.ANNOTATION_SPEC_HASH) != m.spec_hash(ws):
                # a merge patch replaces lists whole (containers, volumes); the new template rolls the pods
                self.apps.patch_namespaced_deployment(name, ns, {"metadata": want["metadata"], "spec": want["spec"]},
                                                      _content_type="application/merge-patch+json")
            svc = m.inference_service(ws)
            kopf.adopt(svc, owner=obj)
            self._create_ignoring_conflict(lambda: self.core.create_namespaced_service(ns, svc))
            deployment = self.apps.api_client.sanitize_for_serialization(self.apps.read_namespaced_deployment(name, ns))
        pods = self._pods(ns, name, None)
        status = st.inference_status(prev, generation=gen, deployment=deployment, pods=pods, blocker=blocker)
        if blocker:
            return Outcome(status, self.settings.retry_delay_seconds, f"{blocker['reason']}: {blocker['message']}")
        return Outcome(status)


def _annotation(obj: dict, key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(key)


def _owner_workspace(body) -> tuple[str, str] | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    name = labels.get(m.LABEL_WORKSPACE)
    return (body["metadata"].get("namespace") or "default", name) if name else None


# -------------------------------------------------------------------- kopf handlers

def register(settings: Settings, registry: kopf.OperatorRegistry | None = None,
             api_client=None) -> kopf.OperatorRegistry:
    """Register the handlers into ``registry`` (a fresh one by default) and return it."""
    registry = registry or kopf.OperatorRegistry()
    rec = Reconciler(settings, api_client)
    wsres = (GROUP, STORAGE_VERSION, PLURAL)
    labelled = {m.LABEL_WORKSPACE: kopf.PRESENT}

    @kopf.on.login(registry=registry)
    def login(**kwargs):
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_):
        settings.persistence.finalizer = "kaito.sh/operator"
        settings.posting.level = logging.WARNING

    @kopf.on.resume(*wsres, registry=registry)
    @kopf.on.create(*wsres, registry=registry)
    @kopf.on.update(*wsres, registry=registry)
    def reconcile_workspace(body, patch, **_):
        outcome = rec.reconcile(body)
        patch.status.update(outcome.status)
        if outcome.retry_after:
            raise kopf.TemporaryError(outcome.retry_reason, delay=outcome.retry_after)

    @kopf.on.delete(*wsres, registry=registry, optional=not settings.node_auto_provisioning)
    def release_nodes(body, **_):
        if settings.node_auto_provisioning:
            rec.release(body)

    @kopf.timer(*wsres, registry=registry, interval=settings.progress_poll_seconds, initial_delay=1,
                when=lambda status, **_: status.get("state") == st.RUNNING)
    def poll_progress(body, patch, **_):
        progress = rec.poll_progress(body)
        if progress is not None:
            patch.status.update(rec.reconcile(body, progress=progress).status)

    def refresher(kind: str):
        def refresh(body, type, **_):
            owner = _owner_workspace(body)
            if owner is None or not rec.seen.changed(kind, body, deleted=type == "DELETED"):
                return
            ws = rec.get_workspace(*owner)
            if ws is None or ws["metadata"].get("deletionTimestamp"):
                return
            rec.write_status(*owner, rec.reconcile(ws).status)
        refresh.__name__ = f"refresh_from_{kind.lower()}"  # kopf's handler id
        return refresh

    kopf.on.event("batch", "v1", "jobs", labels=labelled, registry=registry)(refresher("Job"))
    kopf.on.event("apps", "v1", "deployments", labels=labelled, registry=registry)(refresher("Deployment"))
    kopf.on.event("", "v1", "pods", labels=labelled, registry=registry)(refresher("Pod"))

    if settings.webhook_port:
        from kaito_tuning.controller.admission import register_admission
        register_admission(settings, registry)
    return registry


def cli_operator(args) -> int:
    """``kaito-tuning operator``: run the handlers until interrupted."""
    import asyncio

    settings = from_env()
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()
        except (kubernetes.config.ConfigException, OSError) as e:
            raise UserError(f"no cluster to talk to: not in a pod and no usable kubeconfig ({e})",
                            field="KUBECONFIG") from None
    registry = register(settings)
    asyncio.run(kopf.operator(registry=registry, standalone=args.standalone,
                              namespaces=args.namespace, clusterwide=not args.namespace,
                              liveness_endpoint=args.liveness))
    return 0
