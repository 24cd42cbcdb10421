"""Where base weights come from, and the dtype this hardware gets."""

import pytest

from kaito_tuning.errors import UserError
from kaito_tuning.tuner.base_model import (
    ModelUnavailable,
    hardware_dtype,
    load_base,
    model_source,
    resolve_dtype,
    resolve_preset,
)


def test_cpu_dtype():
    import torch
    assert hardware_dtype() == torch.float32 == resolve_dtype("auto")
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    with pytest.raises(UserError, match="unknown dtype 'float13'"):
        resolve_dtype("float13")


def test_hub_preset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match=r"microsoft/Phi-3-mini-4k-instruct@0a67737.*HF_HUB_OFFLINE=1.*--model-dir"):
        load_base("phi-3-mini-4k-instruct")


def test_unknown_preset_and_bad_model_dir(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'phi-9'") as e:
        resolve_preset("phi-9")
    assert e.value.reason == "UnknownPreset"
    with pytest.raises(ModelUnavailable, match="has no config.json"):
        model_source(resolve_preset("phi-3-mini-4k-instruct"), str(tmp_path))


def test_model_dir_wins(tiny_llama):
    model, tok = load_base("smollm2-135m-instruct", model_dir=str(tiny_llama))
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token == "<pad>"
