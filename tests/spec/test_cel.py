"""The CRD's CEL rules (x-kubernetes-validations), evaluated with cel-python as an API server would:
every example passes, and each rule refuses what it is there to refuse."""

import copy
from pathlib import Path

import celpy
import pytest
import yaml

from kaito_tuning.spec import workspace as api

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
ENV = celpy.Environment()


def cel_failures(doc: dict, schema: dict, path: str = "") -> list[str]:
    """Messages of the rules that ``doc`` breaks, walking the schema where the document has values."""
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        ok = ENV.program(ENV.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(doc)})
        if not ok:
            out.append(f"{path}: {rule['message']}")
    for name, sub in schema.get("properties", {}).items():
        if isinstance(doc, dict) and name in doc:
            value = doc[name]
            if sub.get("type") == "array" and isinstance(value, list):
                for i, item in enumerate(value):
                    out += cel_failures(item, sub["items"], f"{path}.{name}[{i}]")
            else:
                out += cel_failures(value, sub, f"{path}.{name}".lstrip("."))
    return out


def workspaces():
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Workspace":
                yield path.name, doc


@pytest.mark.parametrize("name,doc", list(workspaces()), ids=[n for n, _ in workspaces()])
def test_examples_pass_every_rule(name, doc):
    assert cel_failures(doc, api.crd_schema(doc["apiVersion"].split("/")[1])) == []


def quick_start():
    return yaml.safe_load((ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text())


def test_rules_refuse_what_they_should():
    schema = api.crd_schema("v1alpha1")
    both = quick_start()
    both["inference"] = {"preset": {"name": "x"}}
    assert cel_failures(both, schema) == [": exactly one of tuning or inference must be set"]
    two_inputs = quick_start()
    two_inputs["tuning"]["input"]["image"] = "reg.io/data:1"
    assert cel_failures(two_inputs, schema) == ["tuning.input: exactly one of urls, image or volumeSource must be set"]
    no_secret = quick_start()
    del no_secret["tuning"]["output"]["imagePushSecret"]
    assert cel_failures(no_secret, schema) == ["tuning.output: imagePushSecret is required with image"]
    volume_and_secret = copy.deepcopy(quick_start())
    volume_and_secret["tuning"]["output"] = {"volumeSource": {"emptyDir": {}}, "imagePushSecret": "s"}
    assert cel_failures(volume_and_secret, schema) == []  # Kaito accepts a push secret next to a volume
