"""operator/: valid manifests, one `kubectl apply -k`, generated files current, RBAC = what the code uses."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kaito_tuning import cli
from kaito_tuning.controller.settings import Settings, env_name, from_env
from kaito_tuning.spec.training_config import configmap_manifest

OP = Path(__file__).resolve().parents[2] / "operator"
K8S_VERSIONS = ("1.33.0", "1.37.0")  # an older AKS default and the newest schema bundled


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((OP / name).read_text()) if d]


@pytest.mark.parametrize("name", ["deployment.yaml", "rbac.yaml", "service.yaml", "cert-manager/webhook.yaml",
                                  "default-configmaps.yaml"])
def test_operator_manifests_are_valid(name):
    for d in docs(name):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)


def test_kustomization_renders_crd_and_operator_without_cert_manager():
    out = subprocess.run(["kubectl", "kustomize", str(OP)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    for k in ("CustomResourceDefinition", "Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount",
              "Service", "ConfigMap", "Namespace"):
        assert k in kinds
    # no cert-manager kinds (a cluster without it refused the whole apply); the operator manages the webhook
    assert not {"Issuer", "Certificate", "ValidatingWebhookConfiguration"} & set(kinds)
    env = {e["name"]: e.get("value") for e in _container()["env"]}
    assert env["KAITO_WEBHOOK_CONFIGURATION"] and env["KAITO_WEBHOOK_SERVICE"] == "kaito-tuning/kaito-tuning-webhook"
    assert "KAITO_WEBHOOK_CERT_DIR" not in env
    svc = next(d for d in docs("service.yaml") if d["kind"] == "Service")
    assert f"{svc['metadata']['namespace']}/{svc['metadata']['name']}" == env["KAITO_WEBHOOK_SERVICE"]


def test_cert_manager_component_is_optional_and_complete(tmp_path):
    """``components: [cert-manager]`` adds the Issuer/Certificate, the declared webhook and the mounted cert."""
    rel = Path(os.path.relpath(OP, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{rel}]\ncomponents: [{rel / 'cert-manager'}]\n")
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {"Issuer", "Certificate", "ValidatingWebhookConfiguration"} <= {d["kind"] for d in rendered}
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(dep, version, strict=True)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    settings = from_env({k: v for k, v in env.items() if v is not None})
    assert settings.webhook_configuration is None and settings.webhook_cert_dir == "/etc/kaito-tuning/tls"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == settings.webhook_cert_dir)
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cert = next(d for d in rendered if d["kind"] == "Certificate")
    assert vol["secret"]["secretName"] == cert["spec"]["secretName"]


def _container() -> dict:
    dep = next(d for d in docs("deployment.yaml") if d["kind"] == "Deployment")
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_deployment_command_is_the_clis_real_options():
    """The image's ENTRYPOINT + the Deployment's args parse with the real argparse; every env is a setting."""
    c = _container()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", (OP / "Dockerfile").read_text(), re.M)
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", (OP / "Dockerfile").read_text(), re.M)
    argv = [*yaml.safe_load(entry.group(1)), *c.get("args", [])]
    assert argv[0] == "kaito-tuning" and "command" not in c  # the image's entry point runs
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "operator" and args.standalone is True
    assert cli.COMMANDS["operator"][0] == "kaito_tuning.controller.handlers"
    assert yaml.safe_load(cmd.group(1)) == c["args"]  # `docker run` of the image does what the Deployment does
    # the liveness endpoint kopf serves is the one the probes ask
    live = urllib.parse.urlsplit(args.liveness)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == live.path
        assert ports[c[probe]["httpGet"]["port"]] == live.port
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= known, f"not a setting: {set(env) - known}"
    settings = from_env(env)
    assert ports["webhook"] == settings.webhook_port
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_generated_files_are_current():
    assert docs("default-configmaps.yaml") == [configmap_manifest(m, "kaito-tuning") for m in ("lora", "qlora")]


def test_operator_pod_is_restricted():
    dep = next(d for d in docs("deployment.yaml") if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True


# ------------------------------------------------------------------ RBAC = the API calls in the code

#: kubernetes client method → (apiGroup, resource, verb)
_CALLS = {
    "read_namespaced_config_map": ("", "configmaps", "get"), "create_namespaced_config_map": ("", "configmaps", "create"),
    "read_namespaced_secret": ("", "secrets", "get"), "list_namespaced_pod": ("", "pods", "list"),
    "create_namespaced_persistent_volume_claim": ("", "persistentvolumeclaims", "create"),
    "create_namespaced_service": ("", "services", "create"), "read_namespaced_service": ("", "services", "get"),
    "create_namespaced_network_policy": ("networking.k8s.io", "networkpolicies", "create"),
    "read_namespaced_network_policy": ("networking.k8s.io", "networkpolicies", "get"),
    "create_namespaced_secret": ("", "secrets", "create"), "patch_namespaced_secret": ("", "secrets", "patch"),
    "list_cluster_custom_object": ("kaito.sh", "workspaces", "list"),
    "read_namespaced_job": ("batch", "jobs", "get"), "create_namespaced_job": ("batch", "jobs", "create"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "read_namespaced_deployment": ("apps", "deployments", "get"),
    "create_namespaced_deployment": ("apps", "deployments", "create"),
    "patch_namespaced_deployment": ("apps", "deployments", "patch"),
    "get_namespaced_custom_object": ("kaito.sh", "workspaces", "get"),
    "patch_namespaced_custom_object_status": ("kaito.sh", "workspaces/status", "patch"),
    "get_cluster_custom_object": ("karpenter.sh", "nodeclaims", "get"),
    "create_cluster_custom_object": ("karpenter.sh", "nodeclaims", "create"),
    "delete_cluster_custom_object": ("karpenter.sh", "nodeclaims", "delete"),
}
#: what kopf itself needs: watching what has handlers, patching workspaces (annotations, finalizer), events,
#: the managed ValidatingWebhookConfiguration (created once, then patched), and update on workspaces/finalizers
#: for children whose ownerReference sets blockOwnerDeletion (kopf.adopt does; OwnerReferencesPermissionEnforcement)
_KOPF = {("kaito.sh", "workspaces", v) for v in ("list", "watch", "patch")} | {
    ("kaito.sh", "workspaces/finalizers", "update"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "create"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch"),
    ("batch", "jobs", "list"), ("batch", "jobs", "watch"), ("", "pods", "watch"),
    ("apps", "deployments", "list"), ("apps", "deployments", "watch"), ("", "events", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
    ("", "namespaces", "list"), ("", "namespaces", "watch"), ("", "pods", "get")}


def used_calls() -> set[str]:
    root = Path(__file__).resolve().parents[2] / "kaito_tuning" / "controller"
    names = set()
    for f in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and re.match(r"^(read|create|delete|patch|list|get|replace)_", node.attr):
                receiver = node.value
                # self.core.x / self.batch.x / ... or kubernetes.client.CoreV1Api().x
                if isinstance(receiver, ast.Call) or (isinstance(receiver, ast.Attribute) and
                                                      receiver.attr in ("core", "batch", "apps", "custom", "networking")):
                    names.add(node.attr)
    return names


def test_rbac_covers_exactly_what_the_code_uses():
    calls = used_calls()
    unknown = calls - set(_CALLS)
    assert not unknown, f"add these client calls to the test's table (and RBAC): {unknown}"
    from kaito_tuning.controller.reconciler import CREATED_KINDS

    needed = {_CALLS[c] for c in calls} | _KOPF | {(g, r, "create") for g, r in CREATED_KINDS.values()}
    role = next(d for d in docs("rbac.yaml") if d["kind"] == "ClusterRole")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert needed - granted == set(), "missing from operator/rbac.yaml"
    assert granted - needed == set(), "granted but unused: remove from operator/rbac.yaml"


def test_rbac_webhook_patch_only_the_managed_configuration():
    role = next(d for d in docs("rbac.yaml") if d["kind"] == "ClusterRole")
    rule = next(r for r in role["rules"] if "validatingwebhookconfigurations" in r["resources"] and "patch" in r["verbs"])
    env = {e["name"]: e.get("value") for e in _container()["env"]}
    assert rule["resourceNames"] == [env["KAITO_WEBHOOK_CONFIGURATION"]]


def test_blocked_owner_deletion_is_what_needs_the_finalizers_grant():
    """kopf.adopt sets blockOwnerDeletion: the reason for update on workspaces/finalizers."""
    import kopf

    child = {"metadata": {}}
    kopf.adopt(child, owner={"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace",
                             "metadata": {"name": "w", "namespace": "n", "uid": "u"}})
    assert child["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
