"""Property-based fuzzing (hypothesis) of the ConfigMap parser, the Workspace parser and the YAML reader:
whatever the input, they answer with problems (or their own error type), bounded in size; they never raise
anything else. Examples are few and derandomized so the file runs in seconds and the same way every time."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaito_tuning.errors import Problem
from kaito_tuning.spec.files import FileError, load_documents
from kaito_tuning.spec.rules import validate_workspace
from kaito_tuning.spec.training_config import SECTIONS, parse_config
from kaito_tuning.spec.workspace import parse_workspace

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

WORDS = ["tuning", "inference", "resource", "preset", "name", "method", "input", "output", "urls", "image",
         "volumeSource", "imagePushSecret", "instanceType", "labelSelector", "matchLabels", "count", "metadata",
         "apiVersion", "kind", "adapters", "source", "strength", "hostPath", "persistentVolumeClaim", "claimName",
         "partition", "template", "presetOptions", "modelAccessSecret", "accessMode", "config", "status", "lora",
         "qlora", "kaito.sh/v1beta1", "Workspace", "phi-4", "r", "learning_rate", "load_in_4bit", *SECTIONS]
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.sampled_from(WORDS) | st.binary(max_size=8))
keys = st.sampled_from(WORDS) | st.text(max_size=10) | st.integers() | st.booleans()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=5), max_leaves=25)
mappings = st.dictionaries(keys, values, max_size=8)


def _bounded(problems):
    assert all(isinstance(p, Problem) for p in problems)
    assert len(problems) <= 51
    assert all(len(p.path) <= 200 and len(p.message) <= 300 for p in problems)


@FUZZ
@given(st.text(alphabet=string.printable + "&*!|>-:[]{}'\"#\u00e9\u2028\x00", max_size=300))
def test_parse_config_any_text(text):
    _, problems = parse_config(text)
    _bounded(problems)


@FUZZ
@given(st.dictionaries(st.sampled_from(SECTIONS) | keys, values, max_size=6), st.sampled_from([None, "lora", "qlora"]))
def test_parse_config_any_sections(sections, method):
    try:
        text = yaml.safe_dump({"training_config": sections})
    except yaml.YAMLError:
        return
    _, problems = parse_config(text, method=method)
    _bounded(problems)


@FUZZ
@given(mappings, st.booleans())
def test_parse_workspace_any_mapping(obj, local):
    ws, problems = parse_workspace(obj)
    problems += validate_workspace(ws, local=local)
    _bounded(problems[:51])
    assert all(isinstance(p, Problem) and len(p.message) <= 300 for p in problems)


workspace_like = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["kaito.sh/v1alpha1", "kaito.sh/v1beta1"]) | scalars,
    "kind": st.just("Workspace") | scalars,
    "metadata": st.fixed_dictionaries({"name": st.sampled_from(["ws", "a" * 70]) | scalars}) | values,
    "resource": st.fixed_dictionaries({"instanceType": st.sampled_from(["Standard_NC6s_v3", "g4ad.xlarge"]) | scalars,
                                       "labelSelector": st.just({"matchLabels": {"a": "b"}}) | values,
                                       "partition": values}),
    "tuning": st.fixed_dictionaries({"preset": st.fixed_dictionaries({"name": st.sampled_from(["phi-4"]) | scalars,
                                                                      "presetOptions": values}),
                                     "method": st.sampled_from(["lora", "QLoRA"]) | scalars,
                                     "input": st.fixed_dictionaries({"volumeSource": values, "urls": values}),
                                     "output": st.fixed_dictionaries({"volumeSource": values, "image": scalars})}),
})


@FUZZ
@given(workspace_like)
def test_validate_any_workspace_shaped_mapping(obj):
    ws, problems = parse_workspace(obj)
    problems += validate_workspace(ws)
    assert all(isinstance(p, Problem) and len(p.message) <= 300 for p in problems)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_load_documents_any_bytes(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("fuzz") / "x.yaml"
    f.write_bytes(data)
    try:
        docs = load_documents(f)
    except FileError as e:
        assert len(e.message) <= 300
        return
    assert docs and all(isinstance(d, dict) for d in docs)
