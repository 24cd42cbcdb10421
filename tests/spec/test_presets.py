"""Presets: every file loads, and the default LoRA target modules exist in that architecture."""

import pytest

from kaito_tuning.spec.instances import (
    INSTANCE_TYPES,
    UnknownInstanceType,
    fitting,
    get_instance_type,
)
from kaito_tuning.spec.presets import UnknownPreset, all_presets, get_preset

REQUIRED = {"phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct",
            "phi-3-medium-128k-instruct", "phi-3.5-mini-instruct", "phi-4-mini-instruct", "phi-4",
            "mistral-7b-instruct", "qwen2.5-coder-7b-instruct", "llama-3.1-8b-instruct", "smollm2-135m-instruct"}


def test_required_presets_present_and_tunable():
    presets = all_presets()
    assert REQUIRED <= set(presets)
    for name in REQUIRED:
        p = presets[name]
        assert set(p.methods) == {"lora", "qlora"}, name
        assert p.gpu_memory_gib["qlora"] <= p.gpu_memory_gib["lora"], name
        assert p.repo.count("/") == 1 and p.revision, name


def test_lookup_by_hf_id_and_close_names():
    assert get_preset("microsoft/Phi-3-mini-128k-instruct").name == "phi-3-mini-128k-instruct"
    with pytest.raises(UnknownPreset, match="did you mean phi-4"):
        get_preset("phi4")


def _tiny(model_type):
    import transformers
    cfg_cls = {"phi3": transformers.Phi3Config, "llama": transformers.LlamaConfig,
               "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[model_type]
    cfg = cfg_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with __import__("torch").device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", sorted(all_presets()))
def test_target_modules_exist_in_the_architecture(name):
    p = get_preset(name)
    model = _tiny(p.model_type)
    assert type(model).__name__ == p.architecture
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in p.target_modules if m not in leaves]
    assert missing == [], f"{name}: {missing} are not modules of {p.architecture}"


def test_phi3_uses_fused_projections_unlike_kaito():
    p = get_preset("phi-3-mini-128k-instruct")
    assert "qkv_proj" in p.target_modules and "gate_up_proj" in p.target_modules
    assert "q_proj" not in p.target_modules


def test_instance_table():
    v100 = get_instance_type("Standard_NC6s_v3")
    assert (v100.gpu_count, v100.gpu_memory_gib, v100.bf16) == (1, 16, False)
    assert get_instance_type("Standard_NC40ads_H100_v5").gpu_memory_gib == 94
    assert get_instance_type("p5.48xlarge").gpu_count == 8
    assert {"Standard_ND96asr_v4", "Standard_ND96amsr_A100_v4", "Standard_ND96isr_H100_v5", "g5.xlarge", "g6.xlarge",
            "p4d.24xlarge"} <= set(INSTANCE_TYPES)
    with pytest.raises(UnknownInstanceType, match="has no GPU"):
        get_instance_type("Standard_D2s_v3")
    with pytest.raises(UnknownInstanceType, match="did you mean Standard_NC6s_v3"):
        get_instance_type("Standard_NC6s_v4")
    fits = fitting(18)
    assert fits and all(t.gpu_memory_gib >= 18 for t in fits)
    assert fits[0].gpu_memory_gib == 24  # the smallest GPU that holds 18 GiB comes first (A10/A10G/L4)
