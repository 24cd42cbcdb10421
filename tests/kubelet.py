"""Pods as a kubelet reports them, and Job status as the Job controller derives it: one place for every test.

A kubelet runs init containers one at a time while the pod is ``Pending`` (kubectl: ``Init:0/2``),
each reported ``waiting (PodInitializing)`` -> ``running`` -> ``terminated``; the main containers wait
with ``PodInitializing`` until every init container exited 0; the pod turns ``Running`` when a main
container runs, then ``Succeeded`` or ``Failed``. With ``restartPolicy: Never`` (a Job's pods) the
first container that exits non-zero fails the pod and the others never start; with ``Always`` (a
Deployment's) the container restarts: ``restartCount`` + 1, ``lastState.terminated``, ``waiting
(CrashLoopBackOff)``. An OOM-kill is ``terminated`` with exit code 137 and reason ``OOMKilled`` on the
container that was killed. The pod has an IP (``podIP``) as soon as its sandbox exists, i.e. while
its init containers run.

``PodSim`` is pure (``status()`` gives the dict); ``publish`` writes it through the API; ``job_status``
is what the Job controller would write for a Job and its pods, podFailurePolicy included.
"""

from __future__ import annotations

import asyncio
import copy
import itertools

T0 = "2025-01-01T00:00:00Z"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
_ips = itertools.count(10)
_seconds = itertools.count(1)


def _now() -> str:
    """A clock that moves one second per container event (so "which attempt is the latest" is well defined)."""
    n = next(_seconds)
    return f"2025-01-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z"


class PodSim:
    """One pod of ``owner`` (a Job or Deployment manifest as stored: with uid), moved as a kubelet moves it."""

    def __init__(self, owner: dict, suffix: str = "a", *, created: str = T0, node: str = "gpu-node-1",
                 index: int | None = None):
        kind = owner.get("kind") or "Job"
        template = owner["spec"]["template"]
        spec = copy.deepcopy(template["spec"])
        self.restart_policy = spec.get("restartPolicy") or ("Never" if kind == "Job" else "Always")
        spec["restartPolicy"] = self.restart_policy
        meta = owner["metadata"]
        labels = dict(template["metadata"].get("labels") or {})
        if kind == "Job":
            labels.update({"batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"],
                           "batch.kubernetes.io/controller-uid": meta.get("uid", ""), "controller-uid": meta.get("uid", "")})
        annotations = dict(template["metadata"].get("annotations") or {})
        self.index = index
        if index is not None:  # an Indexed Job's pod: the Job controller's index annotation/label and hostname
            annotations[INDEX_KEY] = labels[INDEX_KEY] = str(index)
            spec["hostname"] = f"{meta['name']}-{index}"
            suffix = f"{index}-{suffix}"
        self.name = f"{meta['name']}-{suffix}"
        self.manifest = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": meta.get("namespace", "default"), "labels": labels,
                         "annotations": annotations,
                         "creationTimestamp": created,
                         "ownerReferences": [{"apiVersion": owner.get("apiVersion", "batch/v1"), "kind": kind,
                                              "name": meta["name"], "uid": meta.get("uid", ""), "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": spec,
        }
        self.init = [c["name"] for c in spec.get("initContainers") or []]
        self.main = [c["name"] for c in spec.get("containers") or []]
        self.node = node
        self.ip = f"10.244.0.{next(_ips)}"
        self.scheduled = False
        self.unschedulable: str | None = None
        self.sandbox = False
        self.states: dict[str, dict] = {}
        self.restarts: dict[str, int] = {}
        self.last: dict[str, dict] = {}
        self.conditions_extra: list[dict] = []

    # ------------------------------------------------------------ transitions

    def unschedulable_because(self, message: str) -> PodSim:
        self.unschedulable = message
        return self

    def schedule(self) -> PodSim:
        """Bound to a node; the sandbox starts (pod IP), every container waits for its turn."""
        self.scheduled, self.unschedulable, self.sandbox = True, None, True
        for n in self.init + self.main:
            self.states[n] = {"waiting": {"reason": "PodInitializing"}}
        return self

    def start(self, name: str) -> PodSim:
        """``name`` runs; it must be its turn (every init container before it exited 0)."""
        if not self.scheduled:
            self.schedule()
        order = self.init if name in self.init else self.main
        before = self.init[: self.init.index(name)] if name in self.init else self.init
        assert all(self._exit(n) == 0 for n in before), f"{name} cannot start before {before} completed"
        assert name in order
        self.states[name] = {"running": {"startedAt": _now()}}
        return self

    def finish(self, name: str, code: int = 0, message: str = "", reason: str | None = None) -> PodSim:
        """``name`` exits ``code`` (its termination message ``message``)."""
        if "running" not in self.states.get(name, {}):
            self.start(name)
        started = self.states[name]["running"]["startedAt"]
        term = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                "startedAt": started, "finishedAt": _now(), "containerID": f"containerd://{self.name}-{name}"}
        if message:
            term["message"] = message
        if code != 0 and self.restart_policy == "Always":
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self.last[name] = {"terminated": term}
            self.states[name] = {"waiting": {"reason": "CrashLoopBackOff",
                                             "message": f"back-off 10s restarting failed container={name}"}}
            return self
        self.states[name] = {"terminated": term}
        return self

    def oom_kill(self, name: str) -> PodSim:
        """The kernel kills ``name`` for exceeding its memory limit: 137, OOMKilled."""
        return self.finish(name, 137, reason="OOMKilled")

    def cannot_pull(self, name: str, image: str = "ghcr.io/kaito-tuning/tuner:0.1.0") -> PodSim:
        if not self.scheduled:
            self.schedule()
        self.states[name] = {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}
        return self

    def config_error(self, name: str, message: str) -> PodSim:
        if not self.scheduled:
            self.schedule()
        self.states[name] = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
        return self

    def run_through(self, upto: str, *, message: str = "") -> PodSim:
        """Every container before ``upto`` completes with 0, then ``upto`` runs."""
        for n in self.init + self.main:
            if n == upto:
                return self.start(n)
            self.finish(n, 0)
        raise AssertionError(f"no container {upto}")

    def succeed(self, message: str = "") -> PodSim:
        """Every container completes; the last one writes ``message`` to its termination log."""
        names = self.init + self.main
        for n in names:
            if self._exit(n) is None:
                self.finish(n, 0, message if n == names[-1] else "")
        return self

    def disrupt(self) -> PodSim:
        """Preempted or evicted: DisruptionTarget, the running container killed with 137."""
        self.conditions_extra.append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                      "lastTransitionTime": T0})
        for n, s in self.states.items():
            if "running" in s:
                self.states[n] = {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": s["running"]["startedAt"],
                                                 "finishedAt": _now()}}
        return self

    # ------------------------------------------------------------ what the kubelet reports

    def _exit(self, name: str) -> int | None:
        term = self.states.get(name, {}).get("terminated")
        return None if term is None else term["exitCode"]

    def phase(self) -> str:
        if self.restart_policy == "Never":
            if any((self._exit(n) or 0) != 0 for n in self.init + self.main):
                return "Failed"
            if self.main and all(self._exit(n) == 0 for n in self.main):
                return "Succeeded"
        if all(self._exit(n) == 0 for n in self.init) and any(
                "running" in self.states.get(n, {}) or self.restarts.get(n) for n in self.main):
            return "Running"
        return "Pending"

    def _status(self, name: str, init: bool) -> dict:
        state = self.states.get(name) or {"waiting": {"reason": "PodInitializing"}}
        running = "running" in state
        done = state.get("terminated", {}).get("exitCode") == 0
        out = {"name": name, "image": "ghcr.io/kaito-tuning/tuner:0.1.0", "imageID": "",
               "ready": (done if init else running), "started": running, "restartCount": self.restarts.get(name, 0),
               "state": copy.deepcopy(state), "lastState": copy.deepcopy(self.last.get(name, {}))}
        if "terminated" in state or running:
            out["containerID"] = f"containerd://{self.name}-{name}"
        return out

    def status(self) -> dict:
        if not self.scheduled:
            cond = {"type": "PodScheduled", "status": "False", "lastTransitionTime": T0}
            if self.unschedulable:
                cond.update(reason="Unschedulable", message=self.unschedulable)
            return {"phase": "Pending", "qosClass": "Burstable", "conditions": [cond]}
        phase = self.phase()
        inits_done = all(self._exit(n) == 0 for n in self.init)
        ready = phase == "Running" and all("running" in self.states.get(n, {}) for n in self.main)
        conds = [{"type": "PodReadyToStartContainers", "status": "True"},
                 {"type": "Initialized", "status": "True" if inits_done else "False",
                  **({} if inits_done else {"reason": "ContainersNotInitialized",
                                            "message": f"containers with incomplete status: "
                                                       f"[{' '.join(n for n in self.init if self._exit(n) != 0)}]"})},
                 {"type": "Ready", "status": "True" if ready else "False"},
                 {"type": "ContainersReady", "status": "True" if ready else "False"},
                 {"type": "PodScheduled", "status": "True"}, *self.conditions_extra]
        for c in conds:
            c.setdefault("lastTransitionTime", T0)
        st = {"phase": phase, "conditions": conds, "hostIP": "10.224.0.4", "hostIPs": [{"ip": "10.224.0.4"}],
              "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": T0, "qosClass": "Burstable",
              "containerStatuses": [self._status(n, False) for n in self.main]}
        if self.init:
            st["initContainerStatuses"] = [self._status(n, True) for n in self.init]
        return st

    def pod(self) -> dict:
        """The whole pod as the API server would return it (for pure tests)."""
        out = copy.deepcopy(self.manifest)
        if self.scheduled:
            out["spec"]["nodeName"] = self.node
        out["status"] = self.status()
        return out


# ---------------------------------------------------------------- the Job controller's view

def _rule_matches(rule: dict, pod: dict) -> bool:
    st = pod.get("status") or {}
    if "onPodConditions" in rule:
        have = {(c.get("type"), c.get("status")) for c in st.get("conditions") or []}
        return any((c["type"], c.get("status", "True")) in have for c in rule["onPodConditions"])
    req = rule["onExitCodes"]
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        if req.get("containerName") and cs["name"] != req["containerName"]:
            continue
        term = (cs.get("state") or {}).get("terminated")
        if not term or term["exitCode"] == 0:
            continue
        hit = term["exitCode"] in req["values"]
        if hit if req["operator"] == "In" else not hit:
            return True
    return False


def job_status(job: dict, pods: list[dict]) -> dict:
    """The status the Job controller writes for ``job`` whose pods are ``pods`` (restartPolicy Never).

    An Indexed Job completes when every index has a succeeded pod; with ``backoffLimitPerIndex`` each
    index counts its own failures, an index past its limit is failed, and more failed indexes than
    ``maxFailedIndexes`` fail the Job (reason MaxFailedIndexesExceeded) at once.
    """
    spec = job.get("spec") or {}
    completions = spec.get("completions") or 1
    indexed = spec.get("completionMode") == "Indexed"
    per_index = spec.get("backoffLimitPerIndex") if indexed else None
    failed = active = 0
    done: set = set()
    failures_of: dict = {}
    fail_job = None
    for p in pods:
        phase = (p.get("status") or {}).get("phase")
        index = ((p.get("metadata") or {}).get("annotations") or {}).get(INDEX_KEY)
        if phase == "Succeeded":
            done.add(index if indexed else len(done))
        elif phase == "Failed":
            action = "Count"
            for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
                if _rule_matches(rule, p):
                    action = rule["action"]
                    break
            if action == "FailJob":
                fail_job = fail_job or p
            if action != "Ignore":
                failed += 1
                failures_of[index] = failures_of.get(index, 0) + 1
        else:
            active += 1
    succeeded = len(done)
    failed_indexes = sorted(i for i, n in failures_of.items() if per_index is not None and n > per_index)
    out = {"startTime": T0, "active": active, "failed": failed, "succeeded": succeeded,
           "ready": sum(1 for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                               for c in (p.get("status") or {}).get("conditions") or []))}
    if indexed:
        out["completedIndexes"] = ",".join(sorted(done, key=int))
        if failed_indexes:
            out["failedIndexes"] = ",".join(failed_indexes)
    out = {k: v for k, v in out.items() if v or k == "startTime"}
    too_many = len(failed_indexes) > spec.get("maxFailedIndexes", completions) if per_index is not None else \
        failed > spec.get("backoffLimit", 6)
    if succeeded >= completions:
        out["completionTime"] = "2025-01-01T01:00:00Z"
        out["conditions"] = [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                              "lastTransitionTime": "2025-01-01T01:00:00Z"},
                             {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                              "lastTransitionTime": "2025-01-01T01:00:00Z"}]
    elif fail_job is not None or too_many:
        if fail_job is not None:
            reason, msg = "PodFailurePolicy", f"Pod default/{fail_job['metadata']['name']} has condition or exit " \
                                              "code matching FailJob rule"
        elif per_index is not None:
            reason, msg = "MaxFailedIndexesExceeded", "Job has exceeded the specified maximal number of failed indexes"
        else:
            reason, msg = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        out["conditions"] = [{"type": "FailureTarget", "status": "True", "reason": reason, "message": msg,
                              "lastTransitionTime": "2025-01-01T01:00:00Z"},
                             {"type": "Failed", "status": "True", "reason": reason, "message": msg,
                              "lastTransitionTime": "2025-01-01T01:00:00Z"}]
        out.pop("active", None)
    return out


def retried(job: dict, pods: list[dict]) -> bool:
    """Whether the Job controller would create another pod after these (not failed, not complete)."""
    st = job_status(job, pods)
    return not st.get("conditions") and not st.get("active")


# ---------------------------------------------------------------- through the API (tests with the emulator)

async def publish(sim: PodSim, *pods_of_job: PodSim, job: dict | None = None) -> None:
    """Create the pod if needed and write its status (as the kubelet would); with ``job``, then the Job's status
    as the Job controller derives it from ``sim`` and ``pods_of_job`` (the Job's other pods)."""
    import kubernetes

    core = kubernetes.client.CoreV1Api()
    ns = sim.manifest["metadata"]["namespace"]
    body = copy.deepcopy(sim.manifest)
    body["metadata"].pop("creationTimestamp", None)
    if sim.scheduled:
        body["spec"]["nodeName"] = sim.node
    try:
        await asyncio.to_thread(core.create_namespaced_pod, ns, body)
    except kubernetes.client.exceptions.ApiException as e:
        if e.status != 409:
            raise
    await asyncio.to_thread(core.patch_namespaced_pod_status, sim.name, ns, {"status": sim.status()})
    if job is not None:
        st = job_status(job, [p.pod() for p in (*pods_of_job, sim)])
        await asyncio.to_thread(kubernetes.client.BatchV1Api().patch_namespaced_job_status,
                                job["metadata"]["name"], ns, {"status": st})
