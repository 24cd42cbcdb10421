"""operator/: valid manifests, one `kubectl apply -k`, generated files current, RBAC = what the code uses."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kaito_tuning.spec.training_config import configmap_manifest

OP = Path(__file__).resolve().parents[2] / "operator"
K8S_VERSIONS = ("1.33.0", "1.37.0")  # an older AKS default and the newest schema bundled


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((OP / name).read_text()) if d]


@pytest.mark.parametrize("name", ["deployment.yaml", "rbac.yaml", "service.yaml", "webhook.yaml", "default-configmaps.yaml"])
def test_operator_manifests_are_valid(name):
    for d in docs(name):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)


def test_kustomization_renders_crd_and_operator():
    out = subprocess.run(["kubectl", "kustomize", str(OP)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    for k in ("CustomResourceDefinition", "Deployment", "ClusterRole", "ClusterRoleBinding", "ServiceAccount",
              "ValidatingWebhookConfiguration", "Service", "ConfigMap", "Namespace"):
        assert k in kinds


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
    "create_namespaced_service": ("", "services", "create"),
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
#: what kopf itself needs: watching what has handlers, patching workspaces (annotations, finalizer), events
_KOPF = {("kaito.sh", "workspaces", v) for v in ("list", "watch", "patch")} | {
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
                                                      receiver.attr in ("core", "batch", "apps", "custom")):
                    names.add(node.attr)
    return names


def test_rbac_covers_exactly_what_the_code_uses():
    calls = used_calls()
    unknown = calls - set(_CALLS)
    assert not unknown, f"add these client calls to the test's table (and RBAC): {unknown}"
    needed = {_CALLS[c] for c in calls} | _KOPF
    role = next(d for d in docs("rbac.yaml") if d["kind"] == "ClusterRole")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert needed - granted == set(), "missing from operator/rbac.yaml"
    assert granted - needed == set(), "granted but unused: remove from operator/rbac.yaml"
