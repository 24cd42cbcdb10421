"""Which Job/pod events reconcile a workspace (``SeenObjects``), and what one workspace costs in API requests."""

from __future__ import annotations

import asyncio
import base64
import copy

import kubernetes
import pytest
from fixtures_k8s import Emulator, eventually, get_obj, kubectl, running_operator
from kmock._internal import enums

from kaito_tuning.controller.seen import SeenObjects
from kaito_tuning.controller.settings import Settings

QUICK = "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
NAME = "workspace-tuning-phi-3"
JOB = {"kind": "Job", "metadata": {"name": NAME, "namespace": "default", "uid": "u1", "resourceVersion": "1",
                                   "labels": {"kaito.sh/workspace": NAME}, "annotations": {"workspace.kaito.io/revision": "1"}},
       "spec": {"backoffLimit": 3}}


def test_only_status_relevant_changes_count():
    seen = SeenObjects()
    seen.record("Job", JOB)  # as the operator does with the answer to its create
    echo = copy.deepcopy(JOB)
    echo["metadata"]["resourceVersion"] = "2"
    echo["metadata"]["managedFields"] = [{"manager": "kube-controller-manager"}]
    assert not seen.changed("Job", echo)
    started = copy.deepcopy(echo)
    started["status"] = {"active": 1}
    assert seen.changed("Job", started)
    assert not seen.changed("Job", started)
    assert seen.changed("Job", started, deleted=True)  # deletion always counts, and is forgotten
    assert seen.changed("Job", started)
    recreated = copy.deepcopy(started)
    recreated["metadata"]["uid"] = "u2"
    assert seen.changed("Job", recreated)
    assert seen.changed("Pod", recreated)  # kinds are kept apart


@pytest.mark.kmock(cls=Emulator)
@pytest.mark.timeout(120)
async def test_one_workspace_one_reconcile_until_its_job_changes(kmock, kubeconfig):
    await asyncio.to_thread(kubernetes.client.CoreV1Api().create_namespaced_secret, "default", {
        "metadata": {"name": "acr-push"}, "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}})

    def status_writes() -> int:
        return sum(1 for r in kmock if r.action == enums.action.UPDATE and r.subresource == "status"
                   and r.resource.plural == "workspaces")

    async with running_operator(Settings(retry_delay_seconds=0.5)):
        await kubectl("apply", "-f", "-", input=open(QUICK).read().replace("ACR_REGISTRY_SECRET_HERE", "acr-push"))
        await eventually(lambda: get_obj(kmock, "batch/v1/jobs", "default", NAME))
        await eventually(status_writes)
        await asyncio.sleep(1.5)  # the Job's ADDED event has long arrived (kopf batches events for 0.1 s)
        assert status_writes() == 1, "the echo of the operator's own Job create reconciled the workspace again"
        assert sum(1 for r in kmock if r.action == enums.action.FETCH and r.resource is not None
                   and r.resource.plural == "jobs") == 0, "a fresh workspace's Job is created unread, not read after"
        assert not [r for r in kmock if r.action == enums.action.LIST and r.params.get("labelSelector")], \
            "pods listed for a Job created in the same reconcile"
        workspace_lists = [r for r in kmock if r.action == enums.action.LIST and r.resource is not None
                           and r.resource.plural == "workspaces" and not r.params.get("watch")]
        assert len(workspace_lists) <= 1, "the output-image check listed every workspace (kopf's index knows them)"

        await asyncio.to_thread(kubernetes.client.BatchV1Api().patch_namespaced_job_status, NAME, "default",
                                {"status": {"active": 1, "startTime": "2025-01-01T00:00:00Z"}})
        await eventually(lambda: (get_obj(kmock, "kaito.sh/v1beta1/workspaces", "default", NAME)["status"]
                                  ["tuning"].get("startedAt")) == "2025-01-01T00:00:00Z")
        assert status_writes() == 2
