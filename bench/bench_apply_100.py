"""Apply N tuning workspaces (kubectl apply, one multi-document file) against kmock with the operator
running; measure the time until N Jobs exist and every one passes kubernetes-validate --strict.

    .venv/bin/python bench/bench_apply_100.py [N]
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


async def main(n: int) -> float:
    import kubernetes
    import kubernetes_validate
    import yaml
    from fixtures_k8s import Emulator, kubectl, list_objs, running_operator
    from kmock._internal import apps

    from kaito_tuning.settings import Settings

    async with Emulator() as km, apps.Server(km):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "kubeconfig"
            cfg.write_text(f"apiVersion: v1\nkind: Config\nclusters: [{{name: k, cluster: {{server: '{km.url}'}}}}]\n"
                           "users: [{name: k, user: {token: t}}]\ncontexts: [{name: k, context: {cluster: k, user: k, "
                           "namespace: default}}]\ncurrent-context: k\n")
            os.environ["KUBECONFIG"] = str(cfg)
            kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(cfg)
            kubernetes.config.load_kube_config(config_file=str(cfg))
            await asyncio.to_thread(kubernetes.client.CoreV1Api().create_namespaced_secret, "default", {
                "metadata": {"name": "ACR_REGISTRY_SECRET_HERE"}, "type": "kubernetes.io/dockerconfigjson",
                "data": {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}})
            base = yaml.safe_load((ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text())
            docs = []
            for i in range(n):
                base["metadata"]["name"] = f"bench-{i:03d}"
                docs.append(yaml.safe_dump(base))
            async with running_operator(Settings()):
                t0 = time.perf_counter()
                await kubectl("apply", "-f", "-", input="---\n".join(docs), timeout=600)
                while len(list_objs(km, "batch/v1/jobs")) < n:
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - t0
            jobs = list_objs(km, "batch/v1/jobs")
            for j in jobs:
                kubernetes_validate.validate(j, "1.33.0", strict=True)
            assert len(jobs) == n
            return elapsed


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    secs = asyncio.run(main(n))
    print(f"{n} workspaces -> {n} valid Jobs in {secs:.1f} s")
