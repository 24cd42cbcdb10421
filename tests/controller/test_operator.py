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
from kubelet import PodSim, publish

from kaito_tuning.controller import manifests
from kaito_tuning.controller.settings import Settings

pytestmark = [pytest.mark.kmock(cls=Emulator), pytest.mark.timeout(120)]

WS = "kaito.sh/v1beta1/workspaces"
JOBS = "batch/v1/jobs"
QUICK = "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
NAME = "workspace-tuning-phi-3"
SETTINGS = Settings(retry_delay_seconds=0.5, progress_poll_seconds=0.3)


PUSH_SECRET = "acr-push"


def quick_start() -> dict:
    """The quick start with a real secret name for its placeholder (ACR_REGISTRY_SECRET_HERE is not a name)."""
    d = yaml.safe_load(open(QUICK))
    assert d["tuning"]["output"]["imagePushSecret"] == "ACR_REGISTRY_SECRET_HERE"
    d["tuning"]["output"]["imagePushSecret"] = PUSH_SECRET
    return d


async def apply_quick_start() -> None:
    await apply(quick_start())


async def apply(obj: dict) -> None:
    await kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))


async def push_secret(name=PUSH_SECRET, type_="kubernetes.io/dockerconfigjson"):
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


def job_of(kmock) -> dict:
    return get_obj(kmock, JOBS, "default", NAME)


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
        await apply_quick_start()
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        clean = copy.deepcopy(job)
        kubernetes_validate.validate(clean, "1.33.0", strict=True)
        assert job["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
        assert job["metadata"]["labels"][manifests.LABEL_WORKSPACE] == NAME
        await eventually(lambda: status(kmock).get("state") == "Pending")
        assert cond(status(kmock), "JobStarted")["status"] == "False"

        pod = PodSim(job)
        pod.ip = "127.0.0.1"  # where the fake tuner serves /progress
        await publish(pod.schedule().start("download"), job=job)  # Init:0/2: the pod is Pending
        st = await eventually(lambda: status(kmock).get("tuning", {}).get("stage") == "downloading" and status(kmock))
        assert st["state"] == "Running" and cond(st, "JobStarted")["status"] == "True"
        assert (await kubectl("get", "workspace", NAME, "-o",
                              'jsonpath={.status.conditions[?(@.type=="JobStarted")].status}')).stdout == "True"

        await publish(pod.finish("download").start("tuner"), job=job)  # Init:1/2, still Pending while training
        assert pod.status()["phase"] == "Pending"
        st = await eventually(lambda: status(kmock).get("tuning", {}).get("progress") and status(kmock))
        assert st["state"] == "Running" and st["tuning"]["stage"] == "training"
        assert st["tuning"]["progress"] == {"step": 40, "totalSteps": 100, "epoch": 0.4, "loss": 1.25, "etaSeconds": 90}
        assert cond(st, "JobStarted")["status"] == "True"
        await eventually(lambda: "step 40/100" in cond(status(kmock), "WorkspaceSucceeded")["message"])
        out = (await kubectl("get", "workspace", NAME, "-o", "jsonpath={.status.state}")).stdout
        assert out == "Running"
        table = (await kubectl("get", "workspace")).stdout
        assert NAME in table

        await publish(pod.finish("tuner").start("push"), job=job)
        await eventually(lambda: status(kmock).get("tuning", {}).get("stage") == "pushing")
        result = json.dumps({"image": "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1", "digest": "sha256:" + "a" * 64})
        await publish(pod.finish("push", 0, result), job=job)
        st = await eventually(lambda: status(kmock).get("state") == "Succeeded" and status(kmock))
        assert st["tuning"]["output"] == {"image": "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1",
                                          "digest": "sha256:" + "a" * 64}
        assert "stage" not in st["tuning"]
        assert cond(st, "WorkspaceSucceeded")["status"] == "True"
        out = (await kubectl("get", "workspace", NAME, "-o",
                             'jsonpath={.status.conditions[?(@.type=="WorkspaceSucceeded")].status}')).stdout
        assert out == "True"
        # every phase change is an Event on the workspace
        await eventually(lambda: {"downloading", "training", "pushing", "Succeeded"} <= {
            w for e in events_of(kmock) for w in ("downloading", "training", "pushing", "Succeeded") if w in e["message"]})


def events_of(kmock, name=NAME) -> list[dict]:
    return [e for e in list_objs(kmock, "v1/events") if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") == "Workspace"]


@pytest.mark.parametrize("case", ["transient-then-oom", "bad-dataset"])
async def test_failures_show_their_reason(kmock, kubeconfig, case):
    async with running_operator(SETTINGS):
        await push_secret()
        await apply_quick_start()
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        if case == "transient-then-oom":
            # a first failed attempt that the Job retries is not a failure of the workspace
            first = PodSim(job, "a").run_through("tuner").finish("tuner", 75, "Transient: registry timeout")
            await publish(first, job=job)
            st = await eventually(lambda: "retrying" in cond(status(kmock), "WorkspaceSucceeded").get("message", "")
                                  and status(kmock))
            assert st["state"] != "Failed"
            second = PodSim(job, "b").run_through("tuner").oom_kill("tuner")  # the kubelet kills it: 137
            await publish(second, first, job=job)
            want = "OutOfMemory"
        else:
            bad = PodSim(job).run_through("tuner").finish(
                "tuner", 65, "DatasetInvalid: tuning.input.urls[0]: no rows with a messages column")
            await publish(bad, job=job)
            want = "DatasetInvalid"
        # the Job controller fails the Job at once (podFailurePolicy), no further retry
        assert get_obj(kmock, JOBS, "default", NAME)["status"]["conditions"][0]["reason"] == "PodFailurePolicy"
        st = await eventually(lambda: status(kmock).get("state") == "Failed" and status(kmock))
        assert st["tuning"]["failure"]["reason"] == want
        assert st["tuning"]["failure"]["container"] == "tuner"
        assert cond(st, "WorkspaceSucceeded")["reason"] == want
        if case == "bad-dataset":
            assert "messages column" in st["tuning"]["failure"]["message"]
        ev = await eventually(lambda: [e for e in events_of(kmock) if e["reason"] == want])
        assert ev[0]["type"] == "Warning"


async def test_restart_mid_reconcile_leaves_exactly_one_job(kmock, kubeconfig):
    names = [f"ws-{i}" for i in range(4)]
    async with running_operator(SETTINGS):
        await push_secret()
        docs = []
        for n in names:
            d = quick_start()
            d["metadata"]["name"] = n
            d["tuning"]["output"]["image"] = f"registry.example.com/adapters/{n}:1"  # one output image each
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
        await apply_quick_start()
        job1 = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        d = quick_start()
        d["tuning"]["input"]["urls"] = ["https://example.com/data/other.parquet"]
        await apply(d)
        job2 = await eventually(lambda: (j := get_obj(kmock, JOBS, "default", NAME)) and
                                j["metadata"]["uid"] != job1["metadata"]["uid"] and j)
        assert job2["metadata"]["annotations"][manifests.ANNOTATION_REVISION] == "2"
        # the workspace the steps read is in its Secret (not the Job), updated for the new revision
        secret = get_obj(kmock, "v1/secrets", "default", f"{NAME}-workspace")
        assert "other.parquet" in json.dumps(secret) and "other.parquet" not in json.dumps(job2["spec"])
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


@pytest.mark.parametrize("case", ["missing", "wrong-type", "placeholder"])
async def test_push_secret_problems_are_reported(kmock, kubeconfig, case):
    async with running_operator(SETTINGS):
        if case == "wrong-type":
            await push_secret(type_="Opaque")
        if case == "placeholder":
            await kubectl("apply", "-f", QUICK)  # the quick start exactly as published
        else:
            await apply_quick_start()
        want = {"missing": "SecretNotFound", "wrong-type": "SecretWrongType", "placeholder": "SecretNamePlaceholder"}[case]
        st = await eventually(lambda: cond(status(kmock), "WorkspaceSucceeded").get("reason") == want and status(kmock))
        msg = cond(st, "WorkspaceSucceeded")["message"]
        if case == "placeholder":
            assert "ACR_REGISTRY_SECRET_HERE' is a placeholder" in msg
            assert "docker-registry ACR_REGISTRY_SECRET_HERE" not in msg  # the API server would refuse that name
            assert not [r for r in kmock if r.resource is not None and r.resource.plural == "secrets"]
        else:
            assert PUSH_SECRET in msg
        assert get_obj(kmock, JOBS, "default", NAME) is None
        ev = await eventually(lambda: [e for e in events_of(kmock) if e["reason"] == want])
        assert ev[0]["type"] == "Warning"


async def test_the_weights_image_pull_secret_must_exist_before_the_job(kmock, kubeconfig):
    """presetOptions.imagePullSecrets are mounted into the download step: a missing one would leave the pod in
    ContainerCreating (FailedMount), so the operator waits for it and says so, then creates the Job."""
    async with running_operator(SETTINGS):
        await push_secret()
        d = quick_start()
        d["tuning"]["preset"]["presetOptions"] = {"image": "mirror.example.com/kaito/phi3:0.2.0",
                                                  "imagePullSecrets": ["weights-pull"]}
        await apply(d)
        st = await eventually(lambda: cond(status(kmock), "WorkspaceSucceeded").get("reason") == "SecretNotFound"
                              and status(kmock))
        assert "tuning.preset.presetOptions.imagePullSecrets[0]: secret 'weights-pull' does not exist" in \
            cond(st, "WorkspaceSucceeded")["message"]
        assert get_obj(kmock, JOBS, "default", NAME) is None
        await push_secret("weights-pull")
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME), 15)
        vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert [x["secret"]["name"] for x in vols["pull-secrets"]["projected"]["sources"]] == ["weights-pull"]


@pytest.mark.parametrize("end", ["Succeeded", "Failed"])
async def test_status_is_replaced_per_revision(kmock, kubeconfig, end):
    """After an update, nothing of the previous run's status remains (output, digest, finishedAt, failure)."""
    async with running_operator(SETTINGS):
        await push_secret()
        await apply_quick_start()
        job = await eventually(lambda: job_of(kmock))
        pod = PodSim(job)
        if end == "Succeeded":
            pod.succeed(json.dumps({"image": "r/a:1", "digest": "sha256:" + "b" * 64}))
        else:
            pod.run_through("tuner").finish("tuner", 65, "DatasetInvalid: tuning.input.urls[0]: empty file")
        await publish(pod, job=job)
        old = await eventually(lambda: status(kmock).get("state") == end and status(kmock))
        assert old["tuning"]["finishedAt"]
        d = quick_start()
        d["tuning"]["input"]["urls"] = ["https://example.com/data/other.parquet"]
        await apply(d)
        new = await eventually(lambda: status(kmock).get("tuning", {}).get("revision") == 2 and status(kmock))
        await eventually(lambda: (j := job_of(kmock)) and j["metadata"]["uid"] != job["metadata"]["uid"])
        new = status(kmock)
        assert new["state"] == "Pending"
        for stale in ("output", "finishedAt", "failure", "progress", "startedAt", "note"):
            assert stale not in new["tuning"], f"tuning.{stale} of revision 1 is still in status: {new['tuning']}"
        for c in new["conditions"]:
            assert c["reason"] not in ("Succeeded", "DatasetInvalid"), c


async def test_a_job_the_workspace_does_not_own_is_never_touched(kmock, kubeconfig):
    import asyncio

    foreign = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": NAME, "namespace": "default", "labels": {manifests.LABEL_WORKSPACE: NAME},
                            "annotations": {manifests.ANNOTATION_SPEC_HASH: "someone-elses"}},
               "spec": {"template": {"spec": {"restartPolicy": "Never",
                                              "containers": [{"name": "x", "image": "busybox"}]}}}}
    await asyncio.to_thread(batch().create_namespaced_job, "default", foreign)
    uid = job_of(kmock)["metadata"]["uid"]
    async with running_operator(SETTINGS):
        await push_secret()
        await apply_quick_start()
        st = await eventually(lambda: cond(status(kmock), "WorkspaceSucceeded").get("reason") == "JobConflict"
                              and status(kmock))
        assert "not owned by this workspace" in cond(st, "WorkspaceSucceeded")["message"]
    assert job_of(kmock)["metadata"]["uid"] == uid  # not deleted, not replaced
    assert not [r for r in kmock if r.resource is not None and r.resource.plural == "jobs"
                and r.action.name in ("DELETE", "UPDATE")]


async def test_a_failing_handler_leaves_a_condition_and_an_event(kmock, kubeconfig, monkeypatch):
    from kaito_tuning.controller import reconciler

    def broken(*a, **k):
        raise RuntimeError("presets unreadable: https://h/p?token=SECRET")

    monkeypatch.setattr(reconciler, "validate_workspace", broken)
    async with running_operator(SETTINGS):
        await apply_quick_start()
        st = await eventually(lambda: cond(status(kmock), "WorkspaceSucceeded").get("reason") == "OperatorError"
                              and status(kmock))
        msg = cond(st, "WorkspaceSucceeded")["message"]
        assert "presets unreadable" in msg and "SECRET" not in msg
        ev = await eventually(lambda: [e for e in events_of(kmock) if e["reason"] == "OperatorError"])
        assert ev[0]["type"] == "Warning" and "SECRET" not in ev[0]["message"]


async def test_job_deleted_by_hand_is_recreated(kmock, kubeconfig):
    async with running_operator(SETTINGS):
        await push_secret()
        await apply_quick_start()
        job1 = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        await kubectl("delete", "job", NAME)
        job2 = await eventually(lambda: (j := get_obj(kmock, JOBS, "default", NAME)) and
                                j["metadata"]["uid"] != job1["metadata"]["uid"] and j)
        assert job2["metadata"]["annotations"][manifests.ANNOTATION_REVISION] == "1"
        await eventually(lambda: "recreated" in status(kmock).get("tuning", {}).get("note", ""))


async def test_deleting_the_workspace_removes_its_job(kmock, kubeconfig):
    async with running_operator(SETTINGS):
        await push_secret()
        await apply_quick_start()
        await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        await kubectl("delete", "workspace", NAME)
        await eventually(lambda: get_obj(kmock, JOBS, "default", NAME) is None)


async def test_nodeclaim_provisioned_waited_for_and_released(kmock, kubeconfig):
    import asyncio

    settings = Settings(retry_delay_seconds=0.5, node_auto_provisioning=True)
    async with running_operator(settings):
        await push_secret()
        await apply_quick_start()
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
        await publish(PodSim(job).succeed('{"image": "x/y:1", "digest": "sha256:00"}'), job=job)
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


async def test_the_inference_weights_pull_secret_must_exist_before_the_deployment(kmock, kubeconfig):
    """presetOptions.imagePullSecrets are mounted into the server when it pulls a weights image: waited for."""
    d = yaml.safe_load(open("examples/inference/kaito_workspace_phi_3_with_adapters.yaml"))
    name = d["metadata"]["name"]
    d["inference"]["preset"]["presetOptions"] = {"image": "mirror.example.com/kaito/phi3:0.2.0",
                                                 "imagePullSecrets": ["weights-pull"]}
    async with running_operator(SETTINGS):
        await push_secret("myregistry-pull")
        await apply(d)
        st = await eventually(lambda: (c := cond(status(kmock, name), "InferenceReady")).get("reason") ==
                              "SecretNotFound" and c)
        assert "inference.preset.presetOptions.imagePullSecrets[0]: secret 'weights-pull'" in st["message"]
        assert get_obj(kmock, "apps/v1/deployments", "default", name) is None
        await push_secret("weights-pull")
        dep = await eventually(lambda: get_obj(kmock, "apps/v1/deployments", "default", name), 15)
        assert "--weights-image" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


async def set_deployment_ready(name):
    import asyncio

    await asyncio.to_thread(kubernetes.client.AppsV1Api().patch_namespaced_deployment_status, name, "default",
                            {"status": {"readyReplicas": 1, "replicas": 1, "observedGeneration": 99}})


async def test_two_node_run_gets_indexed_job_headless_service_nodeclaims_and_worker_nodes(kmock, kubeconfig):
    import asyncio

    settings = Settings(retry_delay_seconds=0.5, node_auto_provisioning=True)
    d = quick_start()
    d["resource"].update(count=2, instanceType="Standard_NC96ads_A100_v4")
    async with running_operator(settings):
        await push_secret()
        await apply(d)
        claims = await eventually(lambda: len(list_objs(kmock, "karpenter.sh/v1/nodeclaims")) == 2 and
                                  list_objs(kmock, "karpenter.sh/v1/nodeclaims"))
        assert get_obj(kmock, JOBS, "default", NAME) is None  # the gang waits for every node
        for c in claims:
            await asyncio.to_thread(
                kubernetes.client.CustomObjectsApi().patch_cluster_custom_object_status, "karpenter.sh", "v1",
                "nodeclaims", c["metadata"]["name"], {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        job = await eventually(lambda: get_obj(kmock, JOBS, "default", NAME), 15)
        svc = get_obj(kmock, "v1/services", "default", NAME)
        secret = get_obj(kmock, "v1/secrets", "default", f"{NAME}-workspace")
        for obj in (job, svc, secret):
            assert obj["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
        clean = copy.deepcopy(job)
        kubernetes_validate.validate(clean, "1.33.0", strict=True)
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
        assert svc["spec"]["clusterIP"] == "None" and job["spec"]["template"]["spec"]["subdomain"] == NAME
        n0 = PodSim(job, index=0, node="gpu-a").run_through("tuner")
        n1 = PodSim(job, index=1, node="gpu-b").run_through("tuner")
        await publish(n0, n1, job=job)
        await publish(n1, n0, job=job)
        st = await eventually(lambda: status(kmock).get("workerNodes") == ["gpu-a", "gpu-b"] and status(kmock))
        assert st["targetNodeCount"] == 2 and st["state"] == "Running"
        assert st["tuning"]["parallelism"].startswith("ddp: ")
        n1.finish("tuner", 65, "DatasetInvalid: tuning.input.urls[0]: empty file")
        await publish(n1, n0, job=job)
        st = await eventually(lambda: status(kmock).get("state") == "Failed" and status(kmock))
        assert st["tuning"]["failure"]["rank"] == 1 and st["tuning"]["failure"]["node"] == "gpu-b"
        await eventually(lambda: not list_objs(kmock, "karpenter.sh/v1/nodeclaims"))  # both released


async def test_second_workspace_pushing_to_the_same_image_is_held(kmock, kubeconfig):
    async with running_operator(SETTINGS):
        await push_secret()
        await apply_quick_start()
        await eventually(lambda: get_obj(kmock, JOBS, "default", NAME))
        other = quick_start()
        other["metadata"]["name"] = "copycat"
        await apply(other)
        st = await eventually(lambda: cond(status(kmock, "copycat"), "WorkspaceSucceeded").get("reason") ==
                              "OutputImageConflict" and status(kmock, "copycat"))
        assert f"default/{NAME}" in cond(st, "WorkspaceSucceeded")["message"]
        assert get_obj(kmock, JOBS, "default", "copycat") is None
        other["tuning"]["output"]["image"] = "registry.example.com/adapters/copycat:1"
        await apply(other)
        await eventually(lambda: get_obj(kmock, JOBS, "default", "copycat"))
