"""A Kubernetes API for tests: kmock's emulator plus what a real API server adds, the operator in-process, kubectl.

kmock 0.8's ``KubernetesEmulator`` keeps objects in memory but adds no uid, resourceVersion,
creationTimestamp or generation, gives lists no kind, keeps each API version's objects apart and
does no garbage collection. ``Emulator`` fills those gaps (stack-notes §7) so kopf, the kubernetes
client and kubectl all work against it:

* metadata stamped on create (uid, resourceVersion, creationTimestamp, generation 1, namespace)
  and on update (resourceVersion; generation +1 when anything but metadata/status changes);
* lists carry ``kind: <Kind>List`` and ``apiVersion``;
* ``kaito.sh/v1alpha1/workspaces`` is an alias of ``kaito.sh/v1beta1/workspaces`` (one object
  served through both versions, as the real API server does);
* deleting an object deletes the objects whose ownerReferences name its uid (background GC);
* ``metadata.generateName`` gives a unique name on create (kopf's Events use it);
* a JSON patch whose ``test`` op fails answers 422 as the API server does (kmock: 500, which kopf
  retries 9 times instead of re-reading the object);
* a request costs the same however many came before it (see ``__iter__``);
* a merge patch that names a ``metadata.resourceVersion`` other than the stored one answers 409
  Conflict (optimistic concurrency, as the API server does);
* fault hooks for the fault-injection suite: ``faults`` (``Fault``: answer a chosen status, hold a
  request, or serve it and answer an error anyway, for N matching requests), ``writes`` (every write
  served: action, resource, namespace, name, subresource, the client's token) and ``after_write``
  (called once a write is stored, before its answer leaves: where a test kills the writer).

Use it with ``pytestmark = pytest.mark.kmock(cls=Emulator)`` and the ``k8s`` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import itertools
import os
import subprocess
import uuid
from typing import Any, Callable

import jsonpatch
import kmock
import pytest
from kmock._internal import dsl, enums, references
from kmock._internal.k8s import KubernetesError

from kaito_tuning.spec.crd import crd_manifest

WORKSPACES = "kaito.sh/v1beta1/workspaces"
_ALIASES = {("kaito.sh", "v1alpha1", "workspaces"): ("kaito.sh", "v1beta1", "workspaces")}
_rv = itertools.count(1000)
# the request whose reaction is being chosen, in the task that serves it (see Emulator.__iter__)
_serving = contextvars.ContextVar("serving", default=None)
_WRITES = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)


@dataclasses.dataclass
class Fault:
    """What the emulator does to the next ``times`` requests ``match`` accepts: hold each ``delay`` seconds,
    then answer ``status`` (``reason``, ``message``) instead of serving it, or, with ``apply``, after serving
    it (the write is stored, the client is told it failed: a lost answer). ``status=None``: served, late."""

    match: Callable[[Any], bool]
    status: int | None = None
    reason: str = "InternalError"
    message: str = "an error on the server (injected)"
    delay: float = 0.0
    apply: bool = False
    times: int = 1
    hits: int = 0

    @staticmethod
    def on(action: str, resource: str, *, subresource: str | None = None, namespace: str | None = None,
           name: str | None = None, token: str | None = None) -> Callable[[Any], bool]:
        """A matcher: ``action`` (create/update/delete/fetch/list) of ``resource`` ("batch/v1/jobs"), optionally
        only in ``namespace``, of ``name``, from the client whose kubeconfig token is ``token``."""
        def match(request) -> bool:
            return (request.resource is not None and request.action.name == action.upper()
                    and (token is None or request.headers.get("Authorization") == f"Bearer {token}")
                    and _resource_name(request.resource) == resource and request.subresource == subresource
                    and (namespace is None or request.namespace == namespace) and (name is None or request.name == name))
        return match


def _resource_name(res) -> str:
    return f"{res.group}/{res.version}/{res.plural}" if res.group else f"{res.version}/{res.plural}"


def _write_name(request) -> str | None:
    if request.name is not None:
        return request.name
    return ((request.data or {}).get("metadata") or {}).get("name") if isinstance(request.data, dict) else None


class Emulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        crd = crd_manifest()["spec"]
        for v in crd["versions"]:
            self.resources[f"kaito.sh/{v['name']}/workspaces"] = kmock.ResourceInfo(
                kind="Workspace", namespaced=True, singular="workspace", shortnames=set(crd["names"]["shortNames"]),
                subresources={"status"}, verbs={"get", "list", "watch", "create", "update", "patch", "delete"})
        self.resources["karpenter.sh/v1/nodeclaims"] = kmock.ResourceInfo(
            kind="NodeClaim", namespaced=False, subresources={"status"},
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"})
        self.faults: list[Fault] = []
        self.writes: list[dict] = []
        self.after_write: Callable[[dict], None] | None = None

    def __iter__(self):
        """The requests the DSL's views see: while a request is served, only that one.

        kmock chooses a reaction with ``request in reaction_source``, which replays every request
        ever received through each reaction's filters: O(history) per request, quadratic over a
        run (after 230 requests, each one takes ~0.1 s). The filters judge one request at
        a time, so while serving, the request alone gives the same answer. Slices (``kmock[...][:1]``)
        depend on history: when any reaction has one, the full history is used as before. Outside
        of serving (assertions in tests), the full history is seen.
        """
        current = _serving.get()
        if current is not None:
            yield current
        else:
            yield from super().__iter__()

    def _KubernetesEmulator__get_objs(self, request, strict: bool) -> list:
        """The objects a request names. One object (a get, create, patch or delete) is a dict look-up by its
        key; kmock scans every stored object for it: O(objects) per request, quadratic over a run of 1,000
        workspaces. Lists keep kmock's scan (kopf lists each resource once)."""
        if strict and request.name is not None and request.resource is not None:
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [obj] if obj is not None else []
        return super()._KubernetesEmulator__get_objs(request, strict)

    async def _handle(self, request):
        history_dependent = any(True for payload in self._payloads for _ in payload._walk(dsl.Slicer))
        token = _serving.set(None if history_dependent else request)
        try:
            fault = self._fault_for(request)
            if fault is not None and fault.delay:
                await asyncio.sleep(fault.delay)
            if fault is not None and fault.status and not fault.apply:
                raise self._fault_error(fault, request)
            response = await self._handle_k8s(request)
            if request.resource is not None and request.action in _WRITES and response.status < 400:
                self._record_write(request)
            if fault is not None and fault.status and fault.apply:
                raise self._fault_error(fault, request)
            return response
        finally:
            _serving.reset(token)

    def _fault_for(self, request) -> Fault | None:
        for fault in self.faults:
            if fault.hits < fault.times and fault.match(request):
                fault.hits += 1
                return fault
        return None

    @staticmethod
    def _fault_error(fault: Fault, request) -> KubernetesError:
        # the Status a real API server sends: details name the object, never a traceback
        details = {"name": _write_name(request) or "", "kind": request.resource.plural if request.resource else ""}
        return KubernetesError(status=fault.status, reason=fault.reason, message=fault.message, details=details)

    def _record_write(self, request) -> None:
        auth = request.headers.get("Authorization") or ""
        write = {"action": request.action.name.lower(), "resource": _resource_name(request.resource),
                 "namespace": request.namespace, "name": _write_name(request), "subresource": request.subresource,
                 "token": auth.removeprefix("Bearer ")}
        self.writes.append(write)
        if self.after_write is not None:
            self.after_write(write)

    async def _handle_k8s(self, request):
        res = request.resource
        if res is not None and (res.group, res.version, res.plural) in _ALIASES:
            # the request is a frozen attrs object; kmock's filters read this field
            object.__setattr__(request, "resource", references.resource(*_ALIASES[res.group, res.version, res.plural]))
        if request.resource is not None:
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                self._stamp_new(request)
            elif request.action == enums.action.UPDATE and request.name is not None:
                self._check_precondition(request)
                self._stamp_update(request)
        deleted_uid = None
        if request.resource is not None and request.action == enums.action.DELETE and request.name is not None:
            deleted_uid = self._uid_of(request)
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:
            raise KubernetesError(status=422, reason="Invalid", message=f"the server rejected our request: {e}") from None
        if deleted_uid:
            await self._collect_garbage(deleted_uid)
        return response

    def _stamp_new(self, request) -> None:
        meta = request.data.setdefault("metadata", {})
        meta.setdefault("namespace", request.namespace) if request.namespace else None
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(_rv))
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1

    def _current(self, request):
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return None
        return None if obj.deleted else obj

    def _uid_of(self, request) -> str | None:
        obj = self._current(request)
        return (dict(obj).get("metadata") or {}).get("uid") if obj is not None else None

    def _check_precondition(self, request) -> None:
        """A merge patch naming a resourceVersion applies only to that version (409 Conflict otherwise)."""
        data, obj = request.data, self._current(request)
        want = ((data.get("metadata") or {}) if isinstance(data, dict) else {}).get("resourceVersion")
        have = (dict(obj).get("metadata") or {}).get("resourceVersion") if obj is not None else None
        if want and have and str(want) != str(have):
            raise KubernetesError(status=409, reason="Conflict", details={"name": request.name},
                                  message=f"Operation cannot be fulfilled on {request.resource.plural} "
                                          f'"{request.name}": the object has been modified; please apply your '
                                          "changes to the latest version and try again")

    def _stamp_update(self, request) -> None:
        obj = self._current(request)
        if obj is None:
            return
        meta = dict(dict(obj).get("metadata") or {})
        rv = str(next(_rv))
        gen = meta.get("generation") or 1
        data = request.data
        if isinstance(data, dict):
            if request.subresource != "status" and any(k not in ("metadata", "status", "apiVersion", "kind") for k in data):
                gen += 1
            data.setdefault("metadata", {})
            if isinstance(data["metadata"], dict):
                data["metadata"]["resourceVersion"] = rv
                data["metadata"]["generation"] = gen
        elif isinstance(data, list):  # JSON patch
            if request.subresource != "status" and any(not str(op.get("path", "")).startswith(("/metadata", "/status"))
                                                       for op in data):
                gen += 1
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            data.append({"op": "add", "path": "/metadata/generation", "value": gen})

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Background cascading deletion of everything owned by ``owner_uid``."""
        doomed = []
        for key, obj in list(self.objects.items()):
            if obj.deleted:
                continue
            refs = (dict(obj).get("metadata") or {}).get("ownerReferences") or []
            if any(r.get("uid") == owner_uid for r in refs):
                doomed.append(key)
        for resource, namespace, name in doomed:
            uid = (dict(self.objects[resource, namespace, name]).get("metadata") or {}).get("uid")
            async with self._lock:
                raw = self.objects[resource, namespace, name].raw
                self.objects[resource, namespace, name].delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
            if uid:
                await self._collect_garbage(uid)

    async def _serve_list(self, request):
        payload = await super()._serve_list(request)
        info = self.resources.get(request.resource) if hasattr(self.resources, "get") else None
        kind = getattr(info, "kind", None) or request.resource.plural.capitalize()
        group = request.resource.group
        payload["kind"] = f"{kind}List"
        payload["apiVersion"] = f"{group}/{request.resource.version}" if group else request.resource.version
        payload["metadata"] = {"resourceVersion": str(next(_rv))}
        return payload


# ---------------------------------------------------------------------- fixtures and helpers

@pytest.fixture
def kubeconfig(kmock, tmp_path, monkeypatch):
    """A kubeconfig pointing at kmock, for kubectl, kopf and the kubernetes client alike."""
    import kubernetes

    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{kmock.url}"}}}}]
users: [{{name: kmock, user: {{token: test}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: kmock, namespace: default}}}}]
current-context: kmock
""")
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    kubernetes.config.load_kube_config(config_file=str(path))
    return path


async def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the machine's kubectl in a thread (kmock serves on this loop); ``apply`` gets --validate=false."""
    argv = ["kubectl", *args]
    if args and args[0] in ("apply", "create", "replace"):
        argv.append("--validate=false")
    proc = await asyncio.to_thread(subprocess.run, argv, input=input, capture_output=True, text=True, timeout=timeout,
                                   env=dict(os.environ))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@contextlib.asynccontextmanager
async def running_operator(settings, *, api_client=None):
    """The operator in-process, on this loop; stopped (and awaited) on exit."""
    import kopf

    from kaito_tuning.controller.handlers import register

    registry = register(settings, api_client=api_client)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, standalone=True, clusterwide=True,
                                             stop_flag=stop, ready_flag=ready))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 20)


async def eventually(fn, timeout: float = 20.0, interval: float = 0.1):
    """Await until ``fn()`` (sync or async) returns a truthy value; return it, or fail with the last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while True:
        last = fn()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")
        await asyncio.sleep(interval)


def get_obj(kmock, resource: str, namespace: str | None, name: str) -> dict | None:
    """A stored object as a plain dict, or None."""
    try:
        obj = kmock.objects[resource, namespace, name]
    except KeyError:
        return None
    if obj.deleted:
        return None
    return _plain(obj.raw)


def list_objs(kmock, resource: str) -> list[dict]:
    out = []
    for (res, _, _), obj in list(kmock.objects.items()):
        if str(res) == resource or res == references.resource(resource):
            if not obj.deleted:
                out.append(_plain(obj.raw))
    return out


def _plain(x):
    if isinstance(x, dict) or hasattr(x, "items"):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
