"""Workspace status from what the cluster shows: pure functions, no API calls.

A tuning workspace's status is computed from scratch each time from its Job, the Job's pods, the
tuner's last progress report and (when nodes are auto-provisioned) its NodeClaim. The rules:

* a failed attempt the Job will retry is *not* a failure (Kaito checks ``failed`` first and flips
  to Failed on the first lost pod): the workspace is Failed only when the Job is;
* the reason comes from the pods: the tuner's termination message (``Reason: field: message``),
  OOMKilled, image pull errors, a missing secret or ConfigMap, an unschedulable pod;
* a condition keeps its ``lastTransitionTime`` while its status does not change.
"""

from __future__ import annotations

import datetime
import json
import re

from kaito_tuning.errors import EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR

PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
READY, NOT_READY = "Ready", "NotReady"
_PULL_ERRORS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
_CONFIG_ERRORS = ("CreateContainerConfigError", "CreateContainerError")
_REASON_PREFIX = re.compile(r"^([A-Z][A-Za-z0-9]+): (.*)$", re.DOTALL)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def condition(type_: str, status: bool | str, reason: str, message: str) -> dict:
    s = status if isinstance(status, str) else ("True" if status else "False")
    return {"type": type_, "status": s, "reason": reason, "message": message}


def merge_conditions(previous: list[dict] | None, new: list[dict], generation: int | None, now: str) -> list[dict]:
    """``new`` with observedGeneration and lastTransitionTime (kept from ``previous`` if the status is the same)."""
    old = {c.get("type"): c for c in previous or []}
    out = []
    for c in new:
        c = dict(c)
        prev = old.get(c["type"])
        c["lastTransitionTime"] = prev["lastTransitionTime"] if (
            prev and prev.get("status") == c["status"] and prev.get("lastTransitionTime")) else now
        if generation is not None:
            c["observedGeneration"] = generation
        out.append(c)
    return out


# ------------------------------------------------------------------ pods

def _statuses(pod: dict) -> list[tuple[str, dict]]:
    st = pod.get("status") or {}
    return [(cs.get("name", "?"), cs) for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or [])]


def _created(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("creationTimestamp") or ""


def _last_event(pod: dict) -> str:
    """The latest start or finish of any of its containers (timestamps have 1 s resolution: pods of one
    Job are often created in the same second, and their order in a list is the API server's name order)."""
    times = [""]
    for _, cs in _statuses(pod):
        for state in ((cs.get("state") or {}), (cs.get("lastState") or {})):
            for v in state.values():
                times += [v.get("finishedAt") or "", v.get("startedAt") or ""]
    return max(times)


def newest_first(pods: list[dict]) -> list[dict]:
    return sorted(pods, key=lambda p: (_created(p), _last_event(p)), reverse=True)


def split_reason(message: str, default: str) -> tuple[str, str]:
    """``"DatasetInvalid: tuning.input: ..."`` → ("DatasetInvalid", "tuning.input: ...")."""
    m = _REASON_PREFIX.match((message or "").strip())
    if m:
        return m.group(1), m.group(2).strip()
    return default, (message or "").strip()


def container_failure(pod: dict) -> dict | None:
    """{reason, message, container, exitCode} of the first container of ``pod`` that exited non-zero."""
    for name, cs in _statuses(pod):
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not term or term.get("exitCode", 0) == 0:
            continue
        code = term.get("exitCode")
        text = (term.get("message") or "").strip()
        if term.get("reason") == "OOMKilled" or code == EXIT_OUT_OF_MEMORY:
            reason, msg = split_reason(text, "OutOfMemory")
            if term.get("reason") == "OOMKilled":
                reason = "OutOfMemory"
                msg = msg or "the container ran out of memory (OOMKilled); use a larger instance type, method qlora, " \
                             "a smaller per_device_train_batch_size or max_length"
        elif code == EXIT_USER_ERROR:
            reason, msg = split_reason(text, "InvalidInput")
        else:
            reason, msg = split_reason(text, term.get("reason") or "Error")
        if not msg:
            msg = f"container {name} exited with code {code}"
        return {"reason": reason, "message": msg, "container": name, "exitCode": code}
    return None


def pod_blocker(pod: dict) -> dict | None:
    """Why a pod that has not failed is stuck: image pull, missing secret/ConfigMap, unschedulable."""
    for name, cs in _statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in _PULL_ERRORS:
            return {"reason": "ImagePullBackOff", "container": name,
                    "message": f"container {name} cannot pull its image: {waiting.get('message') or reason}"}
        if reason in _CONFIG_ERRORS:
            return {"reason": reason, "container": name,
                    "message": f"container {name} cannot start: {waiting.get('message') or reason}"}
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return {"reason": c.get("reason") or "Unschedulable",
                    "message": f"the pod cannot be scheduled: {c.get('message') or 'no node fits'}"}
    return None


def _scheduled(pod: dict) -> bool:
    if (pod.get("spec") or {}).get("nodeName"):
        return True
    return any(c.get("type") == "PodScheduled" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _started(pod: dict) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Running", "Succeeded"):
        return True
    return any((cs.get("state") or {}).get("running") or (cs.get("state") or {}).get("terminated")
               for _, cs in _statuses(pod))


def _result(pods: list[dict]) -> dict | None:
    """The JSON the last step wrote to its termination log on success."""
    for pod in newest_first(pods):
        for _, cs in reversed(_statuses(pod)):
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("exitCode") == 0 and term.get("message"):
                try:
                    data = json.loads(term["message"])
                except ValueError:
                    continue
                if isinstance(data, dict):
                    return data
    return None


#: what the workspace is doing while a container of the tuning pod runs
STAGES = {"download": "downloading", "tuner": "training", "push": "pushing"}
_STAGE_MESSAGES = {"downloading": "downloading the inputs", "training": "training", "pushing": "pushing the adapter image"}


def running_container(pod: dict) -> str | None:
    """The container a kubelet reports running: an init container while the pod is Pending, then a main one.

    Between two init containers (one terminated with 0, the next not yet running) the next one is
    named, so the stage does not flicker back.
    """
    st = pod.get("status") or {}
    inits = st.get("initContainerStatuses") or []
    for i, cs in enumerate(inits):
        state = cs.get("state") or {}
        if state.get("running"):
            return cs.get("name")
        term = state.get("terminated")
        if term is None or term.get("exitCode", 0) != 0:
            return inits[i]["name"] if term is None and i and _init_done(inits[i - 1]) else None
    for cs in st.get("containerStatuses") or []:
        if (cs.get("state") or {}).get("running"):
            return cs.get("name")
    return None


def _init_done(cs: dict) -> bool:
    term = (cs.get("state") or {}).get("terminated") or {}
    return bool(term) and term.get("exitCode", 0) == 0


def stage(pod: dict | None) -> str | None:
    """downloading / training / pushing, from the pod's running container (None: nothing runs)."""
    name = running_container(pod) if pod else None
    return STAGES.get(name, "running") if name else None


def progress_pod(pods: list[dict]) -> dict | None:
    """The newest pod whose tuner container runs (as an init container or not) and that has an IP; on several
    nodes, node 0's (its rank 0 alone serves /progress)."""
    live = [p for p in pods if running_container(p) == "tuner" and (p.get("status") or {}).get("podIP")
            and pod_index(p) in (None, 0)]
    return newest_first(live)[0] if live else None


# ------------------------------------------------------------------ several nodes (an Indexed Job)

#: the Job controller's annotation (and label) with an Indexed Job pod's completion index: its node rank
INDEX_KEY = "batch.kubernetes.io/job-completion-index"


def pod_index(pod: dict) -> int | None:
    """The pod's completion index (node rank) in an Indexed Job; None for a plain Job's pod."""
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(INDEX_KEY, (meta.get("labels") or {}).get(INDEX_KEY))
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def current_pods(pods: list[dict]) -> list[dict]:
    """The newest pod of each index (node), by index; the newest pod of a plain Job."""
    out: dict = {}
    for p in newest_first(pods):
        out.setdefault(pod_index(p), p)
    return [out[k] for k in sorted(out, key=lambda i: -1 if i is None else i)]


def worker_nodes(pods: list[dict]) -> list[str]:
    """Kaito's ``workerNodes``: the nodes the run's current pods are on (one per node of a multi-node run)."""
    return sorted({n for p in current_pods(pods) if (n := (p.get("spec") or {}).get("nodeName"))})


def _with_rank(pod: dict, failure: dict) -> dict:
    """A failure of node ``i`` of a multi-node run says which node and where."""
    i = pod_index(pod)
    if i is None:
        return failure
    node = (pod.get("spec") or {}).get("nodeName")
    where = f"node {i}" + (f" ({node})" if node else "")
    return {**failure, "rank": i, **({"node": node} if node else {}), "message": f"{where}: {failure['message']}"}


# ------------------------------------------------------------------ progress

_PROGRESS_KEYS = {"step": ("step", "global_step"), "totalSteps": ("totalSteps", "total_steps", "max_steps"),
                  "epoch": ("epoch",), "loss": ("loss", "train_loss"), "evalLoss": ("evalLoss", "eval_loss"),
                  "etaSeconds": ("etaSeconds", "eta_seconds", "eta")}


def normalize_progress(data: dict | None) -> dict | None:
    """The tuner's progress JSON → {step, totalSteps, epoch, loss, evalLoss, etaSeconds} (known keys only)."""
    if not isinstance(data, dict):
        return None
    out = {}
    for key, names in _PROGRESS_KEYS.items():
        for n in names:
            v = data.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = round(v, 6) if isinstance(v, float) else v
                break
    return out or None


# ------------------------------------------------------------------ tuning status

def _job_condition(job: dict, *types: str) -> dict | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in types and c.get("status") == "True":
            return c
    return None


def tuning_status(previous: dict | None, *, generation: int | None, job: dict | None, pods: list[dict],
                  revision: int, progress: dict | None = None, blocker: dict | None = None,
                  nodeclaim: dict | None = None, provisioning: bool = False, output_volume: bool = False,
                  now: str | None = None) -> dict:
    """The full ``status`` of a tuning workspace.

    ``blocker``: {reason, message} when the operator cannot create the Job yet (missing ConfigMap
    or secret, node not ready); ``progress``: the tuner's latest report (None keeps the previous).
    """
    now = now or now_iso()
    previous = previous or {}
    prev_tuning = previous.get("tuning") or {}
    same_run = prev_tuning.get("revision") == revision
    tuning: dict = {"revision": revision}
    if job is not None:
        tuning["jobName"] = job["metadata"]["name"]
    prog = normalize_progress(progress) or (prev_tuning.get("progress") if same_run else None)

    conds: list[dict] = []
    node_ready = None
    if provisioning:
        node_ready, reason, msg = nodeclaim_ready(nodeclaim)
        conds.append(condition("NodeClaimReady", node_ready, reason, msg))

    pods = newest_first(pods)[::-1]
    # on several nodes the stage is node 0's (it trains rank 0, reports progress and pushes)
    lead = [p for p in pods if pod_index(p) in (None, 0)] or pods
    latest = lead[-1] if lead else None
    done = _job_condition(job, "Complete", "SuccessCriteriaMet") if job else None
    failed = _job_condition(job, "Failed", "FailureTarget") if job else None
    js = (job or {}).get("status") or {}
    if js.get("startTime"):
        tuning["startedAt"] = js["startTime"]

    if done:
        state = SUCCEEDED
        tuning["finishedAt"] = js.get("completionTime") or done.get("lastTransitionTime") or now
        result = _result(pods) or prev_tuning.get("output") if same_run else _result(pods)
        if output_volume:
            out = {"volume": (result or {}).get("outputDir") or (result or {}).get("volume") or ""}
        else:
            out = {k: v for k, v in (result or {}).items() if k in ("image", "digest")}
        tuning["output"] = out
        res = condition("ResourceReady", True, "ResourceReady", "the run had the GPU node it needed")
        started = condition("JobStarted", True, "JobStarted", f"job {tuning['jobName']} ran")
        ws = condition("WorkspaceSucceeded", True, "Succeeded",
                       f"the adapter is ready{': ' + out['image'] if out.get('image') else ''}")
    elif failed:
        state = FAILED
        tuning["finishedAt"] = failed.get("lastTransitionTime") or now
        failure = _failure(job, pods)
        tuning["failure"] = failure
        res = condition("ResourceReady", True if any(_scheduled(p) for p in pods) else False,
                        "ResourceReady" if any(_scheduled(p) for p in pods) else failure["reason"],
                        "the run had a GPU node" if any(_scheduled(p) for p in pods) else failure["message"])
        started = condition("JobStarted", any(_started(p) for p in pods),
                            "JobStarted" if any(_started(p) for p in pods) else failure["reason"],
                            f"job {tuning['jobName']} ran" if any(_started(p) for p in pods) else failure["message"])
        ws = condition("WorkspaceSucceeded", False, failure["reason"], failure["message"])
    elif job is None:
        state = PENDING
        reason, msg = (blocker["reason"], blocker["message"]) if blocker else ("JobPending", "creating the tuning job")
        if node_ready is False and not blocker:
            reason, msg = "NodeClaimNotReady", conds[0]["message"]
        res = condition("ResourceReady", False if blocker or node_ready is False else "Unknown", reason, msg)
        started = condition("JobStarted", False, reason, msg)
        ws = condition("WorkspaceSucceeded", False, reason, msg)
    else:
        jspec = job.get("spec") or {}
        per_index = jspec.get("completionMode") == "Indexed" and "backoffLimitPerIndex" in jspec
        # a gang fails together: each attempt fails one pod per node
        retries = -(-(js.get("failed") or 0) // (jspec.get("completions") or 1)) if per_index else js.get("failed") or 0
        limit = jspec.get("backoffLimitPerIndex") if per_index else jspec.get("backoffLimit")
        stuck = pod_blocker(latest) if latest is not None else None
        doing = stage(latest)
        is_running = latest is not None and (doing is not None or _started(latest)) and \
            (latest.get("status") or {}).get("phase") in ("Pending", "Running")
        state = RUNNING if is_running else PENDING
        if doing:
            tuning["stage"] = doing
        scheduled = latest is not None and _scheduled(latest)
        if scheduled:
            res = condition("ResourceReady", True, "ResourceReady", f"pod {latest['metadata']['name']} is on a node")
        elif stuck and stuck["reason"] == "Unschedulable":
            res = condition("ResourceReady", False, "Unschedulable", stuck["message"])
        else:
            res = condition("ResourceReady", "Unknown", "WaitingForNode", "waiting for the pod to be scheduled")
        if is_running:
            started = condition("JobStarted", True, "JobStarted", f"job {tuning['jobName']} is running")
            msg = _STAGE_MESSAGES.get(doing or "", "running")
            if doing == "training" and prog and "step" in prog:
                msg += f": step {prog['step']}/{prog.get('totalSteps', '?')}"
            ws = condition("WorkspaceSucceeded", False, stuck["reason"] if stuck else "Running",
                           stuck["message"] if stuck else msg)
        else:
            reason, msg = (stuck["reason"], stuck["message"]) if stuck else ("JobPending", "the tuning pod has not started yet")
            started = condition("JobStarted", False, reason, msg)
            ws = condition("WorkspaceSucceeded", False, reason, msg)
        if retries:
            last = _failure(job, pods)
            note = (f"attempt {retries} of {(limit or 0) + 1} failed ({last['reason']}: {last['message']}); "
                    "retrying")
            tuning["lastAttemptFailure"] = last
            ws["message"] = f"{ws['message']}; {note}"
    if prog and state in (RUNNING, SUCCEEDED, FAILED):
        tuning["progress"] = prog
    conds += [res, started, ws]
    return {
        "state": state,
        "targetNodeCount": ((job or {}).get("spec") or {}).get("completions") or 1,
        "workerNodes": worker_nodes(pods),
        "conditions": merge_conditions(previous.get("conditions"), conds, generation, now),
        "tuning": tuning,
    }


def _failure(job: dict, pods: list[dict]) -> dict:
    """Why the run (or its last attempt) failed: the newest failed pod's container, else the Job's condition.

    On several nodes the ranks fail together (the others lose their collective): a user error or an out of
    memory on any node is the cause and is shown before the newest failure; each names its node.
    """
    failures = [(pod, f) for pod in newest_first(pods) if (f := container_failure(pod))]
    telling = [(pod, f) for pod, f in failures if f["exitCode"] in (EXIT_USER_ERROR, EXIT_OUT_OF_MEMORY)
               or f["reason"] == "OutOfMemory"]
    if failures:
        return _with_rank(*(telling or failures)[0])
    for pod in newest_first(pods):
        if (b := pod_blocker(pod)):
            return _with_rank(pod, {"reason": b["reason"], "message": b["message"],
                                    **({"container": b["container"]} if "container" in b else {})})
    c = _job_condition(job, "Failed", "FailureTarget") or {}
    reason = c.get("reason") or "JobFailed"
    msg = c.get("message") or "the tuning job failed"
    if reason == "DeadlineExceeded":
        msg = f"the run took longer than activeDeadlineSeconds ({(job.get('spec') or {}).get('activeDeadlineSeconds')}s)"
    return {"reason": reason, "message": msg}


def nodeclaim_ready(nodeclaim: dict | None) -> tuple[bool, str, str]:
    """(ready, reason, message) of a Karpenter NodeClaim."""
    if nodeclaim is None:
        return False, "NodeClaimPending", "creating the NodeClaim"
    name = nodeclaim["metadata"]["name"]
    conds = {c.get("type"): c for c in (nodeclaim.get("status") or {}).get("conditions") or []}
    ready = conds.get("Ready")
    if ready and ready.get("status") == "True":
        return True, "NodeClaimReady", f"NodeClaim {name} is ready"
    for t in ("Launched", "Registered", "Initialized", "Ready"):
        c = conds.get(t)
        if c and c.get("status") == "False":
            return False, c.get("reason") or "NodeClaimNotReady", f"NodeClaim {name}: {c.get('message') or t + ' is False'}"
    return False, "NodeClaimNotReady", f"NodeClaim {name} is not ready yet"


# ------------------------------------------------------------------ inference status

def inference_status(previous: dict | None, *, generation: int | None, deployment: dict | None,
                     pods: list[dict], blocker: dict | None = None, now: str | None = None) -> dict:
    now = now or now_iso()
    previous = previous or {}
    st = (deployment or {}).get("status") or {}
    want = ((deployment or {}).get("spec") or {}).get("replicas", 1)
    ready = deployment is not None and (st.get("readyReplicas") or 0) >= max(want, 1) and \
        st.get("observedGeneration", 0) >= (deployment.get("metadata") or {}).get("generation", 0)
    pods = sorted(pods, key=_created)
    stuck = None
    for p in reversed(pods):
        stuck = container_failure(p) or pod_blocker(p)
        if stuck:
            break
    if blocker:
        res = condition("ResourceReady", False, blocker["reason"], blocker["message"])
        inf = condition("InferenceReady", False, blocker["reason"], blocker["message"])
    elif ready:
        res = condition("ResourceReady", True, "ResourceReady", "the server pods are on GPU nodes")
        inf = condition("InferenceReady", True, "InferenceReady", f"{st.get('readyReplicas')} server(s) ready")
    else:
        scheduled = any(_scheduled(p) for p in pods)
        if scheduled:
            res = condition("ResourceReady", True, "ResourceReady", "the server pods are on GPU nodes")
        elif stuck and stuck["reason"] == "Unschedulable":
            res = condition("ResourceReady", False, "Unschedulable", stuck["message"])
        else:
            res = condition("ResourceReady", "Unknown", "WaitingForNode", "waiting for the server pod to be scheduled")
        reason, msg = (stuck["reason"], stuck["message"]) if stuck else ("ServerStarting", "the server is not ready yet")
        inf = condition("InferenceReady", False, reason, msg)
    return {
        "state": READY if ready and not blocker else NOT_READY,
        "targetNodeCount": want,
        "conditions": merge_conditions(previous.get("conditions"), [res, inf], generation, now),
    }
