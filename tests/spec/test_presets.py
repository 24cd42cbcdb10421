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
            "mistral-7b-instruct", "qwen2.5-coder-7b-instruct", "llama-3.1-8b-instruct", "smollm2-135m-instruct",
            "mistral-7b", "qwen2.5-coder-32b-instruct"}

# Kaito's tuning table (presets/workspace/models/transformer_runtime_tuning_parameters.go at v0.12.0): its keys
KAITO_TUNABLE = ["phi-4", "phi-4-mini-instruct", "phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct",
                 "phi-3-medium-4k-instruct", "phi-3-medium-128k-instruct", "phi-3.5-mini-instruct", "mistral-7b-v0.3",
                 "qwen2.5-coder-7b-instruct", "qwen2.5-coder-32b-instruct"]
# Kaito's SKU tables (pkg/sku: Azure, AWS, Arc): name -> (GPUs, GiB per GPU)
KAITO_SKUS = {
    "Standard_NV36ads_A10_v5": (1, 24), "Standard_NV72ads_A10_v5": (2, 24), "Standard_NC24ads_A100_v4": (1, 80),
    "Standard_NC48ads_A100_v4": (2, 80), "Standard_NC96ads_A100_v4": (4, 80), "Standard_ND96asr_A100_v4": (8, 40),
    "Standard_ND96amsr_A100_v4": (8, 80), "Standard_NC40ads_H100_v5": (1, 94), "Standard_NC80adis_H100_v5": (2, 94),
    "Standard_ND96isr_H100_v5": (8, 80), "Standard_NCC40ads_H100_v5": (1, 94), "Standard_ND96isr_H200_v5": (8, 141),
    "Standard_NG32ads_V620_v1": (1, 32), "Standard_NG32adms_V620_v1": (1, 32),
    "p4d.24xlarge": (8, 40), "p4de.24xlarge": (8, 80), "p5.48xlarge": (8, 80), "p5e.48xlarge": (8, 141),
    "p5en.48xlarge": (8, 141), "g6.xlarge": (1, 24), "g6.2xlarge": (1, 24), "g6.4xlarge": (1, 24),
    "g6.8xlarge": (1, 24), "g6.16xlarge": (1, 24), "gr6.4xlarge": (1, 24), "gr6.8xlarge": (1, 24),
    "g6.12xlarge": (4, 24), "g6.24xlarge": (4, 24), "g6.48xlarge": (8, 24), "g5.xlarge": (1, 24),
    "g5.2xlarge": (1, 24), "g5.4xlarge": (1, 24), "g5.8xlarge": (1, 24), "g5.12xlarge": (4, 24),
    "g5.16xlarge": (1, 24), "g5.24xlarge": (4, 24), "g5.48xlarge": (8, 24), "g4ad.xlarge": (1, 8),
    "g4ad.2xlarge": (1, 8), "g4ad.4xlarge": (1, 8), "g4ad.8xlarge": (2, 8), "g4ad.16xlarge": (4, 8),
    "trn1.2xlarge": (1, 32), "trn1.32xlarge": (16, 32), "trn1n.32xlarge": (16, 32), "inf2.xlarge": (1, 32),
    "inf2.8xlarge": (1, 32), "inf2.24xlarge": (6, 32), "inf2.48xlarge": (12, 32),
    "Standard_NC4_A2": (1, 16), "Standard_NC8_A2": (1, 16), "Standard_NC16_A2": (2, 16), "Standard_NC32_A2": (2, 16),
    "Standard_NC4_A16": (1, 16), "Standard_NC8_A16": (1, 16), "Standard_NC16_A16": (2, 16),
    "Standard_NC32_A16": (2, 16),
}


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


@pytest.mark.parametrize("name", KAITO_TUNABLE)
def test_every_kaito_tuning_preset_is_tunable_here(name):
    p = get_preset(name)
    assert set(p.methods) == {"lora", "qlora"}


def test_mistral_7b_is_kaitos_base_model():
    p = get_preset("mistral-7b")
    assert get_preset("mistral-7b-v0.3") is p and get_preset("mistralai/Mistral-7B-v0.3") is p
    assert p.repo == "mistralai/Mistral-7B-v0.3" and p.revision.startswith("d8cadc02")
    assert get_preset("mistral-7b-instruct").repo == "mistralai/Mistral-7B-Instruct-v0.3"


def test_unknown_preset_lists_presets_for_its_purpose():
    with pytest.raises(UnknownPreset, match="tuning presets: .*qwen2.5-coder-32b-instruct"):
        get_preset("zzzzzzzz")
    with pytest.raises(UnknownPreset, match="inference presets: "):
        get_preset("zzzzzzzz", purpose="inference")


@pytest.mark.parametrize("sku", sorted(KAITO_SKUS))
def test_every_kaito_sku_is_known(sku):
    t = get_instance_type(sku)
    assert (t.gpu_count, t.gpu_memory_gib) == KAITO_SKUS[sku]


def test_non_nvidia_skus_are_known_but_not_cuda():
    assert not get_instance_type("g4ad.xlarge").cuda and not get_instance_type("trn1.2xlarge").cuda
    assert not get_instance_type("Standard_NG32ads_V620_v1").cuda
    assert get_instance_type("Standard_ND96asr_A100_v4").name == "Standard_ND96asr_v4"
    assert all(t.cuda for t in fitting(1, limit=100))
