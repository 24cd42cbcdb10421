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
