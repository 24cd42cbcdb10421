"""The operator as ``operator/deployment.yaml`` starts it: the real entry point in its own process.

The container's command is the image's ENTRYPOINT (``kaito-tuning operator``, from
``operator/Dockerfile``) with the Deployment's ``args`` and ``env`` read from the file, not copied.
Only what a pod has and a test machine does not is adapted: paths of mounted volumes (the webhook
certificate) point at a temporary directory and ports are free ones on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import kubernetes
import pytest
import yaml
from fixtures_k8s import Emulator, eventually, get_obj, kubectl

pytestmark = [pytest.mark.kmock(cls=Emulator), pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
NAME = "workspace-tuning-phi-3"


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


def self_signed_cert(directory: Path) -> None:
    directory.mkdir(parents=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
                   check=True, capture_output=True)


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
    for path, local in mounts.items():
        if "tls" in path:
            self_signed_cert(local)
    return argv, env


async def test_operator_starts_as_deployed_and_creates_the_job(kmock, kubeconfig, tmp_path):
    argv, env = deployed_command(tmp_path)
    await asyncio.to_thread(kubernetes.client.CoreV1Api().create_namespaced_secret, "default", {
        "metadata": {"name": "ACR_REGISTRY_SECRET_HERE"}, "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}})
    log = tmp_path / "operator.log"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
                                                    stdout=out, stderr=subprocess.STDOUT)
    try:
        await asyncio.sleep(3)  # kopf's namespace observer failed within a second with namespaces=None
        assert proc.returncode is None, f"{shlex.join(argv)} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        await kubectl("apply", "-f", str(QUICK))
        job = await eventually(lambda: get_obj(kmock, "batch/v1/jobs", "default", NAME), timeout=60)
        assert job["metadata"]["ownerReferences"][0]["name"] == NAME
        assert proc.returncode is None, log.read_text()[-3000:]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
