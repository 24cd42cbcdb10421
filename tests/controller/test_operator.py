"""The operator end to end: kmock as the API server, kubectl as a user, the operator in-process."""

from __future__ import annotations

import base64
import copy
import http.server
import json
import threading

import kubernetes
import kubernetes_validate
import pytest
import yaml
from fixtures_k8s import (
    Emulator,
    eventually,
    get_obj,
    kubectl,
    list_objs,
    running_operator,
)

from kaito_tuning.controller import manifests
from kaito_tuning.controller.settings import Settings

pytestmark = [pytest.mark.kmock(cls=Emulator), pytest.mark.timeout(120)]

WS = "kaito.sh/v1beta1/workspaces"
JOBS = "batch/v1/jobs"
QUICK = "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
NAME = "workspace-tuning-phi-3"
SETTINGS = Settings(retry_delay_seconds=0.5, progress_poll_seconds=0.3)


def quick_start() -> dict:
    return yaml.safe_load(open(QUICK))


async def apply(obj: dict) -> None:
    await kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))


async def push_secret(name="ACR_REGISTRY_SECRET_HERE", type_="kubernetes.io/dockerconfigjson"):
    data = {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()} if "docker" in type_ else \
        {"token": base64.b64encode(b"x").decode()}
    import asyncio

    await asyncio.to_thread(core().create_namespaced_secret, "default", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": type_, "data": data})


def status(kmock, name=NAME) -> dict:
    return (get_obj(kmock, WS, "default", name) or {}).get("status") or {}


def cond(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def core():
    return kubernetes.client.CoreV1Api()


def batch():
    return kubernetes.client.BatchV1Api()


async def make_pod(job: dict, phase="Pending", statuses=None, init_statuses=None, ip=None, suffix="a"):
    """A pod of ``job`` as the Job controller would create it, with the given status."""
    import asyncio

    meta = job["spec"]["template"]["metadata"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{job['metadata']['name']}-{suffix}", "namespace": "default",
                        "labels": dict(meta["labels"]), "annotations": dict(meta["annotations"])},
           "spec": job["spec"]["template"]["spec"]}
    try:
        await asyncio.to_thread(core().create_namespaced_pod, "default", pod)
    except kubernetes.client.exceptions.ApiException as e:
        if e.status != 409:
            raise
    st = {"phase": phase, "containerStatuses": statuses or [], "initContainerStatuses": init_statuses or [],
          "conditions": [{"type": "PodScheduled", "status": "True"}]}
    if ip:
        st["podIP"] = ip
    await asyncio.to_thread(core().patch_namespaced_pod_status, pod["metadata"]["name"], "default", {"status": st})


async def set_job_status(name: str, st: dict):
    import asyncio

    await asyncio.to_thread(batch().patch_namespaced_job_status, name, "default", {"status": st})


def terminated(name, code, message="", reason=None):
    return {"name": name, "ready": False, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": code, "message": message, "reason": reason or ("Completed" if code == 0 else "Error")}}}


def running(name):
    return {"name": name, "ready": True, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}


@pytest.fixture
def progress_server(monkeypatch):
    """A fake tuner /progress on 127.0.0.1 (a free port, patched in as the progress port)."""
    report = {"step": 40, "total_steps": 100, "epoch": 0.4, "loss": 1.25, "eta_seconds": 90}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(report).encode()
            self.send_response(200 if self.path == "/progress" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    monkeypatch.setattr(manifests, "PROGRESS_PORT", srv.server_address[1])
    yield report
    srv.shutdown()
    srv.server_close()


async def test_quick_start_runs_reports_progress_and_succeeds(kmock, kubeconfig, progress_server):
    async with running_operator(SETTINGS):
        await push_secret()
        await kubectl("apply", "-f", QUICK)
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        clean = copy.deepcopy(job)
        kubernetes_validate.validate(clean, "1.33.0", strict=True)
        assert job["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
        assert job["metadata"]["labels"][manifests.LABEL_WORKSPACE] == NAME
        await eventually(lambda: status(kmock).get("state") == "Pending")
        assert cond(status(kmock), "JobStarted")["status"] == "False"

        await make_pod(job, "Running", init_statuses=[terminated("download", 0), running("tuner")],
                       statuses=[], ip="127.0.0.1")
        await set_job_status(NAME, {"active": 1, "startTime": "2025-01-01T00:00:00Z"})
        st = await eventually(lambda: status(kmock).get("tuning", {}).get("progress") and status(kmock))
        assert st["state"] == "Running"
        assert st["tuning"]["progress"] == {"step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 1.25, "etaSeconds": 90}
        assert cond(st, "JobStarted")["status"] == "True"
        out = (await kubectl("get", "workspace", NAME, "-o", "jsonpath={.status.state}")).stdout
        assert out == "Running"
        table = (await kubectl("get", "workspace")).stdout
        assert NAME in table

        result = json.dumps({"image": "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1", "digest": "sha256:" + "a" * 64})
        await make_pod(job, "Succeeded", init_statuses=[terminated("download", 0), terminated("tuner", 0)],
                       statuses=[terminated("push", 0, result)])
        await set_job_status(NAME, {"succeeded": 1, "completionTime": "2025-01-01T01:00:00Z",
                                    "conditions": [{"type": "Complete", "status": "True"}]})
        st = await eventually(lambda: status(kmock).get("state") == "Succeeded" and status(kmock))
        assert st["tuning"]["output"] == {"image": "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1",
                                          "digest": "sha256:" + "a" * 64}
        assert cond(st, "WorkspaceSucceeded")["status"] == "True"
        out = (await kubectl("get", "workspace", NAME, "-o",
                             'jsonpath={.status.conditions[?(@.type=="WorkspaceSucceeded")].status}')).stdout
        assert out == "True"


@pytest.mark.parametrize("case", ["oom", "bad-dataset"])
async def test_failures_show_their_reason(kmock, kubeconfig, case):
    async with running_operator(SETTINGS):
        await push_secret()
        await kubectl("apply", "-f", QUICK)
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        if case == "oom":
            tuner = terminated("tuner", 137, "", reason="OOMKilled")
            want = "OutOfMemory"
        else:
            tuner = terminated("tuner", 65, "DatasetInvalid: tuning.input.urls[0]: no rows with a messages column")
            want = "DatasetInvalid"
        # a first failed attempt that the Job retries is not a failure of the workspace
        await make_pod(job, "Failed", init_statuses=[terminated("download", 0), tuner], suffix="a")
        await set_job_status(NAME, {"failed": 1, "active": 0})
        st = await eventually(lambda: "retrying" in cond(status(kmock), "WorkspaceSucceeded").get("message", "")
                              and status(kmock))
        assert st["state"] != "Failed"
        await set_job_status(NAME, {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "PodFailurePolicy"}]})
        st = await eventually(lambda: status(kmock).get("state") == "Failed" and status(kmock))
        assert st["tuning"]["failure"]["reason"] == want
        assert st["tuning"]["failure"]["container"] == "tuner"
        assert cond(st, "WorkspaceSucceeded")["reason"] == want
        if case == "bad-dataset":
            assert "messages column" in st["tuning"]["failure"]["message"]


async def test_restart_mid_reconcile_leaves_exactly_one_job(kmock, kubeconfig):
    names = [f"ws-{i}" for i in range(4)]
    async with running_operator(SETTINGS):
        await push_secret()
        docs = []
        for n in names:
            d = quick_start()
            d["metadata"]["name"] = n
            docs.append(yaml.safe_dump(d))
        await kubectl("apply", "-f", "-", input="---\n".join(docs))
        await eventually(lambda: get_obj(kmock, JOBS, "default", names[0]), 20, 0.01)
    uids = {j["metadata"]["name"]: j["metadata"]["uid"] for j in list_objs(kmock, JOBS)}
    async with running_operator(SETTINGS):
        await eventually(lambda: len(list_objs(kmock, JOBS)) == len(names) and
                         all(status(kmock, n).get("tuning", {}).get("jobName") for n in names))
    jobs = list_objs(kmock, JOBS)
    assert sorted(j["metadata"]["name"] for j in jobs) == names
    for j in jobs:  # a job created before the restart was kept, not replaced
        if j["metadata"]["name"] in uids:
            assert j["metadata"]["uid"] == uids[j["metadata"]["name"]]


async def test_update_starts_a_new_run(kmock, kubeconfig):
    async with running_operator(SETTINGS):
        await push_secret()
        await kubectl("apply", "-f", QUICK)
        job1 = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        d = quick_start()
        d["tuning"]["input"]["urls"] = ["https://example.com/data/other.parquet"]
        await apply(d)
        job2 = await eventually(lambda: (j := get_obj(kmock, JOBS, "default", NAME)) and
                                j["metadata"]["uid"] != job1["metadata"]["uid"] and j)
        assert job2["metadata"]["annotations"][manifests.ANNOTATION_REVISION] == "2"
        assert "other.parquet" in json.dumps(job2["spec"])
        await eventually(lambda: status(kmock).get("tuning", {}).get("revision") == 2)


async def test_missing_configmap_waits_then_runs(kmock, kubeconfig):
    async with running_operator(SETTINGS):
        await push_secret()
        d = quick_start()
        d["tuning"]["config"] = "my-params"
        await apply(d)
        st = await eventually(lambda: cond(status(kmock), "JobStarted").get("reason") == "ConfigMapNotFound" and status(kmock))
        assert "my-params" in cond(st, "JobStarted")["message"]
        assert get_obj(kmock, JOBS, "default", NAME) is None
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "my-params", "namespace": "default"},
              "data": {"training_config.yaml": open("kaito_tuning/spec/data/qlora-params.yaml").read()}}
        import asyncio

        await asyncio.to_thread(core().create_namespaced_config_map, "default", cm)
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME), 15)
        vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert vols["config"]["configMap"]["name"] == "my-params"


@pytest.mark.parametrize("case", ["missing", "wrong-type"])
async def test_push_secret_problems_are_reported(kmock, kubeconfig, case):
    async with running_operator(SETTINGS):
        if case == "wrong-type":
            await push_secret(type_="Opaque")
        await kubectl("apply", "-f", QUICK)
        want = "SecretNotFound" if case == "missing" else "SecretWrongType"
        st = await eventually(lambda: cond(status(kmock), "WorkspaceSucceeded").get("reason") == want and status(kmock))
        assert "ACR_REGISTRY_SECRET_HERE" in cond(st, "WorkspaceSucceeded")["message"]
        assert get_obj(kmock, JOBS, "default", NAME) is None


async def test_job_deleted_by_hand_is_recreated(kmock, kubeconfig):
    async with running_operator(SETTINGS):
        await push_secret()
        await kubectl("apply", "-f", QUICK)
        job1 = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        await kubectl("delete", "job", NAME)
        job2 = await eventually(lambda: (j := get_obj(kmock, JOBS, "default", NAME)) and
                                j["metadata"]["uid"] != job1["metadata"]["uid"] and j)
        assert job2["metadata"]["annotations"][manifests.ANNOTATION_REVISION] == "1"
        await eventually(lambda: "recreated" in status(kmock).get("tuning", {}).get("note", ""))


async def test_deleting_the_workspace_removes_its_job(kmock, kubeconfig):
    async with running_operator(SETTINGS):
        await push_secret()
        await kubectl("apply", "-f", QUICK)
        await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        await kubectl("delete", "workspace", NAME)
        await eventually(lambda: get_obj(kmock, JOBS, "default", NAME) is None)


async def test_nodeclaim_provisioned_waited_for_and_released(kmock, kubeconfig):
    import asyncio

    settings = Settings(retry_delay_seconds=0.5, node_auto_provisioning=True)
    async with running_operator(settings):
        await push_secret()
        await kubectl("apply", "-f", QUICK)
        claims = await eventually(lambda: list_objs(kmock, "karpenter.sh/v1/nodeclaims"))
        claim = claims[0]
        assert claim["spec"]["requirements"][0]["values"] == ["Standard_NC6s_v3"]
        assert claim["metadata"]["labels"]["app"] == "tuning-phi-3"
        st = await eventually(lambda: cond(status(kmock), "NodeClaimReady") and status(kmock))
        assert cond(st, "NodeClaimReady")["status"] == "False"
        assert get_obj(kmock, JOBS, "default", NAME) is None  # no Job before the node is there
        await asyncio.to_thread(
            kubernetes.client.CustomObjectsApi().patch_cluster_custom_object_status, "karpenter.sh", "v1", "nodeclaims",
            claim["metadata"]["name"], {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME), 15)
        await eventually(lambda: cond(status(kmock), "NodeClaimReady").get("status") == "True")
        await make_pod(job, "Succeeded", statuses=[terminated("push", 0, '{"image": "x/y:1", "digest": "sha256:00"}')])
        await set_job_status(NAME, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: status(kmock).get("state") == "Succeeded")
        await eventually(lambda: not list_objs(kmock, "karpenter.sh/v1/nodeclaims"))  # OnCompletion release


async def test_inference_workspace_gets_deployment_and_service(kmock, kubeconfig):
    d = yaml.safe_load(open("examples/inference/kaito_workspace_phi_3_with_adapters.yaml"))
    name = d["metadata"]["name"]
    async with running_operator(SETTINGS):
        await push_secret("myregistry-pull")
        await apply(d)
        dep = await eventually(lambda: get_obj(kmock, "apps/v1/deployments", "default", name))
        svc = await eventually(lambda: get_obj(kmock, "v1/services", "default", name))
        assert svc["spec"]["ports"][0]["port"] == 80
        init = dep["spec"]["template"]["spec"]["initContainers"]
        assert init[0]["args"][:3] == ["pull", "myregistry.azurecr.io/adapters/phi-3-dolly:0.0.1", "/mnt/adapter/dolly"]
        st = await eventually(lambda: status(kmock, name).get("conditions") and status(kmock, name))
        assert cond(st, "InferenceReady")["status"] == "False"
        d["inference"]["adapters"][0]["strength"] = "0.5"
        await apply(d)
        dep2 = await eventually(lambda: (x := get_obj(kmock, "apps/v1/deployments", "default", name)) and
                                "/mnt/adapter/dolly=0.5" in x["spec"]["template"]["spec"]["containers"][0]["args"] and x)
        assert dep2["spec"]["template"]["metadata"]["annotations"] != dep["spec"]["template"]["metadata"]["annotations"]
        await set_deployment_ready(name)
        await eventually(lambda: cond(status(kmock, name), "InferenceReady").get("status") == "True")


async def set_deployment_ready(name):
    import asyncio

    await asyncio.to_thread(kubernetes.client.AppsV1Api().patch_namespaced_deployment_status, name, "default",
                            {"status": {"readyReplicas": 1, "replicas": 1, "observedGeneration": 99}})
