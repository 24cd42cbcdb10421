"""The bad-input corpus (issues 10 and 11): every case is an input a user or an attacker could send, and the
exact field path and words of the one-line error it must give. Spec (Workspace), ConfigMap text and YAML files."""

import copy
import time
from pathlib import Path

import pytest
import yaml

from kaito_tuning.spec.files import FileError, load_documents, load_yaml
from kaito_tuning.spec.rules import validate_workspace
from kaito_tuning.spec.training_config import parse_config
from kaito_tuning.spec.workspace import parse_workspace

ROOT = Path(__file__).resolve().parents[2]
QUICK = yaml.safe_load((ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text())


def ws(path: str = "", value=..., *, delete=False, version="v1beta1", **extra) -> dict:
    obj = copy.deepcopy(QUICK)
    obj["apiVersion"] = f"kaito.sh/{version}"
    obj.update(extra)
    if path:
        *parents, last = path.split(".")
        node = obj
        for k in parents:
            node = node.setdefault(k, {})
        if delete:
            del node[last]
        else:
            node[last] = value
    return obj


def inference(**fields) -> dict:
    obj = ws()
    del obj["tuning"]
    obj["inference"] = {"preset": {"name": "phi-3-mini-128k-instruct"}, **fields}
    return obj


def cfg(sections) -> str:
    return yaml.safe_dump({"training_config": sections})


BOMB = "training_config:\n  a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"  {c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdef", "bcdefg"))
PVC = {"persistentVolumeClaim": {"claimName": "data"}}

# (id, workspace object, field path, words)
SPEC = [
    ("hostPath input", ws("tuning.input", {"volumeSource": {"hostPath": {"path": "/etc"}}}),
     "tuning.input.volumeSource.hostPath", "volume type is not allowed here; allowed: persistentVolumeClaim"),
    ("secret input", ws("tuning.input", {"volumeSource": {"secret": {"secretName": "s"}}}),
     "tuning.input.volumeSource.secret", "volume type is not allowed here"),
    ("hostPath output", ws("tuning.output", {"volumeSource": {"hostPath": {"path": "/"}}}),
     "tuning.output.volumeSource.hostPath", "volume type is not allowed here"),
    ("configMap output", ws("tuning.output", {"volumeSource": {"configMap": {"name": "c"}}}),
     "tuning.output.volumeSource.configMap", "allowed: persistentVolumeClaim, emptyDir, csi, nfs, azureFile"),
    ("two volume types", ws("tuning.input", {"volumeSource": {**PVC, "emptyDir": {}}}),
     "tuning.input.volumeSource", "must name exactly one volume type"),
    ("empty volumeSource", ws("tuning.output", {"volumeSource": {}, "image": None}),
     "tuning.output", "exactly one of image or volumeSource"),
    ("pvc without claimName", ws("tuning.input", {"volumeSource": {"persistentVolumeClaim": {}}}),
     "tuning.input.volumeSource.persistentVolumeClaim.claimName", "is required"),
    ("adapter from a secret", inference(adapters=[{"source": {"name": "a", "volumeSource": {"secret": {}}}}]),
     "inference.adapters[0].source.volumeSource.secret", "volume type is not allowed here"),
    ("partition on tuning", ws("resource.partition", {"mode": "mig", "profile": "1g.10gb"}),
     "resource.partition", "GPU partitioning is not supported for tuning"),
    ("partition in v1alpha1", ws("resource.partition", {"mode": "mig"}, version="v1alpha1"),
     "resource.partition", "exists only in kaito.sh/v1beta1"),
    ("partition bad mode", ws("resource.partition", {"mode": "slices"}),
     "resource.partition.mode", "must be one of mig, accelerator, got 'slices'"),
    ("modelAccessSecret in v1alpha1", ws("tuning.preset.presetOptions", {"modelAccessSecret": "t"}, version="v1alpha1"),
     "tuning.preset.presetOptions.modelAccessSecret", "exists only in kaito.sh/v1beta1"),
    ("presetOptions typo", ws("tuning.preset.presetOptions", {"modelAccessSecrets": "t"}),
     "tuning.preset.presetOptions.modelAccessSecrets", "unknown field"),
    ("accessMode other", ws("tuning.preset.accessMode", "shared"), "tuning.preset.accessMode",
     "must be one of public, private"),
    ("inference template", inference(template={"spec": {"containers": []}}), "inference.template",
     "custom pod templates are not supported"),
    ("unknown inference preset", inference(preset={"name": "zzzz-unknown"}), "inference.preset.name",
     "inference presets: "),
    ("AMD instance type", ws("resource.instanceType", "g4ad.xlarge"), "resource.instanceType",
     "the tuner runs on NVIDIA GPUs"),
    ("Trainium instance type", ws("resource.instanceType", "trn1.2xlarge"), "resource.instanceType",
     "AWS Trainium accelerators"),
    ("32b lora on a 24 GiB GPU", ws("tuning.preset.name", "qwen2.5-coder-32b-instruct", resource={
        "instanceType": "Standard_NV36ads_A10_v5", "labelSelector": {"matchLabels": {"a": "b"}}},
        tuning={**QUICK["tuning"], "method": "lora", "preset": {"name": "qwen2.5-coder-32b-instruct"}}),
     "resource.instanceType", "needs about 76 GiB"),
    ("name not a string", ws("metadata.name", 12345), "metadata.name", "must be a string, got 12345"),
    ("namespace invalid", ws("metadata.namespace", "Not_OK"), "metadata.namespace", "is not a valid namespace"),
    ("huge name is cut", ws("metadata.name", "x" * 100_000), "metadata.name", "x...x"),
    ("huge int count", ws("resource.count", 10 ** 40), "resource.count", "tuning runs on 1 to 64 nodes"),
    ("count a string", ws("resource.count", "one"), "resource.count", "must be an integer, got a string 'one'"),
    ("huge wrong-typed value is cut", ws("tuning.method", ["x" * 50] * 10_000), "tuning.method",
     "must be a string, got a list ['xxxxx"),
    ("non-string key", ws("tuning.input", {1: "x", "urls": ["https://h/x.parquet"]}), "tuning.input.1",
     "unknown field"),
    ("metadata.name missing", ws("metadata", {}), "metadata.name", "is required"),
]

# (id, ConfigMap text, field path, words)
CONFIG = [
    ("alias bomb", BOMB, "training_config.yaml", "expands (through aliases) to more than 100,000 values"),
    ("5000-digit integer", "training_config:\n  LoraConfig:\n    r: " + "9" * 5000, "training_config.yaml",
     "an integer of 5000 digits; at most 64 are read"),
    ("bad timestamp", "training_config:\n  TrainingArguments:\n    max_steps: 2024-13-45", "TrainingArguments.max_steps",
     "must be an integer, got str '2024-13-45'"),
    ("good timestamp where a number goes", "training_config:\n  LoraConfig:\n    r: 2024-01-01", "LoraConfig.r",
     "must be an integer, got str '2024-01-01'"),
    ("!!int garbage", "training_config:\n  LoraConfig:\n    r: !!int eight", "training_config.yaml",
     "'eight' is not an integer"),
    ("!!float garbage", "training_config:\n  LoraConfig:\n    lora_dropout: !!float x", "training_config.yaml",
     "'x' is not a number"),
    ("recursive alias", "training_config: &a\n  LoraConfig: *a", "training_config.yaml",
     "an alias refers to the node that contains it"),
    ("deep nesting", "training_config: " + "[" * 100 + "]" * 100, "training_config.yaml", "nesting deeper than 64"),
    ("python tag", "training_config: !!python/object/apply:os.system ['id']", "training_config.yaml",
     "could not determine a constructor"),
    ("control character", "training_config:\n  LoraConfig: {r: \x07}", "training_config.yaml",
     "special characters are not allowed"),
    ("epochs -1", cfg({"TrainingArguments": {"num_train_epochs": -1}}), "TrainingArguments.num_train_epochs",
     "must be > 0, got -1"),
    ("learning rate 5", cfg({"TrainingArguments": {"learning_rate": 5}}), "TrainingArguments.learning_rate",
     "must be in (0, 1), got 5"),
    ("dropout 1", cfg({"LoraConfig": {"lora_dropout": 1}}), "LoraConfig.lora_dropout", "must be in [0, 1), got 1"),
    ("r 0", cfg({"LoraConfig": {"r": 0}}), "LoraConfig.r", "must be > 0, got 0"),
    ("max_length 0", cfg({"TrainingArguments": {"max_length": 0}}), "TrainingArguments.max_length",
     "must be > 0, got 0"),
    ("batch size 0", cfg({"TrainingArguments": {"per_device_train_batch_size": 0}}),
     "TrainingArguments.per_device_train_batch_size", "must be > 0, got 0"),
    ("negative workers", cfg({"TrainingArguments": {"dataloader_num_workers": -1}}),
     "TrainingArguments.dataloader_num_workers", "must be >= 0, got -1"),
    ("infinite epochs", "training_config:\n  TrainingArguments:\n    num_train_epochs: -.inf",
     "TrainingArguments.num_train_epochs", "must be > 0, got -inf"),
    ("mlm probability 2", cfg({"DataCollator": {"mlm_probability": 2}}), "DataCollator.mlm_probability",
     "must be in [0, 1], got 2"),
    ("huge key is cut", cfg({"LoraConfig": {"k" * 10_000: 1}}), "LoraConfig." + "k" * 57 + "...", "unknown key"),
    ("huge wrong-typed value is cut", cfg({"LoraConfig": {"r": ["x" * 1000] * 1000}}), "LoraConfig.r",
     "must be an integer, got list ['xxx"),
    ("not text", None, "training_config.yaml", "must be text (YAML)"),
    ("two documents", "training_config: {}\n---\ntraining_config: {}\n", "training_config.yaml",
     "holds 2 YAML documents"),
    ("a section given twice", "training_config:\n  LoraConfig:\n    r: 8\n  LoraConfig:\n    lora_alpha: 16\n",
     "training_config.yaml", "line 4, column 3: key 'LoraConfig' appears twice in one mapping (first at line 2)"),
    ("a hub token", cfg({"TrainingArguments": {"hub_token": "hf_SECRETTOKEN"}}), "TrainingArguments.hub_token",
     "a credential does not belong in a ConfigMap"),
    ("a hub token of the wrong type", cfg({"TrainingArguments": {"hub_token": ["hf_SECRETTOKEN"]}}),
     "TrainingArguments.hub_token", "its value is not shown here"),
    ("push to the hub", cfg({"TrainingArguments": {"push_to_hub": True}}), "TrainingArguments.push_to_hub",
     "is not supported: the tuner has no Hugging Face Hub credentials"),
    ("a key given twice in flow style", "training_config:\n  LoraConfig: {r: 8, r: 16}\n", "training_config.yaml",
     "key 'r' appears twice"),
]

# (id, file content, words of the FileError)
FILES = [
    ("alias bomb file", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n" + BOMB.replace("training_config:", "data:"),
     "expands (through aliases) to more than 100,000 values"),
    ("5000-digit integer in a file", "a: " + "1" * 5000, "an integer of 5000 digits"),
    ("binary bytes", "\x00\x01\x02", "special characters are not allowed"),
    ("scalar document", "just a string", "is a string, not a Kubernetes object"),
    ("tuning given twice", (ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text()
     + "tuning:\n  method: lora\n",
     "key 'tuning' appears twice in one mapping (first at line"),
]


def _problems_of(obj):
    w, found = parse_workspace(obj)
    return [str(p) for p in found + validate_workspace(w)]


def _check(found, path, words):
    want = f"{path}: " if path else ""
    hits = [m for m in found if m.startswith(want) and words in m]
    assert hits, f"expected '{want}...{words}...' among {found}"
    assert all(len(m) <= 520 for m in found), max(found, key=len)[:200]


@pytest.mark.parametrize("case,obj,path,words", SPEC, ids=[c[0] for c in SPEC])
def test_spec(case, obj, path, words):
    _check(_problems_of(obj), path, words)


@pytest.mark.parametrize("case,text,path,words", CONFIG, ids=[c[0] for c in CONFIG])
def test_configmap(case, text, path, words):
    start = time.monotonic()
    _, problems = parse_config(text)
    assert time.monotonic() - start < 2
    _check([str(p) for p in problems], path, words)


@pytest.mark.parametrize("case,content,words", FILES, ids=[c[0] for c in FILES])
def test_file(case, content, words, tmp_path):
    f = tmp_path / "in.yaml"
    f.write_text(content)
    with pytest.raises(FileError) as e:
        load_documents(f)
    assert words in e.value.message and len(e.value.message) <= 300


def test_the_429_byte_bomb_of_issue_11_gives_a_short_error():
    assert len(BOMB) < 429
    _, problems = parse_config(BOMB)
    assert len(problems) == 1 and len(str(problems[0])) < 200


def test_local_runs_may_use_hostpath_volumes():
    obj = ws("tuning.input", {"volumeSource": {"hostPath": {"path": "/data"}}})
    w, found = parse_workspace(obj)
    assert found + validate_workspace(w, local=True) == []
    assert validate_workspace(w, volume_types=("hostPath",)) == []  # the operator may widen the list by setting
    assert [p.path for p in validate_workspace(w)] == ["tuning.input.volumeSource.hostPath"]


def test_corpus_size():
    assert len(SPEC) + len(CONFIG) + len(FILES) >= 40


def test_keys_merged_in_may_be_overridden_as_yaml_says():
    text = "base: &b {r: 8, lora_alpha: 16}\ntraining_config:\n  LoraConfig:\n    <<: *b\n    r: 16\n"
    assert load_yaml(text)["training_config"]["LoraConfig"] == {"r": 16, "lora_alpha": 16}
    assert load_yaml("a: {x: 1}\nb: {x: 1}\n") == {"a": {"x": 1}, "b": {"x": 1}}  # the same key in two mappings


@pytest.mark.parametrize("url", [
    "ftp://user:SECRETPASS@example.com/x.parquet",  # the wrong scheme
    "user:SECRETPASS@example.com/x.parquet",  # no scheme at all
    "https://user:SECRETPASS@exa mple.com/x.parquet",  # white space
    "https://example.com/x.parquet?sig=SECRET%2B&note=a b",  # white space in the signed query
    "https://example.com/x.parquet?sig=SECRET\x01",  # a control character in the query
    "https://example.com:99999/x.parquet?sig=SECRET",  # no valid port
    "https://[::1/x.parquet?sig=SECRET",  # an unclosed IPv6 address
])
def test_a_bad_url_is_shown_without_its_password_or_signature(url):
    found = _problems_of(ws("tuning.input.urls", [url]))
    assert any(m.startswith("tuning.input.urls[0]: ") for m in found), found
    assert not any("SECRET" in m for m in found), found


def test_a_control_character_in_a_url_is_named():
    found = _problems_of(ws("tuning.input.urls", ["https://example.com/train\x00.parquet"]))
    assert "tuning.input.urls[0]: 'https://example.com/train\\x00.parquet' contains the control character U+0000; " \
           "remove it" in found, found


def test_a_credential_in_the_configmap_is_never_echoed():
    for value in ("hf_SECRETTOKEN", ["hf_SECRETTOKEN"], {"t": "hf_SECRETTOKEN"}, 12345):
        _, problems = parse_config(cfg({"TrainingArguments": {"hub_token": value}}))
        assert problems and not any("SECRET" in str(p) or "12345" in str(p) for p in problems), problems
