"""Status from Job + pods: pure functions, with pods moved as a kubelet moves them (tests/kubelet.py)."""

from __future__ import annotations

import json

import pytest
from kubelet import PodSim, job_status, retried

from kaito_tuning.controller import manifests
from kaito_tuning.controller import status as st
from kaito_tuning.controller.settings import Settings
from kaito_tuning.spec.files import load_documents, split_documents
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import load_config

QUICK = "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"


def quick_job(**settings) -> dict:
    """The quick start's Job (download and tuner are init containers, push the main one), as stored."""
    obj = split_documents(load_documents(QUICK))[0][0]
    obj["metadata"]["namespace"] = "default"
    job = manifests.tuning_job(load_workspace(obj), Settings(**settings), load_config(None, "qlora"))
    job["metadata"]["uid"] = "job-uid-1"
    return job


def volume_job() -> dict:
    """A volume-output Job: the tuner is the main container."""
    job = quick_job()
    spec = job["spec"]["template"]["spec"]
    tuner = next(c for c in spec["initContainers"] if c["name"] == "tuner")
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "tuner"]
    spec["containers"] = [tuner]
    return job


def with_status(job: dict, *sims: PodSim) -> tuple[dict, list[dict]]:
    pods = [s.pod() for s in sims]
    return {**job, "status": job_status(job, pods)}, pods


def cond(s, t):
    return next(c for c in s["conditions"] if c["type"] == t)


def compute(j, pods, prev=None, **kw):
    kw.setdefault("now", "2025-01-01T00:00:00Z")
    return st.tuning_status(prev, generation=2, job=j, pods=pods, revision=1, **kw)


# ------------------------------------------------------------------ the stages of an image-output run

def test_download_as_init_container_is_started_and_running():
    """Pending with download running (kubectl: Init:0/2): JobStarted True, state Running, stage downloading."""
    sim = PodSim(quick_job()).schedule().start("download")
    assert sim.status()["phase"] == "Pending"
    s = compute(*with_status(quick_job(), sim))
    assert s["state"] == "Running" and s["tuning"]["stage"] == "downloading"
    assert cond(s, "JobStarted")["status"] == "True"
    assert cond(s, "WorkspaceSucceeded")["message"] == "downloading the inputs"


def test_training_as_init_container_reports_progress_and_is_polled():
    sim = PodSim(quick_job()).run_through("tuner")
    assert sim.status()["phase"] == "Pending"  # Init:1/2 for the whole training
    job, pods = with_status(quick_job(), sim)
    assert st.progress_pod(pods)["metadata"]["name"] == sim.name  # the tuner's pod is polled while Pending
    s = compute(job, pods, progress={"step": 40, "total_steps": 100, "loss": 1.25})
    assert s["state"] == "Running" and s["tuning"]["stage"] == "training"
    assert cond(s, "JobStarted")["status"] == "True"
    assert cond(s, "WorkspaceSucceeded")["message"] == "training: step 40/100"
    assert s["tuning"]["progress"] == {"step": 40, "totalSteps": 100, "loss": 1.25}


def test_between_two_init_containers_the_next_stage_is_shown():
    sim = PodSim(quick_job()).schedule().finish("download", 0)  # tuner still PodInitializing
    s = compute(*with_status(quick_job(), sim))
    assert s["tuning"]["stage"] == "training" and s["state"] == "Running"


def test_pushing_is_running_and_not_polled():
    sim = PodSim(quick_job()).run_through("push")
    assert sim.status()["phase"] == "Running"
    job, pods = with_status(quick_job(), sim)
    s = compute(job, pods)
    assert s["tuning"]["stage"] == "pushing" and cond(s, "WorkspaceSucceeded")["message"] == "pushing the adapter image"
    assert st.progress_pod(pods) is None


def test_volume_output_tuner_is_the_main_container():
    sim = PodSim(volume_job()).run_through("tuner")
    assert sim.status()["phase"] == "Running"
    job, pods = with_status(volume_job(), sim)
    assert st.progress_pod(pods) is not None
    assert compute(job, pods)["tuning"]["stage"] == "training"


def test_scheduled_but_nothing_started_is_pending():
    sim = PodSim(quick_job()).schedule()
    s = compute(*with_status(quick_job(), sim))
    assert s["state"] == "Pending" and cond(s, "JobStarted")["status"] == "False"
    assert cond(s, "ResourceReady")["status"] == "True"


# ------------------------------------------------------------------ failures

def test_a_retried_failure_is_not_a_failure():
    job = quick_job()
    first = PodSim(job, "a", created="2025-01-01T00:00:00Z").run_through("tuner").finish(
        "tuner", 1, "Transient: registry timeout")
    assert retried(job, [first.pod()])
    second = PodSim(job, "b", created="2025-01-01T00:01:00Z").run_through("tuner")
    s = compute(*with_status(job, first, second))
    assert s["state"] == "Running"
    assert cond(s, "WorkspaceSucceeded")["status"] == "False"
    assert "attempt 1 of 4 failed (Transient: registry timeout); retrying" in cond(s, "WorkspaceSucceeded")["message"]


def test_user_error_reason_comes_from_the_termination_message():
    job = quick_job()
    sim = PodSim(job).run_through("tuner").finish("tuner", 65, "DatasetInvalid: tuning.input.urls[0]: empty file")
    assert not retried(job, [sim.pod()])  # podFailurePolicy: exit 65 fails the Job at once
    s = compute(*with_status(job, sim))
    assert s["state"] == "Failed"
    assert s["tuning"]["failure"] == {"reason": "DatasetInvalid", "message": "tuning.input.urls[0]: empty file",
                                      "container": "tuner", "exitCode": 65}
    assert cond(s, "WorkspaceSucceeded")["observedGeneration"] == 2
    assert cond(s, "JobStarted")["status"] == "True"


def test_oom_killed_tuner_fails_at_once_and_is_named():
    job = quick_job()
    sim = PodSim(job).run_through("tuner").oom_kill("tuner")
    assert sim.status()["phase"] == "Failed"
    assert not retried(job, [sim.pod()]), "a kubelet OOM-kill (137) of the tuner would be retried"
    j, pods = with_status(job, sim)
    assert j["status"]["conditions"][0]["reason"] == "PodFailurePolicy"
    s = compute(j, pods)
    assert s["tuning"]["failure"]["reason"] == "OutOfMemory" and s["tuning"]["failure"]["container"] == "tuner"
    assert "qlora" in s["tuning"]["failure"]["message"]


def test_a_disrupted_pod_and_a_killed_download_are_retried():
    job = quick_job()
    assert retried(job, [PodSim(job, "a").run_through("tuner").disrupt().pod()])
    assert retried(job, [PodSim(job, "b").schedule().finish("download", 137).pod()])


def test_image_pull_and_missing_secret_and_unschedulable_are_named():
    job = quick_job()
    s = compute(*with_status(job, PodSim(job).cannot_pull("download")))
    assert cond(s, "JobStarted")["reason"] == "ImagePullBackOff" and s["state"] == "Pending"
    s = compute(*with_status(job, PodSim(job).run_through("push").config_error("push", 'secret "push" not found')))
    assert cond(s, "WorkspaceSucceeded")["reason"] == "CreateContainerConfigError"
    assert 'secret "push" not found' in cond(s, "WorkspaceSucceeded")["message"]
    s = compute(*with_status(job, PodSim(job).unschedulable_because("0/3 nodes have nvidia.com/gpu")))
    assert cond(s, "ResourceReady")["reason"] == "Unschedulable" and cond(s, "ResourceReady")["status"] == "False"
    assert s["state"] == "Pending"


def test_success_with_output_and_transition_time_kept():
    job = quick_job()
    running = compute(*with_status(job, PodSim(job).run_through("tuner")))
    later = st.tuning_status(running, generation=2, revision=1, now="2025-01-02T00:00:00Z",
                             progress={"step": 5, "max_steps": 10}, **dict(zip(
                                 ("job", "pods"), with_status(job, PodSim(job).run_through("tuner")))))
    assert cond(later, "JobStarted")["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    assert later["tuning"]["progress"] == {"step": 5, "totalSteps": 10}
    result = json.dumps({"image": "r/a:1", "digest": "sha256:1"})
    j, pods = with_status(job, PodSim(job).succeed(result))
    done = st.tuning_status(later, generation=2, revision=1, now="2025-01-03T00:00:00Z", job=j, pods=pods)
    assert done["state"] == "Succeeded" and done["tuning"]["output"] == {"image": "r/a:1", "digest": "sha256:1"}
    assert cond(done, "WorkspaceSucceeded")["lastTransitionTime"] == "2025-01-03T00:00:00Z"
    assert done["tuning"]["progress"]["step"] == 5  # kept from the running status
    assert "stage" not in done["tuning"]


def test_blocker_and_nodeclaim():
    s = compute(None, [], blocker={"reason": "ConfigMapNotFound", "message": "tuning.config: ConfigMap 'x' ..."})
    assert s["state"] == "Pending" and cond(s, "JobStarted")["reason"] == "ConfigMapNotFound"
    s = compute(None, [], provisioning=True, nodeclaim={"metadata": {"name": "n"}, "status": {"conditions": [
        {"type": "Launched", "status": "False", "reason": "InsufficientCapacity", "message": "no quota"}]}})
    assert cond(s, "NodeClaimReady")["reason"] == "InsufficientCapacity" and cond(s, "ResourceReady")["status"] == "False"
    assert st.nodeclaim_ready({"metadata": {"name": "n"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}})[0]


def test_deadline_exceeded_is_explained():
    j = {**quick_job(), "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                              "reason": "DeadlineExceeded"}]}}
    j["spec"] = {**j["spec"], "activeDeadlineSeconds": 60}
    s = compute(j, [])
    assert s["tuning"]["failure"]["reason"] == "DeadlineExceeded" and "60s" in s["tuning"]["failure"]["message"]


@pytest.mark.parametrize("crash", [False, True])
def test_inference_ready_and_crash_looping(crash):
    dep = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "w", "namespace": "default", "uid": "d1", "generation": 1},
           "spec": {"replicas": 1, "template": {"metadata": {"labels": {"kaito.sh/workspace": "w"}}, "spec": {
               "initContainers": [{"name": "pull-a"}], "containers": [{"name": "server"}]}}},
           "status": {"readyReplicas": 1, "observedGeneration": 1}}
    sim = PodSim(dep).run_through("server")
    if crash:
        sim.finish("server", 1, "adapter dolly not found")
        assert sim.status()["containerStatuses"][0]["restartCount"] == 1
        dep["status"]["readyReplicas"] = 0
    s = st.inference_status(None, generation=1, deployment=dep, pods=[sim.pod()], now="t")
    if crash:
        assert s["state"] == "NotReady" and cond(s, "InferenceReady")["reason"] == "Error"
        assert "dolly not found" in cond(s, "InferenceReady")["message"]
    else:
        assert s["state"] == "Ready" and cond(s, "InferenceReady")["status"] == "True"


# ------------------------------------------------------------------ several nodes: an Indexed Job

def gang_job(count: int = 2, backoff: int = 1) -> dict:
    obj = split_documents(load_documents(QUICK))[0][0]
    obj["metadata"]["namespace"] = "default"
    obj["resource"].update(count=count, instanceType="Standard_NC96ads_A100_v4")
    obj["tuning"]["output"]["imagePushSecret"] = "acr-push"
    job = manifests.tuning_job(load_workspace(obj), Settings(job_backoff_limit=backoff), load_config(None, "qlora"))
    job["metadata"]["uid"] = "job-uid-2"
    return job


def test_every_worker_node_is_shown_and_node_0_gives_the_stage():
    job = gang_job()
    n0 = PodSim(job, index=0, node="gpu-a").run_through("tuner")
    n1 = PodSim(job, index=1, node="gpu-b").run_through("download")
    s = compute(*with_status(job, n0, n1))
    assert s["workerNodes"] == ["gpu-a", "gpu-b"] and s["targetNodeCount"] == 2
    assert s["state"] == "Running" and s["tuning"]["stage"] == "training"
    # node 0's pod serves /progress (rank 0), never node 1's
    assert st.progress_pod([n1.pod(), n0.pod()])["metadata"]["name"] == n0.name
    n1.finish("download").start("tuner")
    assert st.progress_pod([n1.pod()]) is None


def test_a_failed_rank_is_named_and_a_user_error_on_any_node_fails_the_gang():
    job = gang_job()
    n0 = PodSim(job, index=0, node="gpu-a").run_through("tuner")
    n1 = PodSim(job, index=1, node="gpu-b").run_through("tuner").finish(
        "tuner", 65, "DatasetInvalid: tuning.input.urls[0]: empty file")
    # node 0 then loses its collective (transient), after node 1's user error
    n0.finish("tuner", 75, "Transient: collective timed out")
    assert not retried(job, [n0.pod(), n1.pod()])
    s = compute(*with_status(job, n0, n1))
    assert s["state"] == "Failed"
    f = s["tuning"]["failure"]
    assert (f["reason"], f["rank"], f["node"], f["exitCode"]) == ("DatasetInvalid", 1, "gpu-b", 65)
    assert f["message"].startswith("node 1 (gpu-b): tuning.input.urls[0]")


def test_a_lost_rank_retries_the_whole_gang_until_one_index_runs_out():
    job = gang_job(backoff=1)
    first = [PodSim(job, "a", index=i, node=f"gpu-{i}").run_through("tuner").finish("tuner", 1, "Error: lost peer")
             for i in (0, 1)]
    assert retried(job, [p.pod() for p in first])  # both indexes are recreated: the gang restarts
    second = [PodSim(job, "b", index=i, node=f"gpu-{i}", created="2025-01-01T00:05:00Z").run_through("tuner")
              for i in (0, 1)]
    s = compute(*with_status(job, *first, *second))
    assert s["state"] == "Running"
    assert "attempt 1 of 2 failed" in cond(s, "WorkspaceSucceeded")["message"]
    assert s["tuning"]["lastAttemptFailure"]["rank"] in (0, 1)
    second[1].finish("tuner", 1, "Error: lost peer")  # index 1's second failure: past backoffLimitPerIndex 1
    assert not retried(job, [p.pod() for p in (*first, *second)])
    s = compute(*with_status(job, *first, *second))
    assert s["state"] == "Failed" and s["tuning"]["failure"]["rank"] == 1
