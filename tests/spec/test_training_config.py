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
    ({"LoraConfig": {"r": 0}}, None, "LoraConfig.r: must be > 0, got 0"),
    ({"TrainingArguments": {"num_train_epochs": -1}}, None, "TrainingArguments.num_train_epochs: must be > 0, got -1"),
    ({"TrainingArguments": {"learning_rate": 0}}, None, "TrainingArguments.learning_rate: must be in (0, 1), got 0"),
    ({"TrainingArguments": {"learning_rate": float("nan")}}, None, "learning_rate: must be in (0, 1), got nan"),
    ({"TrainingArguments": {"max_steps": 0}}, None, "TrainingArguments.max_steps: must be > 0, or -1 to train"),
    ({"TrainingArguments": {"per_device_train_batch_size": 0}}, None,
     "TrainingArguments.per_device_train_batch_size: must be > 0, got 0"),
    ({"TrainingArguments": {"gradient_accumulation_steps": -2}}, None,
     "TrainingArguments.gradient_accumulation_steps: must be > 0, got -2"),
    ({"TrainingArguments": {"max_length": 0}}, None, "TrainingArguments.max_length: must be > 0, got 0"),
    ({"TrainingArguments": {"warmup_steps": -5}}, None, "TrainingArguments.warmup_steps: must be >= 0, got -5"),
    ({"TrainingArguments": {"save_total_limit": -1}}, None, "TrainingArguments.save_total_limit: must be >= 0"),
    ({"TrainingArguments": {"seed": -1}}, None, "TrainingArguments.seed: must be >= 0, got -1"),
    ({"LoraConfig": {"lora_dropout": 1.0}}, None, "LoraConfig.lora_dropout: must be in [0, 1), got 1"),
    ({"LoraConfig": {"lora_alpha": -8}}, None, "LoraConfig.lora_alpha: must be > 0, got -8"),
    ({"DataCollator": {"mlm_probability": 1.5}}, None, "DataCollator.mlm_probability: must be in [0, 1], got 1.5"),
    ({"DataCollator": {"mask_replace_prob": 0.9, "random_replace_prob": 0.2}}, None,
     "DataCollator.mask_replace_prob: mask_replace_prob + random_replace_prob must be at most 1"),
    ({"DatasetConfig": {"max_rows": 0}}, None, "DatasetConfig.max_rows: must be > 0, got 0"),
    ({"DatasetConfig": {"shuffle_seed": -3}}, None, "DatasetConfig.shuffle_seed: must be >= 0, got -3"),
    ({"DataCollator": {"tokenizer": "gpt2"}}, None, "DataCollator.tokenizer: unknown key"),
    ({"DatasetConfig": {"dataset_path": "../config"}}, None, "DatasetConfig.dataset_path: '../config' leaves"),
    ({"DatasetConfig": {"dataset_path": "/mnt/data/../etc"}}, None, "leaves the input directory"),
    ({"DatasetConfig": {"dataset_path": "x.parquet"}}, None, "relative to /mnt, as in Kaito: write /data/<file>"),
    ({"DatasetConfig": {"dataset_path": "/config/training_config.yaml"}}, None, "leaves the input directory"),
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
    assert "is not valid YAML: line" in messages("training_config:\n  - a\n b: [")[0]
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


def test_kaito_model_config_keys_are_accepted():
    """Every key of Kaito's ModelConfig (presets/workspace/tuning/text-generation/cli.py) loads."""
    text = cfg({"ModelConfig": {"pretrained_model_name_or_path": "/workspace/tfs/weights", "state_dict": None,
                                "cache_dir": "/mnt/hf-cache", "force_download": False, "proxies": None,
                                "output_loading_info": False, "local_files_only": False, "revision": "main",
                                "trust_remote_code": False, "torch_dtype": "bfloat16", "device_map": "auto",
                                "chat_template": None},
                "DataCollator": {"mlm": True, "mlm_probability": 0.15, "mask_replace_prob": 0.8,
                                 "random_replace_prob": 0.1, "pad_to_multiple_of": 8, "return_tensors": "pt",
                                 "whole_word_mask": False, "seed": 1}})
    assert messages(text, "lora") == []
    assert parse_config(text)[0].model().cache_dir == "/mnt/hf-cache"


def test_boundaries_are_allowed():
    text = cfg({"TrainingArguments": {"max_steps": -1, "num_train_epochs": 0.5, "warmup_steps": 0, "seed": 0,
                                      "learning_rate": 0.0002},
                "LoraConfig": {"lora_dropout": 0.0, "r": 1},
                "DataCollator": {"mlm_probability": 1.0, "mask_replace_prob": 0.5, "random_replace_prob": 0.5},
                "DatasetConfig": {"train_test_split": 1}})
    assert messages(text) == []
