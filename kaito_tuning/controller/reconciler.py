"""One idempotent ``Reconciler.reconcile(workspace)``: reads the world, creates what is missing, computes status.

It reads the ConfigMap, the secrets' types, the NodeClaim, the Job (or Deployment) and their pods,
creates what is missing, and computes the whole status from scratch (``status.py``), so a restart at
any point converges on exactly one Job (the Job is named after the workspace; a second create answers
409). What to do with what was read is decided by the pure functions of ``decisions.py``; this module
only does the API calls. An object with the workspace's name that the workspace does not own (no
ownerReference with its uid, or not its label) is never deleted or patched: the conflict is shown in
status instead.

NodeClaim release policy (``KAITO_NODECLAIM_RELEASE``): ``OnCompletion`` deletes the NodeClaim as
soon as the run has succeeded or failed (the GPU node is not held for nothing); ``OnDelete`` keeps
it until the workspace is deleted. Either way deleting the workspace deletes its NodeClaim (a
finalizer, since a cluster-scoped NodeClaim cannot be garbage-collected through an owner reference).
"""

from __future__ import annotations

import functools
import http.client
import inspect
import json
import time
from dataclasses import dataclass, field

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from kaito_tuning.contract import ANNOTATION_REVISION, ANNOTATION_SPEC_HASH, LABEL_WORKSPACE
from kaito_tuning.controller import decisions as d
from kaito_tuning.controller import inference, logs
from kaito_tuning.controller import manifests as m
from kaito_tuning.controller import status as st
from kaito_tuning.controller.seen import SeenObjects
from kaito_tuning.controller.settings import Settings
from kaito_tuning.spec.rules import validate_workspace
from kaito_tuning.spec.training_config import CONFIG_KEY, TuningConfig, parse_config
from kaito_tuning.spec.workspace import GROUP, PLURAL, STORAGE_VERSION, Workspace, parse_workspace

DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
# Every API request of the operator, ours (kubernetes client) and kopf's (handlers.configure), ends within
# this many seconds: a request the API server never answers fails and is retried instead of holding a
# worker (and the workspace) forever. The kubernetes client has no timeout unless given one per call.
API_TIMEOUT_SECONDS = 30.0
PROGRESS_DEADLINE_SECONDS = 3.0  # the whole /progress read, connect to last byte (a kopf worker waits for it)
PROGRESS_MAX_BYTES = 1 << 16
DEFAULT_CONFIGMAP_TTL_SECONDS = 30.0  # how long a namespace's default ConfigMap, once there, is not created again
#: how long a pull/push secret found right (there, of type dockerconfigjson) is not read again: a burst of workspaces
#: naming one push secret read it once each (a ninth of the operator's requests at 1,000 workspaces). A secret
#: found missing or wrong is read again on every reconcile; one deleted after a check is seen missing at most
#: this late (an informer cache, as Go controllers read secrets from, lags the same way)
SECRET_CHECK_TTL_SECONDS = 5.0


@dataclass
class Outcome:
    status: dict
    retry_after: float | None = None
    retry_reason: str = ""
    events: list[dict] = field(default_factory=list)


def _api_status(e: ApiException) -> int:
    return getattr(e, "status", 0) or 0


def _json(call, *args, **kwargs) -> dict:
    """``call(*args, **kwargs)`` (a kubernetes client method) answered as plain dicts: the form watch events
    have, without the client's model round trip (parsing every field into models, then back to dicts) and
    without its per-call argument validation (pydantic: 7% of a reconcile's CPU, py-spy). The request is the
    one the method builds (its ``_<name>_serialize``: same path, query, headers, content type)."""
    api = call.__self__
    serialize = getattr(api, f"_{call.__name__}_serialize")
    names = _serializer_params(serialize.__func__)
    values = {**dict.fromkeys(names), **dict(zip(names, args)), "_host_index": 0, **kwargs}
    return _answer(api.api_client.call_api(*serialize(**values)))


@functools.lru_cache(maxsize=None)
def _serializer_params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)[1:]  # without self


def _answer(response) -> dict:
    response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(http_resp=response)
    return json.loads(response.data)


@functools.lru_cache(maxsize=64)
def _parse_config(text: str, method: str, source: str) -> tuple[TuningConfig, tuple]:
    """``parse_config``, once per distinct ConfigMap text (every reconcile checks it)."""
    config, problems = parse_config(text, method=method, source=source)
    return config, tuple(problems)


#: the kinds of object ``Reconciler.create`` POSTs: (API group, collection). RBAC grants create on exactly
#: these (tests/controller/test_deploy.py)
CREATED_KINDS = {"ConfigMap": ("", "configmaps"), "Secret": ("", "secrets"), "Service": ("", "services"),
                 "PersistentVolumeClaim": ("", "persistentvolumeclaims"), "Job": ("batch", "jobs"),
                 "NetworkPolicy": ("networking.k8s.io", "networkpolicies"), "Deployment": ("apps", "deployments")}


class TimedApiClient(kubernetes.client.ApiClient):
    """The kubernetes client with ``API_TIMEOUT_SECONDS`` on every call that does not set its own."""

    def call_api(self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
        return super().call_api(method, url, header_params, body, post_params,
                                _request_timeout=_request_timeout or API_TIMEOUT_SECONDS)


def api_error_text(e: BaseException) -> str:
    """One line for a failed API call: the status, reason and the API server's message, not the client's
    dump of response headers and body (``str(ApiException)``)."""
    if not isinstance(e, ApiException):
        return " ".join(str(e).split())
    reason, message = e.reason, ""
    try:
        answer = json.loads(e.body or "{}")
        reason, message = answer.get("reason") or reason, answer.get("message") or ""
    except (ValueError, TypeError, AttributeError):
        pass
    return " ".join(f"the API server answered {_api_status(e)} {reason or ''}{': ' if message else ''}{message}".split())


def ws_key(body: dict) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


class Reconciler:
    """Reads and writes the cluster through the kubernetes client; decisions come from decisions/manifests/status."""

    def __init__(self, settings: Settings, api_client=None):
        self.settings = settings
        self.seen = SeenObjects()
        self._configmaps: dict[tuple[str, str], float] = {}  # default ConfigMaps known to exist: when last seen
        self._good_secrets: dict[tuple[str, str], float] = {}  # secrets last found right: when
        api_client = api_client or TimedApiClient()
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.networking = kubernetes.client.NetworkingV1Api(api_client)

    def create(self, namespace: str, obj: dict) -> dict:
        """POST a manifest as the JSON it already is; the API server's answer as plain dicts. The generated
        client validates a dict body into its models (pydantic) and dumps it back before sending: for a Job
        that was a quarter of the operator's CPU (bench/bench_apply_100.py)."""
        api = self.batch.api_client
        group, plural = CREATED_KINDS[obj["kind"]]
        version = obj["apiVersion"]
        assert version.rpartition("/")[0] == group, f"{obj['kind']} is {version}, not in group {group!r}"
        prefix = "/api/v1" if version == "v1" else f"/apis/{version}"
        method, url, headers, _, _ = api.param_serialize(
            method="POST", resource_path=f"{prefix}/namespaces/{{namespace}}/{plural}",
            path_params={"namespace": namespace}, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": "application/json"})
        return _answer(api.call_api(method, url, headers, obj))  # param_serialize would walk the body (sanitize)

    # ---------------------------------------------------------------- entry points

    def reconcile(self, body: dict, *, images, progress: dict | None = None) -> Outcome:
        """The workspace's status (and the objects it needs) now. ``images``: the operator's index of output
        images (image key -> the workspaces pushing there, ``decisions.output_image_claim``), kept by kopf from
        the watch, so that no reconcile lists every workspace."""
        obj = json.loads(json.dumps(dict(body)))  # plain dicts, no kopf views
        prev = obj.get("status") or {}
        gen = (obj.get("metadata") or {}).get("generation")
        ws, problems = parse_workspace({k: v for k, v in obj.items() if k != "status"})
        problems += validate_workspace(ws, allow_private_urls=not self.settings.deny_private_urls,
                                       volume_types=self.settings.volume_types)
        if problems:
            msg = d.clip("; ".join(str(p) for p in problems))
            conds = [st.condition(t, False, "InvalidSpec", msg) for t in ("ResourceReady", "WorkspaceSucceeded")]
            outcome = Outcome({"state": st.FAILED,
                               "conditions": st.merge_conditions(prev.get("conditions"), conds, gen, st.now_iso())})
        elif ws.inference is not None:
            outcome = self._inference(ws, obj, prev, gen)
        else:
            outcome = self._tuning(ws, obj, prev, gen, progress, images)
        outcome.events = d.events(prev, outcome.status)
        for e in outcome.events:
            logs.decision(ws_key(obj), "phase", e["message"], reason=e["reason"], state=outcome.status.get("state"))
        return outcome

    def poll_progress(self, body: dict) -> dict | None:
        """The tuner's /progress JSON (init container or not), or None when no pod of the current Job answers.

        Only a pod of the workspace's current Job (by ownerReference uid) is asked; no redirect is
        followed; the whole read has one deadline, so a trickling pod cannot hold a kopf worker.
        """
        ws_name, ns = body["metadata"]["name"], body["metadata"].get("namespace", "default")
        job = self._get_job(ns, ws_name)
        if job is None or not d.owned_by(job, body["metadata"].get("uid"), ws_name):
            return None
        pods = d.pods_of(self._pods(ns, ws_name, None), job["metadata"].get("uid"))
        pod = st.progress_pod(pods)
        if pod is None:
            return None
        try:
            return read_progress(pod["status"]["podIP"], m.PROGRESS_PORT)
        except (OSError, ValueError, http.client.HTTPException) as e:
            logs.decision(ws_key(body), "progress", f"no progress from pod {pod['metadata']['name']}: {e}",
                          level=10)
            return None

    def get_workspace(self, namespace: str, name: str) -> dict | None:
        try:
            return _json(self.custom.get_namespaced_custom_object, GROUP, STORAGE_VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if _api_status(e) == 404:
                return None
            raise

    def write_status(self, namespace: str, name: str, previous: dict | None, status: dict,
                     resource_version: str | None = None) -> str | None:
        """Replace the status (stale keys of ``previous`` set to null in the merge patch). With
        ``resource_version`` (that of the workspace the status was computed from), only if the workspace
        has not changed since: the API server answers 409 otherwise, so a status computed from an older
        read (a slow or retried write) never replaces a newer one. Returns the workspace's resourceVersion
        after the write."""
        body = {"status": d.status_patch(previous, status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        written = _json(self.custom.patch_namespaced_custom_object_status, GROUP, STORAGE_VERSION, namespace, PLURAL,
                        name, body)
        return (written.get("metadata") or {}).get("resourceVersion")

    def release(self, body: dict) -> None:
        """Delete the workspace's NodeClaim (on workspace deletion)."""
        ws, _ = parse_workspace({k: v for k, v in dict(body).items() if k != "status"})
        self._delete_nodeclaim(ws)

    # ---------------------------------------------------------------- tuning

    def _tuning(self, ws: Workspace, obj: dict, prev: dict, gen, progress, images, fresh: bool | None = None) -> Outcome:
        """``fresh`` (default: the workspace has no status yet, so no reconcile has finished): the Job is created
        without reading it first (a 404 on nearly every new workspace). Unless that create makes the Job (it
        answers 409, or something blocks it), the workspace is reconciled again as any other: Job read first."""
        ns, name, key = ws.namespace, ws.name, ws_key(obj)
        ws_uid = obj["metadata"].get("uid")
        prev_t = prev.get("tuning") or {}
        digest = m.spec_hash(ws)
        fresh = not prev if fresh is None else fresh
        job = None if fresh else self._get_job(ns, name)
        blocker = None
        if job is not None and not d.owned_by(job, ws_uid, name):
            blocker, job = d.conflict("Job", name, ns), None
            logs.decision(key, "conflict", blocker["message"], reason=blocker["reason"], level=30)
        elif d.job_is_stale(job, digest):
            logs.decision(key, "delete-stale-job", f"the spec changed: deleting job of revision "
                          f"{d.annotation(job, ANNOTATION_REVISION)}", job=name)
            self._delete_job(ns, name, job["metadata"].get("uid"))
            job = None
        revision = d.revision(job, prev_t, digest)
        finished_before = d.finished(prev, digest)

        prereq_blocker, config = self._prerequisites(ws)
        blocker = blocker or prereq_blocker
        provisioning = self.settings.node_auto_provisioning
        claim = None
        if d.needs_nodeclaim(provisioning, finished_before, self.settings.nodeclaim_release):
            claims, claim_blocker = self._ensure_nodeclaims(ws)
            blocker = blocker or claim_blocker
            # the run needs every node: the first claim that is not ready is the one to show
            claim = next((c for c in claims if not st.nodeclaim_ready(c)[0]), claims[-1] if claims else None)
            ready, reason, message = st.nodeclaim_ready(claim)
            if blocker is None and not ready:
                blocker = {"reason": reason, "message": message}
        if blocker is None and job is None and ws.tuning.output.image:
            blocker = self._output_image_conflict(ws, obj, images)

        if job is None and finished_before:
            logs.decision(key, "keep-finished", "the finished run's job was deleted; its result is kept")
            return Outcome(d.kept_result(prev))
        recreated = d.recreate_deleted_job(job, prev, digest)
        created = False
        if job is None and blocker is None:
            job, blocker, created = self._create_job(ws, obj, config, revision, recreated, read_on_conflict=not fresh)
        if fresh and not created:
            return self._tuning(ws, obj, prev, gen, progress, images, fresh=False)
        # a Job created just now has no pods yet: the job controller makes them once it exists
        pods = d.pods_of(self._pods(ns, name, revision), job["metadata"].get("uid")) \
            if job is not None and not created else []
        status = st.tuning_status(prev, generation=gen, job=job, pods=pods, revision=revision, progress=progress,
                                  blocker=blocker, nodeclaim=claim, provisioning=provisioning,
                                  output_volume=bool(ws.tuning.output.volume_source))
        status["tuning"]["specHash"] = digest
        status["tuning"]["parallelism"] = d.annotation(job, m.ANNOTATION_PARALLELISM) or str(m.parallelism(ws))
        if recreated and job is not None:
            status["tuning"]["note"] = f"job {name} was deleted before the run finished; recreated it"
        elif prev_t.get("note") and prev_t.get("revision") == revision and job is not None:
            status["tuning"]["note"] = prev_t["note"]  # history of this revision, kept until the next one
        if d.release_nodeclaim(provisioning, status["state"], self.settings.nodeclaim_release):
            self._delete_nodeclaim(ws)
        if blocker is not None:
            logs.decision(key, "wait", blocker["message"], reason=blocker["reason"])
            if d.retry_helps(blocker):
                return Outcome(status, self.settings.retry_delay_seconds, f"{blocker['reason']}: {blocker['message']}")
        return Outcome(status)

    def _prerequisites(self, ws: Workspace) -> tuple[dict | None, TuningConfig | None]:
        """(blocker, parsed config): the ConfigMap and the secrets the Job needs must exist and be right."""
        ns, t = ws.namespace, ws.tuning
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
            return {"reason": "ConfigInvalid", "message": d.clip(f"ConfigMap {m.config_map_name(ws)}: "
                                                                 + "; ".join(str(p) for p in problems))}, None
        secrets = [("tuning.output.imagePushSecret", t.output.image_push_secret)] if t.output.image else []
        secrets += [(f"tuning.input.imagePullSecrets[{i}]", s) for i, s in enumerate(t.input.image_pull_secrets)]
        secrets += [(f"tuning.preset.presetOptions.imagePullSecrets[{i}]", s)
                    for i, s in enumerate(m.weights_pull_secrets(ws, self.settings))]
        for field_, secret in secrets:
            if (b := self._check_secret(ns, field_, secret)):
                return b, config
        return None, config

    def _check_secret(self, ns: str, field_: str, name: str) -> dict | None:
        if (b := d.placeholder_secret(field_, name, ns)):
            return b  # not a name the API server could hold: no read
        # Why a read of the Secret: a missing secret or one without .dockerconfigjson would leave the pod
        # in ContainerCreating with the reason only in a FailedMount Event, never in pod status. RBAC has
        # no metadata-only read (a PartialObjectMetadata GET needs the same `get`, a `list` with a type
        # field selector returns contents too), so the check reads the one named Secret, keeps only its
        # type and key names, and never logs or stores a value.
        key, now = (ns, name), time.monotonic()
        if now - self._good_secrets.get(key, -SECRET_CHECK_TTL_SECONDS) < SECRET_CHECK_TTL_SECONDS:
            return None
        try:
            raw = _json(self.core.read_namespaced_secret, name, ns)
        except ApiException as e:
            if _api_status(e) != 404:
                raise
            return {"reason": "SecretNotFound",
                    "message": f"{field_}: secret {name!r} does not exist in namespace {ns!r}; create it with "
                               f"`kubectl create secret docker-registry {name} -n {ns} --docker-server=... "
                               "--docker-username=... --docker-password=...`"}
        type_, keys = raw.get("type"), set(raw.get("data") or {})
        del raw
        if type_ != DOCKERCONFIGJSON or ".dockerconfigjson" not in keys:
            return {"reason": "SecretWrongType",
                    "message": f"{field_}: secret {name!r} is of type {type_!r}; it must be {DOCKERCONFIGJSON} "
                               "with the key .dockerconfigjson (kubectl create secret docker-registry)"}
        self._good_secrets[key] = now
        return None

    def _ensure_default_configmap(self, ws: Workspace) -> str:
        """Create the method's default ConfigMap in the namespace if missing; return its config text. Once it
        exists (created, or 409), it is not created again for ``DEFAULT_CONFIGMAP_TTL_SECONDS`` (a burst of
        workspaces in one namespace made one create each, all but the first answered 409); one deleted by hand
        is recreated by the first reconcile after that."""
        cm = m.default_configmap(ws)
        key, now = (ws.namespace, cm["metadata"]["name"]), time.monotonic()
        if now - self._configmaps.get(key, -DEFAULT_CONFIGMAP_TTL_SECONDS) >= DEFAULT_CONFIGMAP_TTL_SECONDS:
            self._create_ignoring_conflict(lambda: self.create(ws.namespace, cm))
            self._configmaps[key] = now
        return cm["data"][CONFIG_KEY]

    def _create_job(self, ws: Workspace, obj: dict, config: TuningConfig, revision: int, recreated: bool,
                    read_on_conflict: bool = True) -> tuple[dict | None, dict | None, bool]:
        """(job, blocker, whether this call created the job). A 409 without ``read_on_conflict``: (None, None,
        False), the caller reads the Job."""
        key = ws_key(obj)
        if (pvc := m.checkpoint_pvc(ws, self.settings)):
            kopf.adopt(pvc, owner=obj)
            self._create_ignoring_conflict(lambda: self.create(ws.namespace, pvc))
        if (b := self._ensure_owned(obj, m.workspace_secret(ws), self.core.read_namespaced_secret,
                                    self.core.patch_namespaced_secret)):
            return None, b, False
        if (svc := m.workers_service(ws)) and (b := self._ensure_owned(obj, svc, self.core.read_namespaced_service)):
            return None, b, False
        if (policy := m.egress_policy(ws, self.settings)) and (b := self._ensure_owned(
                obj, policy, self.networking.read_namespaced_network_policy)):
            return None, b, False
        job = m.tuning_job(ws, self.settings, config, revision=revision)
        kopf.adopt(job, owner=obj)
        self.seen.expect("Job", job)
        try:
            created = self.create(ws.namespace, job)
        except Exception as e:
            self.seen.record("Job", job)  # no uid: only ends the expectation
            if not isinstance(e, ApiException) or _api_status(e) != 409:
                raise
        else:
            logs.decision(key, "recreate-job" if recreated else "create-job",
                          f"created job {ws.name} (revision {revision})", revision=revision)
            self.seen.record("Job", created)  # its ADDED event brings nothing new
            return created, None, True
        if not read_on_conflict:
            return None, None, False
        current = self._get_job(ws.namespace, ws.name)  # created meanwhile, maybe by a previous revision
        if current is not None and not d.owned_by(current, obj["metadata"].get("uid"), ws.name):
            return None, d.conflict("Job", ws.name, ws.namespace), False
        if current is not None and d.annotation(current, ANNOTATION_SPEC_HASH) != m.spec_hash(ws):
            return None, {"reason": "PreviousJobDeleting",
                          "message": "waiting for the job of the previous revision to be deleted"}, False
        return current, None, False

    def _ensure_owned(self, owner: dict, want: dict, read, patch=None) -> dict | None:
        """Create ``want`` (owned by the workspace); if it exists, check it is the workspace's and (with ``patch``)
        bring its data up to date. A blocker when an object of that name is someone else's: never overwritten."""
        kopf.adopt(want, owner=owner)
        meta = want["metadata"]
        try:
            self.create(meta["namespace"], want)
            return None
        except ApiException as e:
            if _api_status(e) != 409:
                raise
        current = _json(read, meta["name"], meta["namespace"])
        if not d.owned_by(current, owner["metadata"].get("uid"), owner["metadata"]["name"]):
            return d.conflict(want["kind"], meta["name"], meta["namespace"])
        del current  # a Secret's data: not kept
        if patch is not None:
            patch(meta["name"], meta["namespace"], {k: want[k] for k in ("stringData", "data") if k in want})
        return None

    def _output_image_conflict(self, ws: Workspace, obj: dict, images) -> dict | None:
        """OutputImageConflict when a workspace created earlier pushes to the same repository:tag."""
        first = d.output_image_owner(obj, list(images.get(d.image_key(ws.tuning.output.image), ())))
        if first is None:
            return None
        return {"reason": "OutputImageConflict",
                "message": f"tuning.output.image {ws.tuning.output.image!r} is also the output of workspace {first} "
                           "(created earlier): each run would overwrite the other's adapter; choose another tag or "
                           "repository"}

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

    def _delete_job(self, ns: str, name: str, uid: str | None) -> None:
        """Delete the Job ``uid`` (a precondition: never a Job that replaced it meanwhile)."""
        body = {"propagationPolicy": "Background", **({"preconditions": {"uid": uid}} if uid else {})}
        try:
            self.batch.delete_namespaced_job(name, ns, body=body)
        except ApiException as e:
            if _api_status(e) not in (404, 409):
                raise

    def _pods(self, ns: str, ws_name: str, revision: int | None) -> list[dict]:
        sel = f"{LABEL_WORKSPACE}={ws_name}"
        items = _json(self.core.list_namespaced_pod, ns, label_selector=sel).get("items") or []
        # filter here as well: the selector is the server's job, but cheap to re-check
        pods = [p for p in items if (p.get("metadata", {}).get("labels") or {}).get(LABEL_WORKSPACE) == ws_name]
        if revision is not None:
            pods = [p for p in pods if (p["metadata"].get("annotations") or {}).get(ANNOTATION_REVISION,
                                                                                   str(revision)) == str(revision)]
        return pods

    # ---------------------------------------------------------------- nodes

    def _ensure_nodeclaims(self, ws: Workspace) -> tuple[list[dict | None], dict | None]:
        """Every node's NodeClaim (one per node of the run), created when missing."""
        claims, blocker = [], None
        for i in range(m.node_count(ws)):
            claim, b = self._ensure_nodeclaim(ws, i)
            claims.append(claim)
            blocker = blocker or b
        return claims, blocker

    def _ensure_nodeclaim(self, ws: Workspace, index: int = 0) -> tuple[dict | None, dict | None]:
        claim = m.nodeclaim(ws, index)
        name = claim["metadata"]["name"]
        try:
            return self.custom.get_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", name), None
        except ApiException as e:
            if _api_status(e) != 404:
                raise
        try:
            created = self.custom.create_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", claim)
            logs.decision(f"{ws.namespace}/{ws.name}", "create-nodeclaim", f"created NodeClaim {name}")
            return created, None
        except ApiException as e:
            if _api_status(e) == 409:
                return self.custom.get_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", name), None
            if _api_status(e) == 404:
                return None, {"reason": "NodeClaimUnavailable",
                              "message": "node auto-provisioning is on but karpenter.sh/v1 NodeClaim is not installed"}
            raise

    def _delete_nodeclaim(self, ws: Workspace) -> None:
        """Delete every NodeClaim of the workspace (one per node)."""
        for name in m.nodeclaim_names(ws):
            try:
                self.custom.delete_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", name)
                logs.decision(f"{ws.namespace}/{ws.name}", "release-nodeclaim", f"released NodeClaim {name}")
            except ApiException as e:
                if _api_status(e) != 404:
                    raise

    # ---------------------------------------------------------------- inference

    def _inference(self, ws: Workspace, obj: dict, prev: dict, gen) -> Outcome:
        ns, name, key = ws.namespace, ws.name, ws_key(obj)
        blocker = None
        for i, a in enumerate(ws.inference.adapters):
            for j, s in enumerate(a.source.image_pull_secrets if a.source.image else []):
                blocker = blocker or self._check_secret(ns, f"inference.adapters[{i}].source.imagePullSecrets[{j}]", s)
        for i, s in enumerate(m.weights_pull_secrets(ws, self.settings)):  # mounted into the server
            blocker = blocker or self._check_secret(ns, f"inference.preset.presetOptions.imagePullSecrets[{i}]", s)
        deployment = None
        if blocker is None:
            want = inference.inference_deployment(ws, self.settings)
            kopf.adopt(want, owner=obj)
            try:
                current = _json(self.apps.read_namespaced_deployment, name, ns)
            except ApiException as e:
                if _api_status(e) != 404:
                    raise
                current = None
            if current is None:
                self._create_ignoring_conflict(lambda: self.create(ns, want))
                logs.decision(key, "create-deployment", f"created deployment {name}")
            elif not d.owned_by(current, obj["metadata"].get("uid"), name):
                blocker = d.conflict("Deployment", name, ns)
                logs.decision(key, "conflict", blocker["message"], reason=blocker["reason"], level=30)
            elif d.annotation(current, ANNOTATION_SPEC_HASH) != m.spec_hash(ws):
                # a merge patch replaces lists whole (containers, volumes); the new template rolls the pods
                self.apps.patch_namespaced_deployment(name, ns, {"metadata": want["metadata"], "spec": want["spec"]},
                                                      _content_type="application/merge-patch+json")
                logs.decision(key, "update-deployment", f"the spec changed: updated deployment {name}")
            if blocker is None:
                svc = inference.inference_service(ws)
                kopf.adopt(svc, owner=obj)
                self._create_ignoring_conflict(lambda: self.create(ns, svc))
                deployment = _json(self.apps.read_namespaced_deployment, name, ns)
        pods = self._pods(ns, name, None) if deployment is not None else []
        status = st.inference_status(prev, generation=gen, deployment=deployment, pods=pods, blocker=blocker)
        if blocker:
            logs.decision(key, "wait", blocker["message"], reason=blocker["reason"])
            return Outcome(status, self.settings.retry_delay_seconds, f"{blocker['reason']}: {blocker['message']}")
        return Outcome(status)


def read_progress(host: str, port: int, deadline: float = PROGRESS_DEADLINE_SECONDS,
                  max_bytes: int = PROGRESS_MAX_BYTES) -> dict:
    """GET http://host:port/progress within ``deadline`` seconds in total; no redirects; at most ``max_bytes``."""
    end = time.monotonic() + deadline

    def left() -> float:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete answer within {deadline}s")
        return remaining

    conn = http.client.HTTPConnection(host, port, timeout=left())
    try:
        conn.request("GET", "/progress", headers={"Accept": "application/json"})
        sock = conn.sock  # the connection drops it once the answer says "close"; the response still reads it
        sock.settimeout(left())
        resp = conn.getresponse()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")  # a 3xx is not followed
        body = b""
        while len(body) <= max_bytes:
            sock.settimeout(left())
            chunk = resp.read1(4096) if hasattr(resp, "read1") else resp.read(4096)
            if not chunk:
                break
            body += chunk
        if len(body) > max_bytes:
            raise ValueError(f"answer larger than {max_bytes} bytes")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    finally:
        conn.close()
