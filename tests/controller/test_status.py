"""Status from Job + pods: pure functions."""

from __future__ import annotations

from kaito_tuning.controller import status as st

JOB = {"metadata": {"name": "w"}, "spec": {"backoffLimit": 3}, "status": {}}


def job(**s):
    return {**JOB, "status": s}


def pod(name="w-a", phase="Running", statuses=(), conditions=(), created="2025-01-01T00:00:00Z"):
    return {"metadata": {"name": name, "creationTimestamp": created},
            "status": {"phase": phase, "containerStatuses": list(statuses), "conditions": list(conditions)}}


def term(name, code, message="", reason="Error"):
    return {"name": name, "state": {"terminated": {"exitCode": code, "message": message, "reason": reason}}}


def cond(s, t):
    return next(c for c in s["conditions"] if c["type"] == t)


def compute(j, pods, prev=None, **kw):
    return st.tuning_status(prev, generation=2, job=j, pods=pods, revision=1, now="2025-01-01T00:00:00Z", **kw)


def test_a_retried_failure_is_not_a_failure():
    s = compute(job(failed=1, active=1), [pod("w-a", "Failed", [term("tuner", 1, "Transient: registry timeout")],
                                              created="2025-01-01T00:00:00Z"),
                                          pod("w-b", "Running", [{"name": "tuner", "state": {"running": {}}}],
                                              created="2025-01-01T00:01:00Z")])
    assert s["state"] == "Running"
    assert cond(s, "WorkspaceSucceeded")["status"] == "False"
    assert "attempt 1 of 4 failed (Transient: registry timeout); retrying" in cond(s, "WorkspaceSucceeded")["message"]


def test_user_error_reason_comes_from_the_termination_message():
    s = compute(job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]),
                [pod(phase="Failed", statuses=[term("tuner", 65, "DatasetInvalid: tuning.input.urls[0]: empty file")])])
    assert s["state"] == "Failed"
    assert s["tuning"]["failure"] == {"reason": "DatasetInvalid", "message": "tuning.input.urls[0]: empty file",
                                      "container": "tuner", "exitCode": 65}
    assert cond(s, "WorkspaceSucceeded")["observedGeneration"] == 2


def test_oom_killed():
    s = compute(job(conditions=[{"type": "Failed", "status": "True"}]),
                [pod(phase="Failed", statuses=[term("tuner", 137, reason="OOMKilled")])])
    assert s["tuning"]["failure"]["reason"] == "OutOfMemory"
    assert "qlora" in s["tuning"]["failure"]["message"]


def test_image_pull_and_missing_secret_and_unschedulable_are_named():
    pull = pod(phase="Pending", statuses=[{"name": "download", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}])
    s = compute(job(active=1), [pull])
    assert cond(s, "JobStarted")["reason"] == "ImagePullBackOff" and s["state"] == "Pending"
    secret = pod(phase="Pending", statuses=[{"name": "push", "state": {"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "push" not found'}}}])
    s = compute(job(active=1), [secret])
    assert cond(s, "JobStarted")["reason"] == "CreateContainerConfigError"
    assert 'secret "push" not found' in cond(s, "JobStarted")["message"]
    unsched = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": "0/3 nodes have nvidia.com/gpu"}])
    s = compute(job(active=1), [unsched])
    assert cond(s, "ResourceReady")["reason"] == "Unschedulable" and cond(s, "ResourceReady")["status"] == "False"


def test_success_with_output_and_transition_time_kept():
    running = compute(job(active=1), [pod(statuses=[{"name": "tuner", "state": {"running": {}}}])])
    later = st.tuning_status(running, generation=2, job=job(active=1), pods=[pod()], revision=1,
                             now="2025-01-02T00:00:00Z", progress={"step": 5, "max_steps": 10})
    assert cond(later, "JobStarted")["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    assert later["tuning"]["progress"] == {"step": 5, "totalSteps": 10}
    done = st.tuning_status(later, generation=2, revision=1, now="2025-01-03T00:00:00Z",
                            job=job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]),
                            pods=[pod(phase="Succeeded", statuses=[term("push", 0, '{"image": "r/a:1", "digest": "sha256:1"}',
                                                                        reason="Completed")])])
    assert done["state"] == "Succeeded" and done["tuning"]["output"] == {"image": "r/a:1", "digest": "sha256:1"}
    assert cond(done, "WorkspaceSucceeded")["lastTransitionTime"] == "2025-01-03T00:00:00Z"
    assert done["tuning"]["progress"]["step"] == 5  # kept from the running status


def test_blocker_and_nodeclaim():
    s = compute(None, [], blocker={"reason": "ConfigMapNotFound", "message": "tuning.config: ConfigMap 'x' ..."})
    assert s["state"] == "Pending" and cond(s, "JobStarted")["reason"] == "ConfigMapNotFound"
    s = compute(None, [], provisioning=True, nodeclaim={"metadata": {"name": "n"}, "status": {"conditions": [
        {"type": "Launched", "status": "False", "reason": "InsufficientCapacity", "message": "no quota"}]}})
    assert cond(s, "NodeClaimReady")["reason"] == "InsufficientCapacity" and cond(s, "ResourceReady")["status"] == "False"
    assert st.nodeclaim_ready({"metadata": {"name": "n"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})[0]


def test_deadline_exceeded_is_explained():
    j = {**job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]),
         "spec": {"activeDeadlineSeconds": 60}}
    s = compute(j, [])
    assert s["tuning"]["failure"]["reason"] == "DeadlineExceeded" and "60s" in s["tuning"]["failure"]["message"]


def test_inference_ready():
    dep = {"metadata": {"generation": 1}, "spec": {"replicas": 1}, "status": {"readyReplicas": 1, "observedGeneration": 1}}
    s = st.inference_status(None, generation=1, deployment=dep, pods=[], now="t")
    assert s["state"] == "Ready" and cond(s, "InferenceReady")["status"] == "True"
    dep["status"]["readyReplicas"] = 0
    assert st.inference_status(None, generation=1, deployment=dep, pods=[], now="t")["state"] == "NotReady"
