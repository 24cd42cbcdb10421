"""Manifests from pure functions: valid for Kubernetes 1.33 (strict) and true to the Job contract."""

from __future__ import annotations

import glob
import json

import kubernetes_validate
import pytest
import yaml

from kaito_tuning import cli
from kaito_tuning.controller import inference, manifests, render
from kaito_tuning.controller.settings import Settings
from kaito_tuning.spec.files import load_documents, split_documents
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import load_config

K8S_VERSIONS = ("1.33.0", "1.37.0")  # an older AKS default and the newest schema bundled
EXAMPLES = sorted(glob.glob("examples/*/*.yaml"))


def workspace(path: str, namespace: str = "team-a"):
    ws_docs, cms, _ = split_documents(load_documents(path))
    obj = ws_docs[0]
    obj["metadata"]["namespace"] = namespace
    ws = load_workspace(obj)
    cfg = None
    if ws.tuning and ws.tuning.config and ws.tuning.config in cms:
        cfg = load_config(cms[ws.tuning.config]["data"]["training_config.yaml"], ws.tuning.method)
    return ws, cfg


@pytest.mark.parametrize("path", EXAMPLES)
@pytest.mark.parametrize("settings", [Settings(), Settings(checkpoint_storage=True, checkpoint_storage_class="fast",
                                                           node_auto_provisioning=True)])
def test_every_manifest_is_valid(path, settings):
    ws, cfg = workspace(path)
    objs = render.render(ws, settings, cfg)
    assert objs
    for obj in objs:
        if obj["kind"] == "NodeClaim":  # a CRD: no schema in kubernetes-validate
            assert obj["spec"]["requirements"][0]["values"] == [ws.resource.instance_type]
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def _pod(job):
    return job["spec"]["template"]["spec"]


def _all(pod):
    return pod.get("initContainers", []) + pod["containers"]


def test_quick_start_job_follows_the_contract():
    ws, _ = workspace("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml")
    job = manifests.tuning_job(ws, Settings(job_backoff_limit=2, job_active_deadline_seconds=3600),
                               load_config(None, "qlora"), revision=3)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    spec, pod = job["spec"], _pod(job)
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 3600
    rules = spec["podFailurePolicy"]["rules"]
    # first match wins: a disruption (killed with 137 too) is retried before any exit code is judged
    assert rules[0]["action"] == "Ignore" and rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert rules[1] == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [65, 66]}}
    # a kubelet OOM-kill of the tuner exits 137 and is not retried (it would be killed again)
    assert rules[2] == {"action": "FailJob", "onExitCodes": {"containerName": "tuner", "operator": "In",
                                                              "values": [137]}}
    assert job["metadata"]["labels"]["kaito.sh/workspace"] == "workspace-tuning-phi-3"
    assert job["metadata"]["annotations"]["workspace.kaito.io/revision"] == "3"
    assert [c["name"] for c in pod["initContainers"]] == ["download", "tuner"]
    assert [c["name"] for c in pod["containers"]] == ["push"]
    secret = manifests.workspace_secret(ws)
    assert json.loads(secret["stringData"]["workspace.json"])["tuning"]["method"] == "qlora"
    for c in _all(pod):
        env = {e["name"]: e for e in c["env"]}
        # the workspace (dataset URLs may be signed) comes from its Secret, never inline in the Job
        assert env["KAITO_WORKSPACE"] == {"name": "KAITO_WORKSPACE", "valueFrom": {"secretKeyRef": {
            "name": secret["metadata"]["name"], "key": "workspace.json"}}}
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    tuner = pod["initContainers"][1]
    assert tuner["resources"]["limits"]["nvidia.com/gpu"] == "1"  # Standard_NC6s_v3: one V100
    assert tuner["ports"][0]["containerPort"] == 5000
    mounts = {m["mountPath"]: m for m in tuner["volumeMounts"]}
    assert mounts["/mnt/config"]["readOnly"] and "/dev/shm" in mounts and "/mnt/results" in mounts
    push_mounts = [m["name"] for m in pod["containers"][0]["volumeMounts"]]
    assert "push-secret" in push_mounts
    assert all("push-secret" not in [m["name"] for m in c["volumeMounts"]] for c in pod["initContainers"])
    assert pod["securityContext"]["runAsNonRoot"] and pod["restartPolicy"] == "Never"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [{"key": "app", "operator": "In", "values": ["tuning-phi-3"]}]


def test_gpus_affinity_and_pull_secrets_only_in_download():
    obj = yaml.safe_load(open("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"))
    obj["resource"]["instanceType"] = "Standard_NC24s_v3"  # 4 GPUs
    obj["resource"]["labelSelector"]["matchExpressions"] = [{"key": "zone", "operator": "NotIn", "values": ["z1"]},
                                                           {"key": "gpu", "operator": "Exists"}]
    obj["tuning"]["input"] = {"image": "registry.example.com/data:1", "imagePullSecrets": ["data-pull"]}
    ws = load_workspace(obj)
    job = manifests.tuning_job(ws, Settings(), load_config(None, "qlora"))
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    pod = _pod(job)
    tuner = next(c for c in _all(pod) if c["name"] == "tuner")
    assert tuner["resources"]["requests"]["nvidia.com/gpu"] == "4" == tuner["resources"]["limits"]["nvidia.com/gpu"]
    exprs = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "zone", "operator": "NotIn", "values": ["z1"]} in exprs and {"key": "gpu", "operator": "Exists"} in exprs
    for c in _all(pod):
        has = any(m["name"] == "pull-secrets" for m in c["volumeMounts"])
        assert has == (c["name"] == "download"), c["name"]


def test_volume_output_has_no_push_step_and_tuner_is_main():
    ws, _ = workspace("examples/fine-tuning/kaito_workspace_tuning_phi_3_with_pvc_volume.yaml")
    job = manifests.tuning_job(ws, Settings(), load_config(None, "lora"))
    pod = _pod(job)
    # the download step makes the base weights local even when the data is a volume (mounted read-only there)
    assert [c["name"] for c in pod["containers"]] == ["tuner"] and [c["name"] for c in pod["initContainers"]] == [
        "download"]
    assert {m["mountPath"]: m.get("readOnly", False) for m in pod["initContainers"][0]["volumeMounts"]}["/mnt/data"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "dolly-dataset"
    assert vols["results"]["persistentVolumeClaim"]["claimName"] == "phi-3-adapter"


def test_spec_change_changes_the_hash():
    ws, _ = workspace("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml")
    h = manifests.spec_hash(ws)
    ws.tuning.input.urls = ["https://example.com/x.parquet"]
    assert manifests.spec_hash(ws) != h


def test_inference_deployment_pulls_adapters_and_serves():
    ws, _ = workspace("examples/inference/kaito_workspace_phi_3_with_adapters.yaml")
    dep = inference.inference_deployment(ws, Settings(tuner_image="t:1"))
    pod = dep["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["args"] == ["pull", "myregistry.azurecr.io/adapters/phi-3-dolly:0.0.1", "/mnt/adapter/dolly",
                            "--auth-file", "/mnt/pull-secrets"]
    server = pod["containers"][0]
    assert server["args"] == ["serve", "--preset", "phi-3-mini-128k-instruct", "--adapter", "/mnt/adapter/dolly=1.0",
                              "--host", "0.0.0.0", "--port", "5000"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert all(m["name"] != "pull-dolly" for m in server["volumeMounts"])  # pull secret only in the puller
    svc = inference.inference_service(ws)
    assert svc["spec"]["ports"][0]["port"] == 80


def test_inference_server_pulls_the_base_weights_from_the_weights_image():
    """presetOptions.image on an inference workspace: the server pulls it into the cache volume at start (as the
    tuning Job's download step does), with presetOptions.imagePullSecrets; else the preset registry's artifact."""
    obj = yaml.safe_load(open("examples/inference/kaito_workspace_phi_3_with_adapters.yaml"))
    obj["inference"]["preset"]["presetOptions"] = {"image": "mirror.example/kaito/phi3-weights:0.2.0",
                                                   "imagePullSecrets": ["mirror-pull"]}
    obj["metadata"]["namespace"] = "team-a"
    ws = load_workspace(obj)
    dep = inference.inference_deployment(ws, Settings(tuner_image="t:1"))
    kubernetes_validate.validate(dep, "1.33.0", strict=True)
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    args = server["args"]
    assert args[args.index("--weights-image") + 1] == "mirror.example/kaito/phi3-weights:0.2.0"
    assert args[args.index("--auth-file") + 1] == "/mnt/pull-secrets"
    assert {"name": "KAITO_WEIGHTS_DIR", "value": "/mnt/hf-cache/weights"} in server["env"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert [x["secret"]["name"] for x in vols["pull-weights"]["projected"]["sources"]] == ["mirror-pull"]
    assert {"name": "pull-weights", "mountPath": "/mnt/pull-secrets", "readOnly": True} in server["volumeMounts"]

    del obj["inference"]["preset"]["presetOptions"]
    plain = inference.inference_deployment(load_workspace(obj), Settings(tuner_image="t:1"))
    assert "--weights-image" not in plain["spec"]["template"]["spec"]["containers"][0]["args"]
    mirrored = inference.inference_deployment(load_workspace(obj), Settings(tuner_image="t:1",
                                                                            preset_registry="mcr.microsoft.com/aks/kaito"))
    args = mirrored["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--weights-image") + 1] == "mcr.microsoft.com/aks/kaito/kaito-phi-3-mini-128k-instruct:0.2.0"
    assert "--auth-file" not in args


def test_a_bad_inference_weights_image_names_its_field(tmp_path, capsys):
    obj = yaml.safe_load(open("examples/inference/kaito_workspace_phi_3_with_adapters.yaml"))
    obj["inference"]["preset"]["presetOptions"] = {"image": "Bad Name:1"}
    f = tmp_path / "ws.yaml"
    f.write_text(yaml.safe_dump(obj))
    assert cli.main(["validate", str(f)]) == 1  # validate: 1 = problems found
    assert "inference.preset.presetOptions.image: image reference 'Bad Name:1' contains white space" in \
        capsys.readouterr().out


def test_render_cli(capsys):
    rc = cli.main(["render", "examples/fine-tuning/kaito_workspace_tuning_phi_3_with_configmap.yaml", "-n", "ml"])
    assert rc == 0
    out = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    job = next(d for d in out if d["kind"] == "Job")
    assert job["metadata"]["namespace"] == "ml"
    assert {v["name"]: v for v in _pod(job)["volumes"]}["config"]["configMap"]["name"] == "phi-3-qlora-params"


def test_render_cli_bad_file(tmp_path, capsys):
    p = tmp_path / "x.yaml"
    p.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    assert cli.main(["render", str(p)]) == 65
    assert "holds no Workspace" in capsys.readouterr().err


# ------------------------------------------------------------------ every GPU of the node (issue 10.3 / 12.1)

def _tuning_ws(instance_type: str, *, method: str = "qlora", preset: str = "phi-3-mini-128k-instruct", count: int = 1,
               name: str = "workspace-tuning-phi-3"):
    obj = yaml.safe_load(open("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"))
    obj["metadata"].update(name=name, namespace="team-a")
    obj["resource"]["instanceType"] = instance_type
    obj["resource"]["count"] = count
    obj["tuning"]["method"] = method
    obj["tuning"]["preset"]["name"] = preset
    obj["tuning"]["output"]["imagePushSecret"] = "acr-push"
    return load_workspace(obj)


@pytest.mark.parametrize("instance_type, gpus", [("Standard_NC12s_v3", 2), ("Standard_NC96ads_A100_v4", 4),
                                                 ("Standard_ND96amsr_A100_v4", 8), ("Standard_NC6s_v3", 1)])
def test_one_training_process_per_gpu(instance_type, gpus):
    from kaito_tuning.spec.instances import get_instance_type

    assert get_instance_type(instance_type).gpu_count == gpus
    ws = _tuning_ws(instance_type)
    job = manifests.tuning_job(ws, Settings(), load_config(None, "qlora"))
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    tuner = next(c for c in _all(_pod(job)) if c["name"] == "tuner")
    assert tuner["args"] == ["job", "train", "--nproc-per-node", str(gpus)]
    assert tuner["resources"]["limits"]["nvidia.com/gpu"] == str(gpus) == tuner["resources"]["requests"]["nvidia.com/gpu"]
    # the args are the tuner's real options: torchrun gets one process per GPU
    from kaito_tuning.tuner.distributed import Topology, torchrun_argv

    args = cli.build_parser().parse_args(["job", *tuner["args"][1:]])
    assert args.step == "train" and args.nproc_per_node == gpus and args.nnodes == 1
    argv = torchrun_argv(Topology(nproc_per_node=args.nproc_per_node), ["job", "train"])
    assert f"--nproc-per-node={gpus}" in argv


# ------------------------------------------------------------------ several nodes (issue 12.2)

def test_two_nodes_render_an_indexed_job_and_a_headless_service():
    ws = _tuning_ws("Standard_NC96ads_A100_v4", count=2, name="phi-gang")
    settings = Settings(node_auto_provisioning=True, job_backoff_limit=2)
    objs = render.render(ws, settings)
    for obj in objs:
        if obj["kind"] != "NodeClaim":
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    claims = [o for o in objs if o["kind"] == "NodeClaim"]
    assert len({c["metadata"]["name"] for c in claims}) == 2  # one node per rank group
    job = next(o for o in objs if o["kind"] == "Job")
    svc = next(o for o in objs if o["kind"] == "Service")
    spec, pod = job["spec"], _pod(job)
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimitPerIndex"] == 2 and spec["maxFailedIndexes"] == 0 and "backoffLimit" not in spec
    assert spec["podFailurePolicy"]["rules"] == manifests.POD_FAILURE_RULES
    # pod i is <job>-i.<service>: the service is headless, selects the Job's pods, ready or not
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    tuner = next(c for c in _all(pod) if c["name"] == "tuner")
    endpoint = f"phi-gang-0.{svc['metadata']['name']}.team-a.svc:29500"
    assert tuner["args"] == ["job", "train", "--nproc-per-node", "4", "--nnodes", "2", "--node-rank",
                             "$(JOB_COMPLETION_INDEX)", "--rdzv-endpoint", endpoint, "--rdzv-id", "phi-gang"]
    for c in _all(pod):
        # $(JOB_COMPLETION_INDEX) is expanded by Kubernetes from the container's own env (no shell)
        env = {e["name"]: e for e in c["env"]}
        assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        assert c.get("command") == ["kaito-tuning"]
    # the tuner's CLI reads what Kubernetes makes of the args on pod 1
    from kaito_tuning.tuner.distributed import Topology, torchrun_argv

    expanded = [a.replace("$(JOB_COMPLETION_INDEX)", "1") for a in tuner["args"]]
    a = cli.build_parser().parse_args(expanded)
    topo = Topology(nproc_per_node=a.nproc_per_node, nnodes=a.nnodes, node_rank=a.node_rank,
                    rdzv_endpoint=a.rdzv_endpoint, rdzv_id=a.rdzv_id)
    argv = torchrun_argv(topo, ["job", "train"])
    assert {"--nnodes=2", "--node-rank=1", f"--rdzv-endpoint={endpoint}", "--rdzv-backend=c10d"} <= set(argv)
    assert topo.world_size == 8
    # the push step is on every pod and told its index (node 0 alone pushes)
    push = pod["containers"][0]
    assert push["name"] == "push" and push["args"] == ["job", "push", "--node-rank", "$(JOB_COMPLETION_INDEX)"]
    assert cli.build_parser().parse_args(["job", "push", "--node-rank", "1"]).node_rank == 1
    # every node downloads its own inputs and weights (no shared volume assumed)
    assert [c["name"] for c in pod["initContainers"]] == ["download", "tuner"]


def test_two_nodes_with_checkpoint_storage_share_one_rwx_volume_in_per_node_directories():
    ws = _tuning_ws("Standard_NC24ads_A100_v4", count=2)
    objs = render.render(ws, Settings(checkpoint_storage=True))
    pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    job = next(o for o in objs if o["kind"] == "Job")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    for c in _all(_pod(job)):
        for m in c["volumeMounts"]:
            if m["name"] == "results":
                assert m["subPathExpr"] == "node-$(JOB_COMPLETION_INDEX)"
    single = manifests.checkpoint_pvc(_tuning_ws("Standard_NC24ads_A100_v4"), Settings(checkpoint_storage=True))
    assert single["spec"]["accessModes"] == ["ReadWriteOnce"]


# ------------------------------------------------------------------ models larger than one GPU (issue 12.3)

@pytest.mark.parametrize("instance_type, preset, method, mode", [
    ("Standard_NC24ads_A100_v4", "qwen2.5-coder-32b-instruct", "lora", "ddp"),     # 76 GiB fits one 80 GiB A100
    ("Standard_ND96asr_v4", "qwen2.5-coder-32b-instruct", "lora", "fsdp"),         # 8 x 40 GiB
    ("Standard_NC12s_v3", "phi-3-mini-128k-instruct", "qlora", "ddp"),
    ("Standard_NC12s_v3", "phi-3-medium-128k-instruct", "qlora", "fsdp"),          # 18 GiB > 16, fits 2 x 16
])
def test_parallelism_is_chosen_shown_and_passed_to_the_tuner(instance_type, preset, method, mode, capsys, tmp_path):
    ws = _tuning_ws(instance_type, preset=preset, method=method)
    job = manifests.tuning_job(ws, Settings(), load_config(None, method))
    shown = job["metadata"]["annotations"]["kaito.sh/parallelism"]
    assert shown.startswith(f"{mode}: ")
    tuner = next(c for c in _all(_pod(job)) if c["name"] == "tuner")
    assert {e["name"]: e.get("value") for e in tuner["env"]}["KAITO_PARALLELISM"] == mode
    if mode == "fsdp":
        assert "GiB per GPU" in shown and "sharded over" in shown
    # `kaito-tuning render` prints it
    obj = yaml.safe_load(open("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"))
    obj["resource"]["instanceType"] = instance_type
    obj["tuning"].update(method=method, preset={"name": preset})
    f = tmp_path / "ws.yaml"
    f.write_text(yaml.safe_dump(obj))
    assert cli.main(["render", str(f)]) == 0
    rendered = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert next(d for d in rendered if d["kind"] == "Job")["metadata"]["annotations"]["kaito.sh/parallelism"] == shown


# ------------------------------------------------------------------ the download step (issue 10.1, lead's wiring)

def test_download_step_prefetches_weights_and_sees_the_output_read_only():
    obj = yaml.safe_load(open("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"))
    obj["metadata"]["namespace"] = "team-a"
    obj["apiVersion"] = "kaito.sh/v1beta1"
    obj["tuning"]["preset"]["presetOptions"] = {"modelAccessSecret": "hf-token"}
    ws = load_workspace(obj)
    cfg = load_config("training_config:\n  QuantizationConfig: {load_in_4bit: true}\n  TrainingArguments:\n"
                      "    output_dir: /mnt/out\n", "qlora")
    job = manifests.tuning_job(ws, Settings(checkpoint_storage=True), cfg)
    download = _pod(job)["initContainers"][0]
    assert download["name"] == "download"
    env = {e["name"]: e for e in download["env"]}
    assert env["KAITO_PREFETCH_WEIGHTS"]["value"] == "1"
    assert env["HF_HOME"]["value"] == "/mnt/hf-cache"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"  # gated weights
    mounts = {m["name"]: m for m in download["volumeMounts"]}
    assert mounts["hf-cache"]["mountPath"] == "/mnt/hf-cache" and not mounts["hf-cache"].get("readOnly")
    assert mounts["results"] == {"name": "results", "mountPath": "/mnt/out", "readOnly": True}
    tuner = _pod(job)["initContainers"][1]
    assert {m["name"]: m["mountPath"] for m in tuner["volumeMounts"]}["hf-cache"] == "/mnt/hf-cache"


def test_tuning_pods_get_an_egress_policy_without_private_ranges():
    import kubernetes_validate

    from kaito_tuning.controller.manifests import PRIVATE_CIDRS, egress_policy
    from kaito_tuning.controller.settings import Settings
    from kaito_tuning.spec.rules import load_workspace

    ws = load_workspace(yaml.safe_load(open("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml")))
    policy = egress_policy(ws, Settings())
    kubernetes_validate.validate(policy, "1.33.0", strict=True)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"kaito.sh/workspace": ws.name}}
    public = policy["spec"]["egress"][1]["to"][0]["ipBlock"]
    assert public["cidr"] == "0.0.0.0/0" and {"169.254.0.0/16", "100.64.0.0/10", "10.0.0.0/8"} <= set(public["except"])
    assert set(PRIVATE_CIDRS) == set(public["except"])
    assert egress_policy(ws, Settings(deny_private_urls=False)) is None  # the admin allows in-cluster servers


@pytest.mark.parametrize("path", sorted(glob.glob("examples/**/*.yaml", recursive=True)))
def test_every_scratch_volume_has_a_size_limit(path):
    from kaito_tuning.controller.render import render
    from kaito_tuning.controller.settings import Settings
    from kaito_tuning.spec.rules import load_workspace

    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") != "Workspace":
            continue
        for obj in render(load_workspace(doc), Settings()):
            spec = obj.get("spec", {}).get("template", {}).get("spec", {})
            for v in spec.get("volumes", []):
                if "emptyDir" in v:
                    assert v["emptyDir"].get("sizeLimit"), f"{obj['kind']} volume {v['name']} has no sizeLimit"
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                if c["name"] in ("download", "push"):
                    assert c["resources"]["limits"]["memory"], c["name"]


# ------------------------------------------------------------------ base weights from an image (issue 10)

def _weights_ws(preset_options: dict | None, input_secrets: list[str] | None = None):
    obj = yaml.safe_load(open("examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"))
    obj["metadata"]["namespace"] = "team-a"
    if preset_options is not None:
        obj["tuning"]["preset"]["presetOptions"] = preset_options
    if input_secrets is not None:
        obj["tuning"]["input"] = {"image": "registry.example/data:1", "imagePullSecrets": input_secrets}
    return load_workspace(obj)


def _env(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize("options,registry,expected", [
    ({"image": "airgap.example/models/phi3:1", "imagePullSecrets": ["weights-cred"]}, None,
     "airgap.example/models/phi3:1"),
    ({"image": "airgap.example/models/phi3:1"}, "mcr.microsoft.com/aks/kaito", "airgap.example/models/phi3:1"),
    (None, "mcr.microsoft.com/aks/kaito/", "mcr.microsoft.com/aks/kaito/kaito-phi-3-mini-128k-instruct:0.2.0"),
    (None, None, None),
])
def test_weights_image_reaches_download_and_tuner(options, registry, expected, tmp_path, capsys, monkeypatch):
    ws = _weights_ws(options, input_secrets=["data-cred", "weights-cred"])
    settings = Settings(preset_registry=registry)
    job = manifests.tuning_job(ws, settings, load_config(None, "qlora"))
    pod = _pod(job)
    download, tuner = pod["initContainers"][0], pod["initContainers"][1]
    for c in (download, tuner):
        assert _env(c).get("KAITO_WEIGHTS_IMAGE") == expected
        assert _env(c).get("KAITO_WEIGHTS_DIR") == ("/mnt/hf-cache/weights" if expected else None)
    projected = next(v for v in pod["volumes"] if v["name"] == "pull-secrets")["projected"]["sources"]
    names = [s["secret"]["name"] for s in projected]
    # the preset's pull secrets join the input image's (once each), only when weights come from an image
    assert names == (["data-cred", "weights-cred"])
    assert "pull-secrets" not in {m["name"] for m in tuner["volumeMounts"]}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    # `kaito-tuning render` shows it (the operator's setting read from its environment)
    f = tmp_path / "ws.yaml"
    f.write_text(yaml.safe_dump(ws.to_dict()))
    if registry:
        monkeypatch.setenv("KAITO_PRESET_REGISTRY", registry)
    assert cli.main(["render", str(f)]) == 0
    rendered = next(d for d in yaml.safe_load_all(capsys.readouterr().out) if d and d["kind"] == "Job")
    assert _env(_pod(rendered)["initContainers"][0]).get("KAITO_WEIGHTS_IMAGE") == expected


def test_preset_pull_secrets_alone_are_projected_for_the_weights_image():
    ws = _weights_ws({"image": "airgap.example/models/phi3:1", "imagePullSecrets": ["weights-cred"]})
    pod = _pod(manifests.tuning_job(ws, Settings(), load_config(None, "qlora")))
    download = pod["initContainers"][0]
    assert _env(download)["KAITO_PULL_SECRETS_DIR"] == "/mnt/pull-secrets"
    sources = next(v for v in pod["volumes"] if v["name"] == "pull-secrets")["projected"]["sources"]
    assert sources == [{"secret": {"name": "weights-cred", "items": [{"key": ".dockerconfigjson",
                                                                      "path": "weights-cred.json"}]}}]
    # without a weights image they are not needed, and not projected
    pod = _pod(manifests.tuning_job(_weights_ws({"imagePullSecrets": ["weights-cred"]}), Settings(),
                                    load_config(None, "qlora")))
    assert "pull-secrets" not in {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize("value,ok", [("mcr.microsoft.com/aks/kaito", True), ("127.0.0.1:5000", True),
                                      ("ghcr.io/kaito-project/kaito/", True), ("kaito", False),
                                      ("https://mcr.microsoft.com", False), ("a b.io", False)])
def test_preset_registry_setting_must_be_a_registry(value, ok):
    from kaito_tuning.controller.settings import from_env
    from kaito_tuning.errors import UserError

    if ok:
        assert from_env({"KAITO_PRESET_REGISTRY": value}).preset_registry == value
    else:
        with pytest.raises(UserError, match="KAITO_PRESET_REGISTRY.*registry host"):
            from_env({"KAITO_PRESET_REGISTRY": value})
