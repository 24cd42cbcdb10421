"""The tuning ConfigMap: defaults ship valid; bad keys, types and combinations name Section.key."""

import pytest
import yaml

from kaito_tuning.dev.config_snapshot import build_snapshot
from kaito_tuning.errors import ValidationError
from kaito_tuning.spec import training_config as config
from kaito_tuning.spec.training_config import (
    configmap_manifest,
    load_config,
    parse_config,
    snapshot,
)


def cfg(sections: dict) -> str:
    return yaml.safe_dump({"training_config": sections})


def messages(text: str, method: str | None = None) -> list[str]:
    return [str(p) for p in parse_config(text, method=method)[1]]


def test_snapshot_matches_the_installed_classes():
    fresh = build_snapshot()
    assert fresh == snapshot(), "run: python -m kaito_tuning.dev.config_snapshot"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_default_configs_are_valid(method):
    c = load_config(None, method)
    assert c.output_dir == "/mnt/results"
    assert c.quantized == (method == "qlora")
    cm = configmap_manifest(method)
    assert cm["metadata"]["name"] == f"{method}-params-template"
    assert cm["data"]["training_config.yaml"] == config.default_config_text(method)


BAD = [
    ({"LoraConfig": {"rank": 8}}, None, "LoraConfig.rank: unknown key for peft.LoraConfig; did you mean 'r'?"),
    ({"QuantizationConfig": {"load_in_4bit": "yes"}}, None,
     "QuantizationConfig.load_in_4bit: must be true or false, got str 'yes'"),
    ({"Trainer": {"lr": 1}}, None, "Trainer: unknown section"),
    ({"TrainingArguments": {"learning_rate": "fast"}}, None, "TrainingArguments.learning_rate: must be a number"),
    ({"TrainingArguments": {"lr": 0.1}}, None, "did you mean 'learning_rate'?"),
    ({"TrainingArguments": {"num_train_epoch": 2}}, None, "did you mean 'num_train_epochs'?"),
    ({"QuantizationConfig": {"load_in_4bit": False}}, "qlora", "QuantizationConfig.load_in_4bit: method qlora needs"),
    ({}, "qlora", "QuantizationConfig.load_in_4bit: method qlora needs"),
    ({"QuantizationConfig": {"load_in_8bit": True}}, "lora", "QuantizationConfig.load_in_8bit: method lora trains"),
    ({"QuantizationConfig": {"load_in_4bit": True, "load_in_8bit": True}}, None, "both true; choose one"),
    ({"TrainingArguments": {"output_dir": "/tmp/out"}}, None, "TrainingArguments.output_dir: '/tmp/out' resolves"),
    ({"TrainingArguments": {"output_dir": "../../etc"}}, None, "outside /mnt"),
    ({"TrainingArguments": {"output_dir": "/mnt/data/out"}}, None, "inside /mnt/data"),
    ({"DatasetConfig": {"train_test_split": 1.5}}, None, "DatasetConfig.train_test_split: must be in (0, 1]"),
    ({"DatasetConfig": {"format": "csv"}}, None, "DatasetConfig.format: must be one of"),
    ({"LoraConfig": {"r": 0}}, None, "LoraConfig.r: must be positive"),
    ({"DatasetConfig": {"dataset_path": "../config"}}, None, "DatasetConfig.dataset_path: '../config' leaves"),
    ({"DatasetConfig": {"dataset_path": "/mnt/data/../etc"}}, None, "leaves the input directory"),
    ({"LoraConfig": "r=8"}, None, "LoraConfig: must be a mapping"),
]


@pytest.mark.parametrize("sections,method,expected", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_config_names_section_key(sections, method, expected):
    found = messages(cfg(sections), method)
    assert any(expected in m for m in found), found


def test_relative_output_dir_goes_under_mnt():
    c, problems = parse_config(cfg({"TrainingArguments": {"output_dir": "results"}}))
    assert problems == [] and c.output_dir == "/mnt/results"


def test_not_yaml_and_wrong_shape():
    assert "is not valid YAML at line" in messages("training_config:\n  - a\n b: [")[0]
    assert "must be a mapping with the key 'training_config'" in messages("LoraConfig: {r: 8}")[0]


def test_load_config_raises_with_every_problem():
    with pytest.raises(ValidationError) as e:
        load_config(cfg({"LoraConfig": {"rank": 8}, "Trainer": {}}), "lora")
    assert {p.path for p in e.value.problems} == {"LoraConfig.rank", "Trainer"}


def test_real_class_fields_are_accepted():
    text = cfg({"LoraConfig": {"r": 4, "target_modules": ["q_proj"], "use_rslora": True},
                "TrainingArguments": {"packing": True, "assistant_only_loss": True, "max_length": 512,
                                      "gradient_checkpointing_kwargs": {"use_reentrant": False}},
                "QuantizationConfig": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}})
    assert messages(text, "qlora") == []
