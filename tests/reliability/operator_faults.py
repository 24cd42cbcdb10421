"""Helpers of the operator fault tests: the real ``kaito-tuning operator`` as a child process that the
emulator kills (SIGKILL) right after its k-th write, a workspace per namespace, the kubelet moving its pod,
and what "converged" means (one of each owned object, owned; the status an undisturbed run gives).

Each operator process gets its own kubeconfig token, so the emulator tells its writes from the test's
(the kubelet simulation, the user) and from a previous operator's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import kubernetes
import yaml
from fixtures_k8s import Fault, eventually, get_obj, list_objs
from kubelet import PodSim, publish

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
WS = "kaito.sh/v1beta1/workspaces"
JOBS = "batch/v1/jobs"
PUSH_SECRET = "acr-push"
NAME = "ws"
DIGEST = "sha256:" + "d" * 64
PLANTED = "planted-Pa55word-7f3a"  # the push secret's password: must appear in no log line, status or Event
# the resources a tuning workspace's reconcile may create, and the test's own (never the operator's)
OWNED = ("v1/secrets", "v1/services", "v1/persistentvolumeclaims", "networking.k8s.io/v1/networkpolicies", JOBS)
OPERATOR_ENV = {"KAITO_RETRY_DELAY_SECONDS": "0.5", "KAITO_PROGRESS_POLL_SECONDS": "60", "KAITO_LOG_LEVEL": "INFO",
                "KAITO_CHECKPOINT_STORAGE": "true", "KAITO_DENY_PRIVATE_URLS": "true", "KAITO_WEBHOOK_PORT": "0"}


def write_kubeconfig(path: Path, url: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "k",
        "clusters": [{"name": "k", "cluster": {"server": str(url)}}],
        "users": [{"name": "k", "user": {"token": token}}],
        "contexts": [{"name": "k", "context": {"cluster": "k", "user": "k", "namespace": "default"}}]}))
    return path


# A fork server: one child that has imported the operator's modules forks each operator process, which
# then runs the real entry point (``kaito_tuning.cli.main(["operator", ...])``) with its own environment
# and log. The same code path as `kaito-tuning operator`, without paying ~3 s of imports per start.
ZYGOTE = r"""
import importlib, json, os, signal, sys
import kopf, kubernetes
import kaito_tuning.cli, kaito_tuning.controller.handlers, kaito_tuning.controller.admission
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.update(job["env"])
        for target, value in job.get("setattr", {}).items():  # a test seam: module constants (timeouts)
            module, _, attr = target.rpartition(".")
            setattr(importlib.import_module(module), attr, value)
        # read at import by kubernetes.config (stack-notes 7.4): what it would have read in a fresh process
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = job["env"]["KUBECONFIG"]
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
        sys.stdin.close()
        code = 1
        try:
            code = kaito_tuning.cli.main(job["argv"])
        finally:
            os._exit(code or 0)
    print(pid, flush=True)
"""


class Zygote:
    """The fork server (one per test module); ``spawn`` answers within milliseconds."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def spawn(self, argv: list[str], env: dict[str, str], log: Path, setattr: dict | None = None) -> int:
        job = {"argv": argv, "env": env, "log": str(log), "setattr": setattr or {}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie not reaped yet is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


class OperatorProcess:
    """``kaito-tuning operator --standalone`` (cluster-wide: kopf's namespace observer needs a namespace list
    the emulator cannot serve) with its own token; killed, never asked to stop. ``namespace`` is where its
    writes are counted: each case has its own."""

    def __init__(self, zygote: Zygote, kmock, tmp_path: Path, namespace: str, token: str, setattr: dict | None = None):
        self.zygote, self.kmock, self.namespace, self.token = zygote, kmock, namespace, token
        self.setattr = setattr
        self.kubeconfig = write_kubeconfig(tmp_path / f"kubeconfig-{token}", kmock.url, token)
        self.log = tmp_path / f"operator-{token}.log"
        self.pid: int | None = None
        self.killed_at: dict | None = None

    async def start(self) -> OperatorProcess:
        self.pid = self.zygote.spawn(["operator", "--standalone"],
                                           {**OPERATOR_ENV, "KUBECONFIG": str(self.kubeconfig)}, self.log,
                                      self.setattr)
        return self

    def writes(self) -> list[dict]:
        return [w for w in self.kmock.writes if w["token"] == self.token and w["namespace"] == self.namespace]

    async def killed(self, timeout: float = 20) -> dict:
        """Wait for the kill ``kill_after`` arranged; the write it came after."""
        await eventually(lambda: not self.alive, timeout, 0.02)
        assert self.killed_at is not None, f"{self.token} exited without being killed:\n{self.log.read_text()[-2000:]}"
        return self.killed_at

    def kill_after(self, k: int) -> None:
        """SIGKILL this operator as its k-th write is stored, before the answer reaches it; whatever it
        sends afterwards (already on the wire) is refused unserved, as a dead process sends nothing."""
        def hook(write: dict) -> None:
            if write["token"] == self.token and write["namespace"] == self.namespace and len(self.writes()) == k \
                    and self.alive:
                self.killed_at = write
                os.kill(self.pid, signal.SIGKILL)
                self.kmock.faults.insert(0, Fault(lambda r: r.headers.get("Authorization") == f"Bearer {self.token}",
                                                  status=503, reason="ServiceUnavailable", times=10 ** 9))
        self.kmock.after_write = hook

    @property
    def alive(self) -> bool:
        return self.pid is not None and running(self.pid)

    async def kill(self) -> None:
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
        await eventually(lambda: not self.alive, 10, 0.02)

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise AssertionError(f"{self.log.name}: not a JSON log line: {line[:300]}") from None
        return out


@contextlib.asynccontextmanager
async def operator(zygote: Zygote, kmock, tmp_path: Path, namespace: str, token: str, setattr: dict | None = None):
    op = await OperatorProcess(zygote, kmock, tmp_path, namespace, token, setattr).start()
    try:
        yield op
    finally:
        await op.kill()


# ---------------------------------------------------------------- the workspace and its pod

def workspace(namespace: str, name: str = NAME) -> dict:
    d = yaml.safe_load(QUICK.read_text())
    d["metadata"].update(name=name, namespace=namespace)
    d["tuning"]["output"]["imagePushSecret"] = PUSH_SECRET
    d["tuning"]["output"]["image"] = result(namespace)["image"]  # one output per workspace (or they conflict)
    return d


async def create_workspace(namespace: str, name: str = NAME) -> None:
    """The push secret, then the workspace (as a user would, with kubectl; here the client is quicker)."""
    core, custom = kubernetes.client.CoreV1Api(), kubernetes.client.CustomObjectsApi()
    await asyncio.to_thread(core.create_namespaced_secret, namespace, {
        "metadata": {"name": PUSH_SECRET}, "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(json.dumps({"auths": {"registry.example.com": {
            "username": "u", "password": PLANTED}}}).encode()).decode()}})
    await asyncio.to_thread(custom.create_namespaced_custom_object, "kaito.sh", "v1beta1", namespace, "workspaces",
                            workspace(namespace, name))


def result(namespace: str) -> dict:
    """What the push step of ``namespace``'s workspace writes to its termination log."""
    return {"image": f"registry.example.com/adapters/{namespace}:1", "digest": DIGEST}


def status(kmock, namespace: str, name: str = NAME) -> dict:
    return (get_obj(kmock, WS, namespace, name) or {}).get("status") or {}


def cond(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


async def run_pod_to_success(kmock, namespace: str, name: str = NAME, timeout: float = 30) -> dict:
    """The kubelet starts the Job's pod (JobStarted must turn True), then completes it (the push step's
    result in its termination log); returns the workspace's status once Succeeded."""
    job = await eventually(lambda: get_obj(kmock, JOBS, namespace, name), timeout)
    pod = PodSim(job)
    pod.ip = "127.0.0.1"
    await publish(pod.schedule().start("download"), job=job)
    await eventually(lambda: cond(status(kmock, namespace, name), "JobStarted").get("status") == "True", timeout)
    await publish(pod.succeed(json.dumps(result(namespace))), job=job)
    return await eventually(lambda: status(kmock, namespace, name).get("state") == "Succeeded"
                            and status(kmock, namespace, name), timeout)


def objects_in(kmock, namespace: str) -> dict[str, list[dict]]:
    return {res: [o for o in list_objs(kmock, res) if o["metadata"].get("namespace") == namespace] for res in OWNED}


async def quiet(fn, still: float = 1.0, timeout: float = 20) -> int:
    """Wait until ``len(fn())`` has not changed for ``still`` seconds; return it."""
    end = asyncio.get_running_loop().time() + timeout
    n, since = -1, 0.0
    while asyncio.get_running_loop().time() < end:
        if len(fn()) != n:
            n, since = len(fn()), asyncio.get_running_loop().time()
        elif asyncio.get_running_loop().time() - since >= still:
            return n
        await asyncio.sleep(0.05)
    raise AssertionError(f"still changing after {timeout}s: {fn()[-5:]}")


def ownership_problems(kmock, namespace: str, name: str = NAME) -> list[str]:
    """What is wrong with the objects in ``namespace``: any not owned (ownerReference with the workspace's
    uid, and its label) other than the user's push secret."""
    ws = get_obj(kmock, WS, namespace, name)
    uid = ws["metadata"]["uid"] if ws else None
    out = []
    for res, objs in objects_in(kmock, namespace).items():
        for o in objs:
            meta = o["metadata"]
            if res == "v1/secrets" and meta["name"] == PUSH_SECRET:
                continue
            refs = [r.get("uid") for r in meta.get("ownerReferences") or []]
            if refs != [uid] or (meta.get("labels") or {}).get("kaito.sh/workspace") != name:
                out.append(f"{res} {meta['name']}: owners {refs}, labels {meta.get('labels')}")
    return out


def inventory(kmock, namespace: str) -> dict[str, list[str]]:
    return {res: sorted(o["metadata"]["name"] for o in objs) for res, objs in objects_in(kmock, namespace).items()}


def normalized(st: dict, namespace: str) -> dict:
    """A status without what differs between two runs of the same workspace (times, generations, the
    namespace in its output image, the spec's digest: the image is in the spec)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if not k.endswith(("Time", "At", "Timestamp")) and k not in ("observedGeneration", "specHash")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x.replace(namespace, "NS") if isinstance(x, str) else x
    return strip(st)
