"""What one fresh workspace costs the operator in API requests, counted on the emulator's request log."""

from __future__ import annotations

import asyncio
import base64

import kopf
import kubernetes
import pytest
import yaml
from fixtures_k8s import Emulator, eventually, get_obj, kubectl, running_operator
from kmock._internal import enums

from kaito_tuning.controller import reconciler
from kaito_tuning.controller.handlers import register
from kaito_tuning.controller.seen import HandledSpecs
from kaito_tuning.controller.settings import Settings

QUICK = "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
WS = "kaito.sh/v1beta1/workspaces"
JOBS = "batch/v1/jobs"
pytestmark = [pytest.mark.kmock(cls=Emulator), pytest.mark.timeout(120)]


def workspace(name: str) -> str:
    doc = yaml.safe_load(open(QUICK))
    doc["metadata"]["name"] = name
    doc["tuning"]["output"] = {"image": f"registry.example.com/req/{name}:0.0.1", "imagePushSecret": "acr-push"}
    return yaml.safe_dump(doc)


async def push_secret() -> None:
    await asyncio.to_thread(kubernetes.client.CoreV1Api().create_namespaced_secret, "default", {
        "metadata": {"name": "acr-push"}, "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}})


def operator_requests(kmock, since: int = 0) -> list[str]:
    """The operator's requests after the first ``since`` of the log ("VERB resource[/subresource]"), kubectl's
    and the watch streams' (kopf's one LIST + WATCH per resource, whenever it starts them) left out."""
    out = []
    for r in list(kmock)[since:]:
        if r.resource is None or (r.headers.get("User-Agent") or "").startswith("kubectl"):
            continue
        if r.action == enums.action.WATCH or (r.action == enums.action.LIST and not r.params.get("labelSelector")):
            continue
        out.append(f"{r.action.name} {r.resource.plural}" + (f"/{r.subresource}" if r.subresource else ""))
    return out


async def settled(kmock, name: str) -> None:
    await eventually(lambda: get_obj(kmock, WS, "default", name) and
                     get_obj(kmock, WS, "default", name).get("status", {}).get("tuning", {}).get("jobName"))
    count = -1
    while count != len(list(kmock)):  # nothing more for 1 s: kopf's patch and the Event are in
        count = len(list(kmock))
        await asyncio.sleep(1.0)


#: no PATCH of the workspace: kopf's record of what it handled is in the operator's memory (seen.HandledSpecs)
FIRST = ["CREATE secrets", "CREATE networkpolicies", "CREATE jobs", "UPDATE workspaces/status", "CREATE events"]


async def test_a_fresh_workspace_costs_five_requests_and_the_default_configmap_and_push_secret_are_checked_once(
        kmock, kubeconfig, monkeypatch):
    monkeypatch.setattr(reconciler, "DEFAULT_CONFIGMAP_TTL_SECONDS", 2.0)
    monkeypatch.setattr(reconciler, "SECRET_CHECK_TTL_SECONDS", 60.0)  # the whole first part of the test
    await push_secret()
    async with running_operator(Settings(retry_delay_seconds=0.5)):
        since = len(list(kmock))
        await kubectl("apply", "-f", "-", input=workspace("req-a"))
        await settled(kmock, "req-a")
        first = operator_requests(kmock, since)
        assert sorted(first) == sorted(["CREATE configmaps", "FETCH secrets", *FIRST]), first

        since = len(list(kmock))
        await kubectl("apply", "-f", "-", input=workspace("req-b"))
        await settled(kmock, "req-b")
        second = operator_requests(kmock, since)
        assert sorted(second) == sorted(FIRST), "the default ConfigMap was created again or the push secret read again"

        # deleted by hand: the first reconcile after DEFAULT_CONFIGMAP_TTL_SECONDS creates it again
        await asyncio.to_thread(kubernetes.client.CoreV1Api().delete_namespaced_config_map, "qlora-params-template",
                                "default")
        await asyncio.sleep(2.0)
        await kubectl("apply", "-f", "-", input=workspace("req-c"))
        await settled(kmock, "req-c")
        assert get_obj(kmock, "v1/configmaps", "default", "qlora-params-template") is not None
        for name in ("req-a", "req-b", "req-c"):
            assert get_obj(kmock, JOBS, "default", name) is not None

        # the push secret deleted: once its check is older than SECRET_CHECK_TTL_SECONDS, it is read again
        await asyncio.to_thread(kubernetes.client.CoreV1Api().delete_namespaced_secret, "acr-push", "default")
        monkeypatch.setattr(reconciler, "SECRET_CHECK_TTL_SECONDS", 0.0)
        await kubectl("apply", "-f", "-", input=workspace("req-d"))
        job_started = await eventually(lambda: next((c for c in (get_obj(kmock, WS, "default", "req-d") or {}).get(
            "status", {}).get("conditions", []) if c["type"] == "JobStarted"), None))
        assert job_started["reason"] == "SecretNotFound", job_started
        assert get_obj(kmock, JOBS, "default", "req-d") is None


async def test_the_echo_of_the_operators_own_status_write_is_not_reconciled_and_kopf_patches_nothing(kmock, kubeconfig):
    """kopf's record of the workspace as handled is kept in memory, not in an annotation: no PATCH of the workspace
    after the reconcile, and the watch event of our status write is no change to kopf (a second reconcile would
    read the Job: a workspace with a status is no longer fresh). Even where kopf would wait for the echo of a patch
    of its own for no time at all (``consistency_timeout`` 0, a lagging watch)."""
    await push_secret()
    registry = register(Settings(retry_delay_seconds=0.5))

    @kopf.on.startup(registry=registry)
    def lagging_watch(settings: kopf.OperatorSettings, **_):
        settings.persistence.consistency_timeout = 0

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, standalone=True, clusterwide=True, stop_flag=stop,
                                             ready_flag=ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        since = len(list(kmock))
        await kubectl("apply", "-f", "-", input=workspace("echo"))
        await settled(kmock, "echo")
        got = operator_requests(kmock, since)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert got.count("UPDATE workspaces/status") == 1 and "FETCH jobs" not in got, got
    assert "UPDATE workspaces" not in got, got
    ws = get_obj(kmock, WS, "default", "echo")
    assert not any(k.startswith("kopf.zalando.org/") for k in ws["metadata"].get("annotations") or {}), ws["metadata"]


def test_handled_specs_hands_out_copies_and_keep_the_most_recently_handled():
    specs = HandledSpecs(kinds=("Workspace",), limit=2)
    body = {"metadata": {"uid": "u1"}}
    assert specs.fetch(body=body) is None
    specs.store(body=body, patch=None, essence={"spec": {"a": [1]}})
    got = specs.fetch(body=body)
    got["spec"]["a"].append(2)  # kopf edits what it gets
    assert specs.fetch(body=body) == {"spec": {"a": [1]}}
    specs.store(body={"metadata": {}}, patch=None, essence={"spec": {}})  # no uid: nothing kept
    for uid in ("u2", "u3"):
        specs.store(body={"metadata": {"uid": uid}}, patch=None, essence={"spec": {"uid": uid}})
    assert specs.fetch(body=body) is None  # the oldest went first: handled as created at its next event
    assert specs.fetch(body={"metadata": {"uid": "u3"}}) == {"spec": {"uid": "u3"}}


def test_handled_specs_builds_kopfs_own_essence_of_a_workspace_and_none_of_other_kinds():
    doc = yaml.safe_load(open(QUICK))
    doc["metadata"].update(namespace="default", uid="u1", resourceVersion="9", generation=2,
                           labels={"team": "a"}, managedFields=[{"manager": "kubectl", "operation": "Update"}],
                           annotations={"note": "x", "kubectl.kubernetes.io/last-applied-configuration": "{}",
                                        "kopf.zalando.org/last-handled-configuration": "{}"})
    doc["status"] = {"state": "Running", "conditions": [{"type": "JobStarted", "status": "True"}]}
    ours = HandledSpecs(kinds=("Workspace",)).build(body=kopf.Body(doc))
    assert ours == kopf.AnnotationsDiffBaseStorage().build(body=kopf.Body(doc))
    assert ours["metadata"] == {"labels": {"team": "a"}, "annotations": {"note": "x"}} and "status" not in ours
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "uid": "u2"}, "spec": {"parallelism": 1}}
    assert HandledSpecs(kinds=("Workspace",)).build(body=kopf.Body(job)) == {}
