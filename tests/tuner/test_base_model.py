"""Where base weights come from, and the dtype this hardware gets."""

import shutil

import pytest

from kaito_tuning.errors import UserError
from kaito_tuning.tuner.base_model import (
    ModelUnavailable,
    hardware_dtype,
    load_base,
    local_weights,
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
        local_weights("phi-3-mini-4k-instruct", model_dir=str(tmp_path))


def test_model_dir_wins(tiny_llama):
    model, tok = load_base("smollm2-135m-instruct", model_dir=str(tiny_llama))
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token == "<pad>"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_phi3):
    """A Hugging Face cache holding phi-3-mini-4k-instruct's pinned revision (the tiny model stands in for it),
    as the Job's download step leaves it; and an empty hub: nothing can be downloaded here."""
    p = resolve_preset("phi-3-mini-4k-instruct")
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{p.repo.replace('/', '--')}" / "snapshots" / p.revision
    shutil.copytree(tiny_phi3, snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_kaito_local_files_only_loads_weights_made_local_first(hf_cache):
    """Kaito's ConfigMaps say local_files_only: true; the weights the download step cached are used."""
    assert local_weights("phi-3-mini-4k-instruct", local_files_only=True) == hf_cache
    model, tok = load_base("phi-3-mini-4k-instruct", model_kwargs={"local_files_only": True})
    assert type(model).__name__ == "Phi3ForCausalLM"


def test_local_files_only_for_weights_that_are_not_local_names_the_setting(hf_cache):
    with pytest.raises(ModelUnavailable, match="ModelConfig.local_files_only: .*phi-3-mini-128k-instruct.*not in the "
                                               "local cache; set it to false") as e:
        local_weights("phi-3-mini-128k-instruct", local_files_only=True)
    assert e.value.exit_code == 65


def test_gpus_that_only_emulate_bfloat16_get_float16(monkeypatch):
    """V100/T4: torch.cuda.is_bf16_supported() answers True by emulation (slow); the hardware answer decides."""
    import torch

    from kaito_tuning.tuner.base_model import hardware_dtype, resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert hardware_dtype() == torch.float16
    assert resolve_dtype("bfloat16") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware_dtype() == resolve_dtype("auto") == torch.bfloat16
