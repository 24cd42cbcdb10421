"""The operator as ``operator/deployment.yaml`` starts it: the real entry point in its own process.

The container's command is the image's ENTRYPOINT (``kaito-tuning operator``, from
``operator/Dockerfile``) with the Deployment's ``args`` and ``env`` read from the file, not copied.
Only what a pod has and a test machine does not is adapted: paths of mounted volumes point at a
temporary directory and ports are free ones. Pods move as a kubelet moves them (tests/kubelet.py).
The emulator does not enforce RBAC; tests/controller/test_deploy.py checks operator/rbac.yaml against
every call the code makes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import kubernetes
import pytest
import yaml
from fixtures_k8s import Emulator, eventually, get_obj, kubectl, list_objs
from kubelet import PodSim, publish

pytestmark = [pytest.mark.kmock(cls=Emulator), pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
WS = "kaito.sh/v1beta1/workspaces"
JOBS = "batch/v1/jobs"


def operator_container() -> dict:
    for doc in yaml.safe_load_all((ROOT / "operator/deployment.yaml").read_text()):
        if doc and doc.get("kind") == "Deployment":
            return doc["spec"]["template"]["spec"]["containers"][0]
    raise AssertionError("operator/deployment.yaml has no Deployment")


def image_entrypoint() -> list[str]:
    text = (ROOT / "operator/Dockerfile").read_text()
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert m, "operator/Dockerfile has no exec-form ENTRYPOINT"
    return yaml.safe_load(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployed_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """argv and env of the operator container, adapted to this machine (volumes, ports)."""
    c = operator_container()
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in c.get("volumeMounts", [])}
    ports = {str(p["containerPort"]): str(free_port()) for p in c.get("ports", [])}

    def adapt(value: str) -> str:
        for path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path):]
        for port, local in ports.items():
            value = re.sub(rf"(?<![0-9]){port}(?![0-9])", local, value)
        return value

    entry = image_entrypoint()
    exe = Path(sys.executable).parent / entry[0]
    argv = [str(exe), *entry[1:], *(adapt(a) for a in c.get("command", [])[1:]), *(adapt(a) for a in c.get("args", []))]
    env = {e["name"]: adapt(e["value"]) for e in c.get("env", []) if "value" in e}
    for local in mounts.values():
        local.mkdir(parents=True, exist_ok=True)
    env["_HEALTH_PORT"] = next(ports[str(p["containerPort"])] for p in c["ports"] if p["name"] == "health")
    return argv, env


def quick_start(name: str) -> dict:
    d = yaml.safe_load(QUICK.read_text())
    d["metadata"]["name"] = name
    d["tuning"]["output"]["imagePushSecret"] = "acr-push"  # the quick start's placeholder is not a secret name
    d["tuning"]["output"]["image"] = f"registry.example.com/adapters/{name}:1"  # two runs never share an output
    return d


@contextlib.asynccontextmanager
async def deployed_operator(tmp_path: Path, kubeconfig, **extra_env):
    """``kaito-tuning operator`` as the Deployment runs it; yields (log path, adapted env)."""
    argv, env = deployed_command(tmp_path)
    log = tmp_path / "operator.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, **env, **extra_env, "KUBECONFIG": str(kubeconfig)},
            stdout=out, stderr=subprocess.STDOUT)
    try:
        await asyncio.sleep(3)  # kopf's namespace observer failed within a second with namespaces=None
        assert proc.returncode is None, f"{shlex.join(argv)} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        yield log, env
        assert proc.returncode is None, log.read_text()[-3000:]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def log_lines(log: Path) -> list[dict]:
    """The operator's log: every line must be one JSON object."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line[:300]}") from None
    return out


def status(kmock, name) -> dict:
    return (get_obj(kmock, WS, "default", name) or {}).get("status") or {}


def cond(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def events_of(kmock, name) -> list[dict]:
    return [e for e in list_objs(kmock, "v1/events") if (e.get("involvedObject") or {}).get("name") == name]


async def push_secret():
    await asyncio.to_thread(kubernetes.client.CoreV1Api().create_namespaced_secret, "default", {
        "metadata": {"name": "acr-push"}, "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}})


async def test_operator_as_deployed_runs_a_workspace_to_success_and_one_to_failure(kmock, kubeconfig, tmp_path):
    await push_secret()
    async with deployed_operator(tmp_path, kubeconfig) as (log, env):
        # healthy, and its webhook configuration is managed (no cert-manager): a Service reference + caBundle
        health = f"http://127.0.0.1:{env['_HEALTH_PORT']}/healthz"
        await eventually(lambda: _get_ok(health), timeout=30)
        config = await eventually(lambda: get_obj(kmock, "admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
                                                  None, env["KAITO_WEBHOOK_CONFIGURATION"]), timeout=30)
        hooks = await eventually(lambda: (c := get_obj(
            kmock, "admissionregistration.k8s.io/v1/validatingwebhookconfigurations", None,
            env["KAITO_WEBHOOK_CONFIGURATION"])) and c.get("webhooks"), timeout=30)
        assert config is not None
        client = hooks[0]["clientConfig"]
        ns, svc = env["KAITO_WEBHOOK_SERVICE"].split("/")
        assert client["service"]["name"] == svc and client["service"]["namespace"] == ns
        assert client["service"]["path"].startswith("/validate-") and base64.b64decode(client["caBundle"])

        await kubectl("apply", "-f", "-", input=yaml.safe_dump_all([quick_start("ok"), quick_start("oom")]))
        ok = await eventually(lambda: get_obj(kmock, JOBS, "default", "ok"), timeout=60)
        oom = await eventually(lambda: get_obj(kmock, JOBS, "default", "oom"), timeout=60)
        assert ok["metadata"]["ownerReferences"][0]["name"] == "ok"

        pod = PodSim(ok)
        pod.ip = "127.0.0.1"  # nothing serves /progress there: the poll fails fast and changes nothing
        await publish(pod.schedule().start("download"), job=ok)
        await eventually(lambda: cond(status(kmock, "ok"), "JobStarted").get("status") == "True", timeout=30)
        await publish(pod.finish("download").start("tuner"), job=ok)
        await eventually(lambda: status(kmock, "ok").get("tuning", {}).get("stage") == "training", timeout=30)
        await publish(pod.finish("tuner").start("push"), job=ok)
        await publish(pod.finish("push", 0, json.dumps({"image": "r/ok:1", "digest": "sha256:" + "c" * 64})), job=ok)
        st = await eventually(lambda: status(kmock, "ok").get("state") == "Succeeded" and status(kmock, "ok"), timeout=30)
        assert st["tuning"]["output"] == {"image": "r/ok:1", "digest": "sha256:" + "c" * 64}

        await publish(PodSim(oom).run_through("tuner").oom_kill("tuner"), job=oom)
        st = await eventually(lambda: status(kmock, "oom").get("state") == "Failed" and status(kmock, "oom"), timeout=30)
        assert st["tuning"]["failure"]["reason"] == "OutOfMemory"
        ev = await eventually(lambda: [e for e in events_of(kmock, "oom") if e["reason"] == "OutOfMemory"], timeout=30)
        assert ev[0]["type"] == "Warning"
        await eventually(lambda: [e for e in events_of(kmock, "ok") if "Succeeded" in e["message"]], timeout=30)
        lines = log_lines(log)
        decisions = {(x.get("workspace"), x.get("decision")) for x in lines}
        assert ("default/ok", "create-job") in decisions and ("default/oom", "phase") in decisions
        assert all(x["level"] in ("INFO", "WARNING", "ERROR") for x in lines)  # KAITO_LOG_LEVEL=INFO


async def test_a_failing_handler_leaves_a_condition_an_event_and_a_log_line(kmock, kubeconfig, tmp_path):
    """The image without readable presets (issue 14, item 2): status, Event and log say so; no silence."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "broken.yaml").write_text("name: broken\n")  # no source: the preset loader raises
    await push_secret()
    async with deployed_operator(tmp_path, kubeconfig, KAITO_PRESETS_DIR=str(presets)) as (log, _):
        await kubectl("apply", "-f", "-", input=yaml.safe_dump(quick_start("w")))
        st = await eventually(lambda: cond(status(kmock, "w"), "WorkspaceSucceeded").get("reason") == "OperatorError"
                              and status(kmock, "w"), timeout=60)
        assert st["state"] == "Pending" and "source" in cond(st, "WorkspaceSucceeded")["message"]
        ev = await eventually(lambda: [e for e in events_of(kmock, "w") if e["reason"] == "OperatorError"], timeout=30)
        assert ev[0]["type"] == "Warning"
        failed = await eventually(lambda: [x for x in log_lines(log) if x.get("decision") == "failed"], timeout=30)
        assert failed[0]["workspace"] == "default/w" and failed[0]["level"] == "ERROR"


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
