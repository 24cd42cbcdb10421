"""The reconcile decisions as pure functions: what the Reconciler does with what it has read.

No API calls here (``reconciler.py`` does the I/O), so each rule can be read and tested on its own:
which revision a run is, whether the current Job is stale, whether a Job or Deployment is ours to
touch, when a NodeClaim is released, whether a deleted Job is recreated, which keys of the previous
status are removed, which phase changes become Events.
"""

from __future__ import annotations

import re

from kaito_tuning import redact
from kaito_tuning.artifacts import reference as imageref
from kaito_tuning.contract import ANNOTATION_REVISION, ANNOTATION_SPEC_HASH, LABEL_WORKSPACE
from kaito_tuning.controller import status as st

#: a Kubernetes object name (DNS-1123 subdomain): what `kubectl create secret` accepts
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_MESSAGE = 1024  # status messages and Events are truncated to this


def annotation(obj: dict | None, key: str) -> str | None:
    return (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(key)


# ------------------------------------------------------------------ ownership

def owned_by(obj: dict, ws_uid: str | None, ws_name: str) -> bool:
    """Whether ``obj`` belongs to the workspace: an ownerReference naming its uid AND its label."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(LABEL_WORKSPACE) != ws_name:
        return False
    return bool(ws_uid) and any(r.get("uid") == ws_uid for r in meta.get("ownerReferences") or [])


def conflict(kind: str, name: str, namespace: str) -> dict:
    """The blocker shown when an object with the workspace's name is not the workspace's."""
    return {"reason": f"{kind}Conflict",
            "message": f"a {kind} named {name!r} already exists in namespace {namespace!r} and is not owned by this "
                       f"workspace; the operator does not touch it: delete or rename that {kind}, or rename the "
                       "workspace"}


def pods_of(pods: list[dict], owner_uid: str | None) -> list[dict]:
    """The pods whose controller ownerReference is ``owner_uid`` (a Job's pods); all of them when it is None."""
    if owner_uid is None:
        return list(pods)
    return [p for p in pods if any(r.get("uid") == owner_uid for r in (p.get("metadata") or {}).get("ownerReferences")
                                   or [])]


# ------------------------------------------------------------------ the tuning Job

def job_is_stale(job: dict | None, digest: str) -> bool:
    """A Job made for another spec (its spec-hash annotation differs): it is deleted, a new revision runs."""
    return job is not None and annotation(job, ANNOTATION_SPEC_HASH) != digest


def revision(job: dict | None, prev_tuning: dict, digest: str) -> int:
    """The run's revision: the current Job's; the previous one while the spec is unchanged; else one more."""
    if job is not None:
        return int(annotation(job, ANNOTATION_REVISION) or 1)
    if prev_tuning.get("specHash") == digest:
        return int(prev_tuning.get("revision") or 1)
    return int(prev_tuning.get("revision") or 0) + 1


def finished(prev_status: dict, digest: str) -> bool:
    """Whether this spec's run already finished (Succeeded or Failed) according to the last status."""
    return (prev_status.get("tuning") or {}).get("specHash") == digest and \
        prev_status.get("state") in (st.SUCCEEDED, st.FAILED)


def recreate_deleted_job(job: dict | None, prev_status: dict, digest: str) -> bool:
    """A Job of this spec was deleted by hand before its run finished: create it again (same revision).

    The Job of a *finished* run is never recreated: its result stays in status and nothing re-runs.
    """
    prev_t = prev_status.get("tuning") or {}
    return job is None and prev_t.get("specHash") == digest and bool(prev_t.get("jobName")) \
        and not finished(prev_status, digest)


def kept_result(prev_status: dict) -> dict:
    """The status of a finished run whose Job was deleted: the previous one, noting it."""
    out = dict(prev_status)
    out["tuning"] = {**(prev_status.get("tuning") or {}), "jobName": None,
                     "note": "the finished job was deleted; status kept"}
    return out


# ------------------------------------------------------------------ output images

def image_key(ref: str) -> str:
    """A pushed image's identity: registry (lower case) / repository : tag (``latest`` when none is given)."""
    try:
        r = imageref.parse(ref)
    except imageref.InvalidReference:
        return ref.strip()
    return f"{r.registry.lower()}/{r.repository}:{r.tag or 'latest'}"


def _output_image(obj: dict) -> str | None:
    out = ((obj.get("spec") or obj).get("tuning") or {}).get("output") or {}
    image = out.get("image") if isinstance(out, dict) else None
    return image if isinstance(image, str) and image else None


def _order(obj: dict) -> tuple[str, int, str, str]:
    """Which of two workspaces came first: creation time (1 s resolution), then the one whose run has a Job
    already, then namespace/name."""
    meta = obj.get("metadata") or {}
    started = bool(((obj.get("status") or {}).get("tuning") or {}).get("jobName"))
    return (meta.get("creationTimestamp") or "9999", 0 if started else 1, meta.get("namespace") or "default",
            meta.get("name") or "")


def output_image_claim(obj: dict) -> tuple[str, dict] | None:
    """(image key, what ``output_image_owner`` reads of this workspace) for the operator's in-memory index of
    output images (so a reconcile does not list every workspace of the cluster), or None without an image."""
    image = _output_image(obj)
    if image is None:
        return None
    meta = obj.get("metadata") or {}
    job = ((obj.get("status") or {}).get("tuning") or {}).get("jobName")
    return image_key(image), {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp")
                     if meta.get(k) is not None},
        "tuning": {"output": {"image": image}}, "status": {"tuning": {"jobName": job} if job else {}}}


def output_image_owner(obj: dict, workspaces: list[dict]) -> str | None:
    """``namespace/name`` of the workspace before ``obj`` that pushes to the same image, or None.

    The earliest workspace keeps the image (``_order``); a later one waits until the earlier one is
    deleted or one of them changes its output.
    """
    mine = _output_image(obj)
    if mine is None:
        return None
    key, me = image_key(mine), _order(obj)
    uid = (obj.get("metadata") or {}).get("uid")
    earlier = []
    for other in workspaces:
        meta = other.get("metadata") or {}
        if (uid and meta.get("uid") == uid) or _order(other)[2:] == me[2:] or meta.get("deletionTimestamp"):
            continue
        image = _output_image(other)
        if image is not None and image_key(image) == key and _order(other) < me:
            earlier.append(_order(other))
    if not earlier:
        return None
    first = min(earlier)
    return f"{first[2]}/{first[3]}"


# ------------------------------------------------------------------ nodes

def needs_nodeclaim(provisioning: bool, run_finished: bool, release_policy: str) -> bool:
    """Whether the workspace should have a NodeClaim now (none after a finished run with OnCompletion)."""
    return provisioning and not (run_finished and release_policy == "OnCompletion")


def release_nodeclaim(provisioning: bool, state: str, release_policy: str) -> bool:
    """Whether to delete the NodeClaim after this reconcile: the run ended and the policy is OnCompletion."""
    return provisioning and state in (st.SUCCEEDED, st.FAILED) and release_policy == "OnCompletion"


# ------------------------------------------------------------------ secrets

def is_object_name(name: str) -> bool:
    return len(name) <= 253 and bool(_DNS1123_SUBDOMAIN.match(name))


def placeholder_secret(field: str, name: str, namespace: str) -> dict | None:
    """A blocker when ``name`` cannot be a Secret's name (e.g. the quick start's ACR_REGISTRY_SECRET_HERE)."""
    if is_object_name(name):
        return None
    return {"reason": "SecretNamePlaceholder",
            "message": f"{field}: {name!r} is a placeholder, not a secret name (names are lowercase letters, digits, "
                       f"'-' and '.'); create a registry secret, e.g. `kubectl create secret docker-registry "
                       f"my-registry-secret -n {namespace} --docker-server=... --docker-username=... "
                       f"--docker-password=...`, and set {field} to its name"}


def retry_helps(blocker: dict) -> bool:
    """Whether re-checking later can clear ``blocker``; a placeholder name needs a spec change (an update)."""
    return blocker.get("reason") != "SecretNamePlaceholder"


# ------------------------------------------------------------------ status writes

def status_patch(previous: dict | None, new: dict) -> dict:
    """A JSON merge patch that makes the status exactly ``new``: keys only ``previous`` has are set to null.

    A merge patch keeps keys it does not mention, so without the nulls a new revision's status would
    still show the previous run's output, digest, finishedAt or failure.
    """
    out = {}
    for key, value in new.items():
        old = (previous or {}).get(key)
        out[key] = status_patch(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    for key in (previous or {}):
        if key not in new:
            out[key] = None
    return out


def error_status(previous: dict | None, *, inference: bool, reason: str, message: str,
                 generation: int | None, now: str | None = None) -> dict:
    """The status after a reconcile that raised: the workspace's conditions say why (never no status at all)."""
    previous = previous or {}
    now = now or st.now_iso()
    msg = clip(message)
    types = ("ResourceReady", "InferenceReady") if inference else ("ResourceReady", "JobStarted", "WorkspaceSucceeded")
    kept = [c for c in previous.get("conditions") or [] if c.get("type") not in types]
    conds = kept + [st.condition(t, False, reason, msg) for t in types]
    out = {k: v for k, v in previous.items() if k != "conditions"}
    out["state"] = previous.get("state") or (st.NOT_READY if inference else st.PENDING)
    out["conditions"] = st.merge_conditions(previous.get("conditions"), conds, generation, now)
    return out


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` redacted (URLs, tokens) and cut to ``limit`` characters."""
    text = redact.text(str(message))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------ what is worth an Event

def _summary(status: dict) -> tuple[str | None, str | None, str | None, str | None]:
    """(state, reason, message, stage) of a status: the condition that explains it."""
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    main = conds.get("WorkspaceSucceeded") or conds.get("InferenceReady") or {}
    return status.get("state"), main.get("reason"), main.get("message"), (status.get("tuning") or {}).get("stage")


_FAILING = ("Failed",)


def events(previous: dict | None, new: dict) -> list[dict]:
    """Events for the Workspace: one per phase change (state, stage or the reason it waits or failed).

    ``{type, reason, message}``: Warning for a failure or a blocker, Normal otherwise; progress within
    a stage (step counts) is not an Event.
    """
    p_state, p_reason, _, p_stage = _summary(previous or {})
    state, reason, message, stage = _summary(new)
    if (p_state, p_reason, p_stage) == (state, reason, stage) or state is None:
        return []
    warning = state in _FAILING or (reason not in (None, "Running", "Succeeded", "InferenceReady", "JobPending",
                                                   "ServerStarting", "JobStarted") and state != st.SUCCEEDED)
    text = f"{state}" + (f" ({stage})" if stage else "") + (f": {message}" if message else "")
    return [{"type": "Warning" if warning else "Normal", "reason": reason or state, "message": clip(text)}]
