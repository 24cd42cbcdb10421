"""Which watch events of Jobs, Deployments and pods (and of workspaces: ``OwnStatusWrites``) are worth a reconcile."""

from __future__ import annotations

import collections
import json
import threading

from kaito_tuning.contract import ANNOTATION_SPEC_HASH
from kaito_tuning.controller.decisions import annotation


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
            self._expected[self._key(kind, body)] = annotation(body, ANNOTATION_SPEC_HASH)

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
                and self._expected.get(key) == annotation(body, ANNOTATION_SPEC_HASH)
            self._digests[key] = digest
            return not own_echo


class OwnStatusWrites:
    """The resourceVersion each workspace got from the status write of its last reconcile that succeeded.

    A reconcile writes the status (our request, resourceVersion A→B), then kopf patches its own annotations
    (B→C). When the watch lags behind by more than kopf's ``consistency_timeout`` (5 s; seen under load: 1,000
    workspaces applied at once), kopf takes the event of B for the object's latest state: it lacks kopf's
    annotations, so kopf calls the create handler again, on a workspace that differs from the one just
    reconciled only by the status that reconcile wrote (a status write cannot change spec or metadata). That
    call is answered from here, without a reconcile (5 API requests, and a 409 when its status differed). Only
    a reconcile that ended without a retry is remembered: a workspace waiting for a retry is reconciled again.
    Bounded: the oldest entries go first (a forgotten one costs one reconcile).
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._versions: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def record(self, uid: str | None, resource_version: str | None) -> None:
        if not uid or not resource_version:
            return
        with self._lock:
            self._versions[uid] = resource_version
            self._versions.move_to_end(uid)
            while len(self._versions) > self._limit:
                self._versions.popitem(last=False)

    def forget(self, uid: str | None) -> None:
        with self._lock:
            self._versions.pop(uid, None)

    def is_own_echo(self, body) -> bool:
        """Whether ``body`` is exactly the workspace as our last successful reconcile's status write left it."""
        meta = body.get("metadata") or {}
        rv = meta.get("resourceVersion")
        with self._lock:
            return rv is not None and self._versions.get(meta.get("uid")) == rv
