"""The CRD is generated from the API dataclasses, is a valid apiextensions.k8s.io/v1 object, and
every example validates against its schema."""

import dataclasses
import typing
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kaito_tuning.spec import workspace as api
from kaito_tuning.spec.crd import crd_manifest, crd_yaml
from kaito_tuning.spec.schema import json_name

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds/kaito.sh_workspaces.yaml"
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def test_crd_file_is_current():
    assert CRD_FILE.read_text() == crd_yaml(), "run: kaito-tuning crd > crds/kaito.sh_workspaces.yaml"


@pytest.mark.parametrize("version", ["1.33.0", "1.37.0"])
def test_crd_is_a_valid_apiextensions_v1_object(version):
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), version, strict=True)


def test_crd_basics():
    spec = crd_manifest()["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"]) == ("kaito.sh", "Workspace", "workspaces")
    assert spec["names"]["shortNames"] == ["wk", "wks"] and spec["scope"] == "Namespaced"
    versions = {v["name"]: v for v in spec["versions"]}
    assert versions["v1alpha1"]["served"] and not versions["v1alpha1"]["storage"]
    assert versions["v1beta1"]["served"] and versions["v1beta1"]["storage"]
    for v in versions.values():
        assert v["subresources"] == {"status": {}}
    cols = lambda v: [c["name"] for c in versions[v]["additionalPrinterColumns"]]  # noqa: E731
    assert cols("v1alpha1") == ["Instance", "ResourceReady", "InferenceReady", "JobStarted", "WorkspaceSucceeded", "Age"]
    assert cols("v1beta1") == ["Instance", "ResourceReady", "InferenceReady", "JobStarted", "WorkspaceSucceeded",
                               "TargetNodeCount", "State", "Age"]


def _walk(schema, path=""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from _walk(schema["items"], path + "[]")


@pytest.mark.parametrize("version", api.VERSIONS)
def test_every_field_has_a_description(version):
    schema = api.crd_schema(version)
    missing = [p for p, s in _walk(schema) if p and not p.endswith("[]") and p != "metadata" and not s.get("description")]
    assert missing == []


def _dataclass_paths(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{json_name(f)}" if prefix else json_name(f)
        yield path
        tp = hints[f.name]
        inner = tp
        if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if typing.get_origin(inner) is list:
            inner = typing.get_args(inner)[0]
            path += "[]"
        inner = f.metadata.get("schema_type") or inner
        if typing.get_origin(inner) is dict and dataclasses.is_dataclass(typing.get_args(inner)[1]):
            continue  # a map of objects: the schema puts those under additionalProperties
        if dataclasses.is_dataclass(inner) and not f.metadata.get("schemaless"):
            yield from _dataclass_paths(inner, path)


def test_schema_and_model_agree_field_by_field():
    schema_paths = {p for p, _ in _walk(api.crd_schema("v1beta1")) if p and not p.endswith("[]")}
    model_paths = set(_dataclass_paths(api.Workspace))
    assert schema_paths == model_paths


def test_tuning_rules_the_schema_can_say():
    tuning = api.crd_schema("v1beta1")["properties"]["tuning"]
    assert set(tuning["required"]) == {"preset", "method", "input", "output"}
    rules = [r["rule"] for r in tuning["properties"]["output"]["x-kubernetes-validations"]]
    assert "!has(self.image) || has(self.imagePushSecret)" in rules
    assert tuning["properties"]["input"]["x-kubernetes-validations"]
    assert api.crd_schema("v1beta1")["x-kubernetes-validations"][0]["rule"] == "has(self.tuning) != has(self.inference)"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_against_the_crd_schema(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "Workspace":
            version = doc["apiVersion"].split("/")[1]
            jsonschema.validate(doc, api.crd_schema(version))


def test_schema_rejects_a_wrong_type():
    doc = yaml.safe_load((ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text())
    doc["resource"]["count"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, api.crd_schema("v1alpha1"))


# Field paths of Kaito's Workspace CRD (charts/kaito/workspace/templates/kaito.sh_workspaces.yaml, v0.12.0)
_COMMON = """apiVersion kind metadata resource resource.count resource.instanceType resource.labelSelector
resource.labelSelector.matchExpressions resource.labelSelector.matchExpressions[].key
resource.labelSelector.matchExpressions[].operator resource.labelSelector.matchExpressions[].values
resource.labelSelector.matchLabels resource.preferredNodes inference inference.adapters inference.adapters[].source
inference.adapters[].source.image inference.adapters[].source.imagePullSecrets inference.adapters[].source.name
inference.adapters[].source.urls inference.adapters[].source.volumeSource inference.adapters[].strength
inference.config inference.preset inference.preset.accessMode inference.preset.name inference.preset.presetOptions
inference.preset.presetOptions.image inference.preset.presetOptions.imagePullSecrets inference.template
tuning tuning.config tuning.input tuning.input.image tuning.input.imagePullSecrets tuning.input.name tuning.input.urls
tuning.input.volumeSource tuning.method tuning.output tuning.output.image tuning.output.imagePushSecret
tuning.output.volumeSource tuning.preset tuning.preset.accessMode tuning.preset.name tuning.preset.presetOptions
tuning.preset.presetOptions.image tuning.preset.presetOptions.imagePullSecrets status status.conditions
status.conditions[].lastTransitionTime status.conditions[].message status.conditions[].observedGeneration
status.conditions[].reason status.conditions[].status status.conditions[].type status.workerNodes""".split()
KAITO_FIELDS = {
    "v1alpha1": set(_COMMON),
    "v1beta1": set(_COMMON) | {"inference.preset.presetOptions.modelAccessSecret", "resource.partition",
                               "resource.partition.count", "resource.partition.mode", "resource.partition.profile",
                               "status.performance", "status.performance.metrics", "status.state",
                               "status.targetNodeCount", "tuning.preset.presetOptions.modelAccessSecret"},
}
V1BETA1_ONLY = {"resource.partition", "tuning.preset.presetOptions.modelAccessSecret",
                "inference.preset.presetOptions.modelAccessSecret"}


@pytest.mark.parametrize("version", api.VERSIONS)
def test_crd_carries_every_field_of_kaitos_crd(version):
    ours = {p for p, _ in _walk(api.crd_schema(version)) if p}
    assert KAITO_FIELDS[version] - ours == set()
    if version == "v1alpha1":
        assert not any(p.startswith(tuple(V1BETA1_ONLY)) for p in ours)


def test_kaito_defaults_and_types():
    for version in api.VERSIONS:
        props = api.crd_schema(version)["properties"]
        assert props["tuning"]["properties"]["preset"]["properties"]["accessMode"]["default"] == "public"
        assert props["inference"]["properties"]["template"]["x-kubernetes-preserve-unknown-fields"] is True
        cond = props["status"]["properties"]["conditions"]["items"]
        assert set(cond["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    part = api.crd_schema("v1beta1")["properties"]["resource"]["properties"]["partition"]
    assert part["required"] == ["mode"] and part["properties"]["mode"]["enum"] == ["mig", "accelerator"]


def _prune(obj, schema):
    """What an API server keeps of ``obj`` under a structural ``schema`` (unknown fields dropped)."""
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return obj
        if "additionalProperties" in schema:
            return {k: _prune(v, schema["additionalProperties"]) for k, v in obj.items()}
        props = schema.get("properties", {})
        return {k: _prune(v, props[k]) for k, v in obj.items() if k in props}
    if isinstance(obj, list):
        return [_prune(v, schema.get("items", {})) for v in obj]
    return obj


def _statuses():
    from kaito_tuning.controller import status as st

    job = {"metadata": {"name": "ws"}, "spec": {"backoffLimit": 2},
           "status": {"startTime": "2026-01-01T00:00:00Z", "failed": 1,
                      "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                      "lastTransitionTime": "2026-01-01T01:00:00Z"}]}}
    pod = {"metadata": {"name": "ws-1", "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"nodeName": "n"},
           "status": {"phase": "Failed", "containerStatuses": [
               {"name": "train", "state": {"terminated": {"exitCode": 66, "reason": "OOMKilled"}}}]}}
    yield st.tuning_status(None, generation=3, job=job, pods=[pod], revision=2, progress={"step": 5, "loss": 1.5},
                           now="2026-01-01T02:00:00Z")
    done = {"metadata": {"name": "ws"}, "status": {"conditions": [{"type": "Complete", "status": "True"}],
                                                   "completionTime": "2026-01-01T03:00:00Z"}}
    yield st.tuning_status(None, generation=1, job=done, pods=[], revision=1, provisioning=True, now="2026-01-01T02:00:00Z")
    yield st.inference_status(None, generation=1, deployment=None, pods=[], now="2026-01-01T02:00:00Z")


@pytest.mark.parametrize("version", api.VERSIONS)
def test_status_the_operator_writes_survives_the_typed_schema(version):
    schema = api.crd_schema(version)["properties"]["status"]
    for status in _statuses():
        status = {**status, "workerNodes": ["node-1"], "tuning": {**status.get("tuning", {}), "note": "kept"}}
        assert _prune(status, schema) == status
        jsonschema.validate(status, schema)
