"""Apply N tuning workspaces (one ``kubectl apply`` of a multi-document file) against the test
emulator (kmock + tests/fixtures_k8s.Emulator) and time it twice, each against a fresh emulator:

* apply only: no operator running (the cost of kubectl and the emulator alone);
* with the operator (in-process, as in tests): until N Jobs exist; then every Job is checked
  with ``kubernetes_validate.validate(job, '1.33.0', strict=True)`` (not timed).

The emulator serves from its own process (as an API server would), so it does not share this
process's event loop and GIL with the operator; the operator's time is what is measured, plus
the emulator's answers. It also prints the API requests the run made, by verb and resource.

    .venv/bin/python bench/bench_apply_100.py [N] [--runs R] [--no-baseline] [--latency-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
EXAMPLE = ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"
JOBS = "batch/v1/jobs"
PUSH_SECRET = "acr-push"


# ------------------------------------------------------------------ the emulator's process

def _serve(conn, latency: float) -> None:
    asyncio.run(_serve_async(conn, latency))


async def _serve_async(conn, latency: float) -> None:
    """Serve the emulator; answer the parent's questions over ``conn`` until told to stop."""
    from fixtures_k8s import Emulator, list_objs
    from kmock._internal import apps, references

    class SlowEmulator(Emulator):
        async def _handle(self, request):
            await asyncio.sleep(latency)  # a real API server's round trip (etcd, admission, network)
            return await super()._handle(request)

    jobs = references.resource(JOBS)
    async with (SlowEmulator() if latency else Emulator()) as km, apps.Server(km):
        conn.send(str(km.url))
        loop = asyncio.get_running_loop()
        while (cmd := await loop.run_in_executor(None, conn.recv)) != "stop":
            if cmd == "count_jobs":
                conn.send(sum(1 for (res, _, _), obj in km.objects.items() if res == jobs and not obj.deleted))
            elif cmd == "jobs":
                conn.send(list_objs(km, JOBS))
            elif cmd == "requests":
                conn.send(collections.Counter(
                    f"{r.action.name if r.action else r.method} {r.resource.plural if r.resource else r.url.path}"
                    + (f"/{r.subresource}" if r.subresource else "") for r in km._requests))


class EmulatorProcess:
    """The emulator in a child process; ``ask`` sends a command and returns the answer."""

    def __init__(self, latency: float = 0.0):
        self.latency = latency

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.latency), daemon=True)
        self._proc.start()
        self.url = self._conn.recv()
        return self

    def ask(self, cmd: str):
        self._conn.send(cmd)
        return self._conn.recv()

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


# ------------------------------------------------------------------ one timed apply

def _use_cluster(url: str, tmp: str) -> None:
    import kubernetes

    cfg = Path(tmp) / "kubeconfig"
    cfg.write_text(f"apiVersion: v1\nkind: Config\nclusters: [{{name: k, cluster: {{server: '{url}'}}}}]\n"
                   "users: [{name: k, user: {token: t}}]\ncontexts: [{name: k, context: {cluster: k, user: k, "
                   "namespace: default}}]\ncurrent-context: k\n")
    os.environ["KUBECONFIG"] = str(cfg)
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(cfg)
    kubernetes.config.load_kube_config(config_file=str(cfg))
    kubernetes.client.CoreV1Api().create_namespaced_secret("default", {
        "metadata": {"name": PUSH_SECRET}, "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}})


def _documents(n: int) -> str:
    import yaml

    base = yaml.safe_load(EXAMPLE.read_text())
    base["tuning"]["output"]["imagePushSecret"] = PUSH_SECRET  # the quick start's placeholder is not a name
    docs = []
    for i in range(n):
        base["metadata"]["name"] = f"bench-{i:03d}"
        docs.append(yaml.safe_dump(base))
    return "---\n".join(docs)


async def apply_only(n: int, latency: float) -> float:
    """Seconds for ``kubectl apply`` of N workspaces, no operator."""
    from fixtures_k8s import kubectl

    with EmulatorProcess(latency) as emu, tempfile.TemporaryDirectory() as tmp:
        _use_cluster(emu.url, tmp)
        docs = _documents(n)
        t0 = time.perf_counter()
        await kubectl("apply", "-f", "-", input=docs, timeout=600)
        return time.perf_counter() - t0


async def with_operator(n: int, latency: float) -> tuple[float, float, collections.Counter]:
    """(seconds until N Jobs exist, of which the kubectl apply, requests made) with the operator running."""
    import kubernetes_validate
    from fixtures_k8s import kubectl, running_operator

    from kaito_tuning.controller.settings import Settings

    with EmulatorProcess(latency) as emu, tempfile.TemporaryDirectory() as tmp:
        _use_cluster(emu.url, tmp)
        docs = _documents(n)
        async with running_operator(Settings()):
            t0 = time.perf_counter()
            await kubectl("apply", "-f", "-", input=docs, timeout=600)
            applied = time.perf_counter() - t0
            while await asyncio.to_thread(emu.ask, "count_jobs") < n:
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - t0
        jobs = emu.ask("jobs")
        assert len(jobs) == n, f"{len(jobs)} jobs for {n} workspaces"
        for job in jobs:
            kubernetes_validate.validate(job, "1.33.0", strict=True)
        return elapsed, applied, emu.ask("requests")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", nargs="?", type=int, default=100, help="workspaces (default 100)")
    p.add_argument("--runs", type=int, default=1, help="repetitions; the median and range are printed")
    p.add_argument("--no-baseline", action="store_true", help="skip the apply-only measurement")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="delay the emulator adds to every request, as a real API server's round trip (default 0)")
    args = p.parse_args()
    latency = args.latency_ms / 1000
    base, full = [], []
    for run in range(args.runs):
        if not args.no_baseline:
            base.append(asyncio.run(apply_only(args.n, latency)))
            print(f"run {run + 1}: apply only (no operator): {base[-1]:.2f} s", flush=True)
        secs, applied, requests = asyncio.run(with_operator(args.n, latency))
        full.append(secs)
        print(f"run {run + 1}: {args.n} workspaces -> {args.n} valid Jobs in {secs:.2f} s "
              f"(kubectl apply returned after {applied:.2f} s); {sum(requests.values())} API requests", flush=True)
    print("requests of the last run:", ", ".join(f"{k}: {v}" for k, v in requests.most_common()))
    for label, xs in (("apply only", base), ("with operator", full)):
        if xs:
            print(f"{label}: median {statistics.median(xs):.2f} s, range {min(xs):.2f}-{max(xs):.2f} s ({len(xs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
