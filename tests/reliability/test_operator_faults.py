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
from fixtures_k8s import Emulator, eventually, get_obj
from kubelet import PodSim, publish

from .operator_faults import (
    JOBS,
    NAME,
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
    assert len(writes) >= 6, writes  # the ConfigMap, PVC, Secret, NetworkPolicy, Job, finalizer, status...
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
