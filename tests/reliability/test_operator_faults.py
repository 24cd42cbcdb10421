"""The operator under faults: killed (SIGKILL) after each write of a reconcile, the API server failing.

The real operator (``kaito-tuning operator``, forked with its imports done) runs against the emulator
(tests/fixtures_k8s.py), which records every write and kills the operator process as its k-th write is
stored, before the answer reaches it. A fresh operator then takes over; the kubelet (tests/kubelet.py)
runs the Job's pod to success. Converged means: the same objects as an undisturbed run, each owned by
the workspace, the Job never deleted or replaced, and the same final status.
"""

from __future__ import annotations

import asyncio
import json
import time

import kubernetes
import pytest
from fixtures_k8s import Emulator, Fault, eventually, get_obj, list_objs
from kubelet import PodSim, publish

from .operator_faults import (
    JOBS,
    NAME,
    PLANTED,
    WS,
    OperatorProcess,
    cond,
    create_workspace,
    inventory,
    normalized,
    operator,
    ownership_problems,
    quiet,
    result,
    run_pod_to_success,
    status,
)

pytestmark = [pytest.mark.kmock(cls=Emulator), pytest.mark.timeout(180)]


async def undisturbed(kmock, tmp_path, zygote) -> tuple[list[dict], dict, dict]:
    """(the writes of the first reconcile, the final status, the objects) of a run nobody disturbs."""
    async with operator(zygote, kmock, tmp_path, "undisturbed", "op-ref") as op:
        await create_workspace("undisturbed")
        await eventually(lambda: status(kmock, "undisturbed").get("tuning", {}).get("jobName"), 20)
        await quiet(op.writes)
        writes = op.writes()
        final = await run_pod_to_success(kmock, "undisturbed")
    assert not ownership_problems(kmock, "undisturbed")
    return writes, final, inventory(kmock, "undisturbed")


async def delete_workspace(kmock, namespace: str) -> None:
    custom = kubernetes.client.CustomObjectsApi()
    await asyncio.to_thread(custom.delete_namespaced_custom_object, "kaito.sh", "v1beta1", namespace, "workspaces", NAME)
    await eventually(lambda: get_obj(kmock, WS, namespace, NAME) is None, 20)


def job_deletes(kmock, namespace: str) -> list[dict]:
    return [w for w in kmock.writes if w["resource"] == JOBS and w["namespace"] == namespace and w["action"] == "delete"]


async def test_operator_killed_after_each_write_of_a_reconcile_converges(kmock, kubeconfig, tmp_path, zygote):
    t0 = time.monotonic()
    writes, want, objects = await undisturbed(kmock, tmp_path, zygote)
    assert len(writes) >= 6, writes  # the ConfigMap, PVC, Secret, NetworkPolicy, Job, status...
    report = []
    for k in range(1, len(writes) + 1):
        ns = f"kill-{k}"
        first = OperatorProcess(zygote, kmock, tmp_path, ns, f"a{k}")
        first.kill_after(k)
        await first.start()
        await create_workspace(ns)
        at = await first.killed()
        job_before = get_obj(kmock, JOBS, ns, NAME)
        async with operator(zygote, kmock, tmp_path, ns, f"b{k}"):
            final = await run_pod_to_success(kmock, ns)
            assert normalized(final, ns) == normalized(want, "undisturbed"), f"after a kill at write {k} ({at})"
            assert inventory(kmock, ns) == objects, f"after a kill at write {k} ({at})"
            assert not ownership_problems(kmock, ns)
            if job_before is not None:  # kept, not replaced
                assert get_obj(kmock, JOBS, ns, NAME)["metadata"]["uid"] == job_before["metadata"]["uid"]
            assert not job_deletes(kmock, ns)
            await delete_workspace(kmock, ns)  # the next operators do not see it
        report.append((k, at["action"], at["resource"], at["subresource"]))
    print(f"{len(report)} kill points in {time.monotonic() - t0:.1f}s: {report}")


async def test_the_pod_finishes_while_the_operator_is_down(kmock, kubeconfig, tmp_path, zygote):
    ns = "down"
    async with operator(zygote, kmock, tmp_path, ns, "first"):
        await create_workspace(ns)
        job = await eventually(lambda: get_obj(kmock, JOBS, ns, NAME), 20)
        pod = PodSim(job)
        pod.ip = "127.0.0.1"
        await publish(pod.schedule().start("download").finish("download").start("tuner"), job=job)
        await eventually(lambda: status(kmock, ns).get("tuning", {}).get("stage") == "training", 20)
    # SIGKILLed (the context's exit); the run finishes meanwhile
    await publish(pod.succeed(json.dumps(result(ns))), job=job)
    assert status(kmock, ns)["state"] == "Running"
    async with operator(zygote, kmock, tmp_path, ns, "second"):
        st = await eventually(lambda: status(kmock, ns).get("state") == "Succeeded" and status(kmock, ns), 20)
    assert st["tuning"]["output"] == result(ns) and cond(st, "WorkspaceSucceeded")["status"] == "True"
    assert get_obj(kmock, JOBS, ns, NAME)["metadata"]["uid"] == job["metadata"]["uid"]
    assert not ownership_problems(kmock, ns)


# ---------------------------------------------------------------- the API server failing

TIMEOUT = 1.5  # the operator's API request timeout in these tests (reconciler.API_TIMEOUT_SECONDS, set in one place)
SEAM = {"kaito_tuning.controller.reconciler.API_TIMEOUT_SECONDS": TIMEOUT}
F = "faulty"
CASES = {
    "500 on the Job create, 3 times": [Fault(Fault.on("create", JOBS, namespace=F, token="op"), 500, times=3)],
    "503 on the Secret create twice, 500 on reading the Job twice": [
        Fault(Fault.on("create", "v1/secrets", namespace=F, token="op"), 503, "ServiceUnavailable", times=2),
        Fault(Fault.on("fetch", JOBS, namespace=F, token="op"), 500, times=2)],
    "409 AlreadyExists for a Job create that was stored (the answer lost)": [
        Fault(Fault.on("create", JOBS, namespace=F, token="op"), 409, "AlreadyExists", "jobs.batch \"ws\" already exists",
              apply=True)],
    "409 Conflict on the status patch, 3 times": [
        Fault(Fault.on("update", WS, subresource="status", namespace=F, token="op"), 409, "Conflict",
              "the object has been modified; please apply your changes to the latest version", times=3)],
    "500 on the status patch, 3 times": [Fault(Fault.on("update", WS, subresource="status", namespace=F, token="op"), 500, times=3)],
    # kopf patches the workspace only to keep a retry's state (what it handled is kept in memory): a failed
    # Job create makes one
    "500 on the workspace patch (kopf's retry state), twice": [
        Fault(Fault.on("create", JOBS, namespace=F, token="op"), 500, times=1),
        Fault(Fault.on("update", WS, namespace=F, token="op"), 500, times=2)],
    "500 on the status patch that reports success, 3 times": [
        Fault(lambda r: Fault.on("update", WS, subresource="status", namespace=F, token="op")(r)
              and (r.data or {}).get("status", {}).get("state") == "Succeeded", 500, times=3)],
    "the Job create held past the client's timeout, then stored": [
        Fault(Fault.on("create", JOBS, namespace=F, token="op"), delay=TIMEOUT * 2)],
    "reading the pods held forever, once": [Fault(Fault.on("list", "v1/pods", namespace=F, token="op"), delay=3600)],
    "the status patch held forever, once": [Fault(Fault.on("update", WS, subresource="status", namespace=F, token="op"), delay=3600)],
}


@pytest.mark.parametrize("case", list(CASES))
async def test_api_server_faults_then_recovery(kmock, kubeconfig, tmp_path, zygote, case):
    faults = CASES[case]
    for f in faults:
        f.hits = 0
    kmock.faults.extend(faults)
    async with operator(zygote, kmock, tmp_path, F, "op", setattr=SEAM) as op:
        await create_workspace("ref")
        await create_workspace(F)
        want = await run_pod_to_success(kmock, "ref")
        got = await run_pod_to_success(kmock, F)
        await eventually(lambda: [f.hits for f in faults] == [f.times for f in faults], 20)  # each one happened
        await quiet(op.writes)
        got = status(kmock, F)
        assert normalized(got, F) == normalized(want, "ref")
        assert inventory(kmock, F) == inventory(kmock, "ref")
        assert not ownership_problems(kmock, F) and not job_deletes(kmock, F)
    op.log_lines()  # every line one JSON object
    text = op.log.read_text()
    assert "Traceback" not in text and PLANTED not in text
    assert PLANTED not in json.dumps([list_objs(kmock, "v1/events"), status(kmock, F)])
    assert max(len(line) for line in text.splitlines()) < 2000  # no dump of responses or settings


MEANWHILE = {
    # a fresh workspace: its Job is created without a read first; the create is held, then served (409)
    "fresh workspace, the create held": lambda: [Fault(Fault.on("create", JOBS, namespace=F, token="op"), delay=1.0)],
    # a workspace reconciled before (its first Job create failed: a status): the read is held, then answers 404
    "workspace seen before, the read held": lambda: [
        Fault(Fault.on("create", JOBS, namespace=F, token="op"), 500, times=1),
        Fault(Fault.on("fetch", JOBS, namespace=F, token="op"), 404, "NotFound", 'jobs.batch "ws" not found',
              delay=1.0)],
}


@pytest.mark.parametrize("case", list(MEANWHILE))
async def test_409_on_the_job_create_for_a_job_someone_else_made_meanwhile_is_reported(kmock, kubeconfig, tmp_path,
                                                                                       zygote, case):
    """Someone else creates a Job of the workspace's name while the operator's request (its read, or its create
    for a fresh workspace) is held; the operator's create answers 409 AlreadyExists: not adopted, not deleted,
    shown in status."""
    *_, held = faults = MEANWHILE[case]()
    kmock.faults.extend(faults)
    foreign = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": NAME, "namespace": F, "labels": {"kaito.sh/workspace": NAME}},
               "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "busybox"}]}}}}
    async with operator(zygote, kmock, tmp_path, F, "op", setattr=SEAM) as op:
        await create_workspace(F)
        await eventually(lambda: held.hits == 1, 20, 0.01)
        await asyncio.to_thread(kubernetes.client.BatchV1Api().create_namespaced_job, F, foreign)
        uid = get_obj(kmock, JOBS, F, NAME)["metadata"]["uid"]
        st = await eventually(lambda: cond(status(kmock, F), "WorkspaceSucceeded").get("reason") == "JobConflict"
                              and status(kmock, F), 20)
        assert "not owned by this workspace" in cond(st, "WorkspaceSucceeded")["message"]
        await asyncio.sleep(2)  # it re-checks every retry_delay_seconds: still nothing done to the Job
    job = get_obj(kmock, JOBS, F, NAME)
    assert job["metadata"]["uid"] == uid and not job["metadata"].get("ownerReferences")  # untouched, not adopted
    assert not [w for w in op.writes() if w["resource"] == JOBS and w["action"] != "create"]
    assert "Traceback" not in op.log.read_text()


def test_every_api_request_of_the_operator_has_a_timeout():
    """The kubernetes client waits forever unless told otherwise; kopf waits 5 minutes by default."""
    from kaito_tuning.controller import reconciler
    from kaito_tuning.controller.settings import Settings

    rec = reconciler.Reconciler(Settings())
    assert 0 < reconciler.API_TIMEOUT_SECONDS <= 60
    for api in (rec.core, rec.batch, rec.apps, rec.custom, rec.networking):
        assert isinstance(api.api_client, reconciler.TimedApiClient)
    seen = []
    api = rec.core.api_client
    api.rest_client.request = lambda *a, _request_timeout=None, **k: seen.append(_request_timeout) or 1 / 0
    with pytest.raises(ZeroDivisionError):
        rec.core.read_namespaced_config_map("x", "default")
    assert seen == [reconciler.API_TIMEOUT_SECONDS]
