"""Apply N tuning workspaces (one ``kubectl apply`` of a multi-document file) against the test
emulator (kmock + tests/fixtures_k8s.Emulator) and time it twice, each against a fresh emulator:

* apply only: no operator running (the cost of kubectl and the emulator alone);
* with the operator: the shipped ``kaito-tuning operator`` with the Deployment's args, in its own process,
  until N Jobs exist; its RSS is sampled every second; then every Job is checked with
  ``kubernetes_validate.validate(job, '1.33.0', strict=True)`` (not timed).

The emulator serves from its own process (as an API server would); the operator's time is what is
measured, plus the emulator's answers. It also prints the API requests the run made, by verb and resource.

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
import shutil
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
        self.pid = self._proc.pid
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
        # one output image per workspace: two workspaces pushing to one image are refused (OutputImageConflict)
        base["tuning"]["output"]["image"] = f"registry.example.com/bench/adapter-{i:03d}:0.0.1"
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children (kubectl)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.asynccontextmanager
async def operator_process(tmp: str):
    """The shipped operator: ``kaito-tuning operator`` with the Deployment's args, its own process (its RSS is
    the operator's alone). Yields the process once kopf has started (its liveness endpoint answers)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tmp) / "operator.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(Path(sys.executable).parent / "kaito-tuning"), "operator", "--standalone",
                             "--liveness", f"http://127.0.0.1:{port}/healthz"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (Path(tmp) / "operator.log").read_text()[-2000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            assert time.monotonic() < deadline, "the operator did not start within 60 s"
            await asyncio.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if os.environ.get("BENCH_OPERATOR_LOG"):  # keep the operator's log for a look
            shutil.copy(Path(tmp) / "operator.log", os.environ["BENCH_OPERATOR_LOG"])


async def with_operator(n: int, latency: float) -> dict:
    """The apply with the operator running, until N Jobs exist: seconds in all, when kubectl returned, when the
    last Job appeared, the operator's RSS over time, the API requests made."""
    import kubernetes_validate
    from fixtures_k8s import kubectl

    with EmulatorProcess(latency) as emu, tempfile.TemporaryDirectory() as tmp:
        _use_cluster(emu.url, tmp)
        docs = _documents(n)
        async with operator_process(tmp) as proc:
            rss = [(0.0, _rss_mib(proc.pid))]
            cpu0, emu_cpu0 = _cpu_seconds(proc.pid), _cpu_seconds(emu.pid)
            kubectl_cpu0 = _children_cpu_seconds()
            t0 = time.perf_counter()
            apply = asyncio.create_task(kubectl("apply", "-f", "-", input=docs, timeout=1200))
            applied = None
            count, last_change, seen = 0, t0, 0
            while count < n:
                await asyncio.sleep(0.05)
                now = time.perf_counter()
                if applied is None and apply.done():
                    await apply
                    applied = now - t0
                count = await asyncio.to_thread(emu.ask, "count_jobs")
                if count != seen:
                    seen, last_change = count, now
                if now - rss[-1][0] - t0 >= 1.0:
                    rss.append((now - t0, _rss_mib(proc.pid)))
                assert now - last_change < 120, f"stuck at {count} of {n} Jobs for 120 s"
            elapsed = time.perf_counter() - t0
            if applied is None:
                await apply
                applied = time.perf_counter() - t0
            kubectl_cpu = _children_cpu_seconds() - kubectl_cpu0  # kubectl has exited and been waited for
            cpu, emu_cpu = _cpu_seconds(proc.pid) - cpu0, _cpu_seconds(emu.pid) - emu_cpu0
            await asyncio.sleep(2)  # settled: status writes after the last Job
            rss.append((time.perf_counter() - t0, _rss_mib(proc.pid)))
        jobs = emu.ask("jobs")
        assert len(jobs) == n, f"{len(jobs)} jobs for {n} workspaces"
        for job in jobs:
            kubernetes_validate.validate(job, "1.33.0", strict=True)
        return {"seconds": elapsed, "applied": applied, "rss": rss, "requests": emu.ask("requests"), "cpu": cpu,
                "emulator_cpu": emu_cpu, "kubectl_cpu": kubectl_cpu}


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
        r = asyncio.run(with_operator(args.n, latency))
        full.append(r["seconds"])
        requests = r["requests"]
        total = sum(requests.values())
        print(f"run {run + 1}: {args.n} workspaces -> {args.n} valid Jobs in {r['seconds']:.2f} s; kubectl apply "
              f"returned after {r['applied']:.2f} s, the last Job {r['seconds'] - r['applied']:+.2f} s after it; "
              f"{total} API requests ({total / args.n:.1f} per workspace, kubectl's included); operator CPU "
              f"{r['cpu']:.1f} s ({1000 * r['cpu'] / args.n:.0f} ms per workspace); CPU of the emulator "
              f"{r['emulator_cpu']:.1f} s, of kubectl {r['kubectl_cpu']:.1f} s", flush=True)
        curve = r["rss"]
        step = max(1, len(curve) // 12)
        print("  operator RSS MiB over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in curve[::step] + curve[-1:])
              + f"; peak {max(m for _, m in curve):.0f} MiB", flush=True)
    print("requests of the last run:", ", ".join(f"{k}: {v}" for k, v in requests.most_common()))
    for label, xs in (("apply only", base), ("with operator", full)):
        if xs:
            print(f"{label}: median {statistics.median(xs):.2f} s, range {min(xs):.2f}-{max(xs):.2f} s ({len(xs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
