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
from kaito_tuning.controller.seen import OwnStatusWrites
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


FIRST = ["CREATE secrets", "CREATE networkpolicies", "CREATE jobs", "UPDATE workspaces/status", "CREATE events",
         "UPDATE workspaces"]


async def test_a_fresh_workspace_costs_six_requests_and_the_default_configmap_and_push_secret_are_checked_once(
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


async def test_the_late_echo_of_the_operators_own_status_write_is_not_reconciled_again(kmock, kubeconfig):
    """kopf waits ``consistency_timeout`` for the echo of its own patch; after that it takes the echo of our status
    write (which lacks kopf's annotations) for a new workspace and calls the create handler again. With the
    timeout at 0 that happens every time: the call must cost no reconcile (none reads the push secret again)."""
    await push_secret()
    registry = register(Settings(retry_delay_seconds=0.5))

    @kopf.on.startup(registry=registry)
    def lagging_watch(settings: kopf.OperatorSettings, **_):
        settings.persistence.consistency_timeout = 0  # as if the watch lagged behind by more than the timeout

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
    assert "FETCH jobs" not in got, got  # a fresh workspace's Job is created without a read
    assert got.count("UPDATE workspaces") == 2, "kopf called the handler again (its second patch): the echo case"


def test_own_status_writes_remember_the_last_successful_write_only():
    own = OwnStatusWrites(limit=2)
    body = {"metadata": {"uid": "u1", "resourceVersion": "7"}}
    assert not own.is_own_echo(body)
    own.record("u1", "7")
    assert own.is_own_echo(body)
    assert not own.is_own_echo({"metadata": {"uid": "u1", "resourceVersion": "8"}})  # changed since: reconciled
    own.forget("u1")  # a reconcile that ends in a retry
    assert not own.is_own_echo(body)
    own.record("u1", None)  # nothing written
    assert not own.is_own_echo(body)
    for uid in ("u1", "u2", "u3"):
        own.record(uid, "7")
    assert not own.is_own_echo(body) and own.is_own_echo({"metadata": {"uid": "u3", "resourceVersion": "7"}})
