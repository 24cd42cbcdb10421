"""DDP or FSDP from the memory estimate (spec/memory.py), and the SFTConfig FSDP settings the tuner gets.

FSDP itself needs GPUs with NCCL: it has NOT run on this project's CPU machines. What is tested here is
the decision and the argument construction (transformers' own TrainingArguments parses them).
"""

from __future__ import annotations

import pytest

from kaito_tuning.errors import UserError
from kaito_tuning.spec import memory
from kaito_tuning.spec.instances import get_instance_type
from kaito_tuning.spec.presets import get_preset
from kaito_tuning.tuner.distributed import fsdp_arguments, fsdp_quantization, parallelism


@pytest.mark.parametrize("preset, method, instance, nodes, mode, fits", [
    ("phi-3-mini-128k-instruct", "qlora", "Standard_NC6s_v3", 1, "ddp", True),           # 7 GiB on 16
    ("qwen2.5-coder-32b-instruct", "lora", "Standard_NC96ads_A100_v4", 1, "ddp", True),  # 76 GiB on 80
    ("qwen2.5-coder-32b-instruct", "lora", "Standard_ND96asr_v4", 1, "fsdp", True),      # 76 > 40, 8 GPUs
    ("qwen2.5-coder-32b-instruct", "lora", "Standard_NV36ads_A10_v5", 1, "ddp", False),  # one 24 GiB GPU
    ("qwen2.5-coder-32b-instruct", "lora", "g5.12xlarge", 1, "fsdp", False),             # 4 x 24: 28 GiB each
    ("qwen2.5-coder-32b-instruct", "lora", "g5.12xlarge", 2, "fsdp", True),              # 2 nodes: 8 x 24
    ("phi-3-medium-128k-instruct", "lora", "Standard_ND40rs_v2", 1, "fsdp", True),      # 40 > 32, 8 GPUs
])
def test_mode_follows_the_estimate(preset, method, instance, nodes, mode, fits):
    p, inst = get_preset(preset), get_instance_type(instance)
    choice = memory.choose(p, method, inst, nodes)
    assert (choice.mode, choice.fits) == (mode, fits), str(choice)
    need = p.gpu_memory_gib[method]
    assert choice.need_gib == need
    if choice.mode == "fsdp":
        # sharded: less than the whole, never less than the unsharded rest
        assert choice.per_gpu_gib < need and choice.per_gpu_gib >= need - memory.weights_gib(p, method)
        assert (choice.per_gpu_gib <= inst.gpu_memory_gib) == fits
        assert f"> {inst.gpu_memory_gib} GiB per GPU" in choice.reason
    else:
        assert (need <= inst.gpu_memory_gib) == fits


def test_more_gpus_never_need_more_memory_per_gpu():
    p = get_preset("qwen2.5-coder-32b-instruct")
    per = [memory.sharded_gib(p, "lora", p.gpu_memory_gib["lora"], g) for g in (1, 2, 4, 8, 16)]
    assert per == sorted(per, reverse=True) and per[0] == pytest.approx(p.gpu_memory_gib["lora"])


def test_shown_reason_names_the_estimate_and_the_shape():
    p, inst = get_preset("qwen2.5-coder-32b-instruct"), get_instance_type("Standard_ND96asr_v4")
    text = str(memory.choose(p, "lora", inst))
    assert text.startswith("fsdp: 76 GiB estimate > 40 GiB per GPU; sharded over 8 GPUs (8x40 GiB)")
    assert str(memory.choose(p, "lora", None)).startswith("ddp: no instanceType")


def test_fsdp_arguments_only_for_fsdp_and_never_offload():
    assert fsdp_arguments("ddp", False) == {} and fsdp_arguments(None, True) == {}
    for quantized in (False, True):
        args = fsdp_arguments("fsdp", quantized)
        assert args["fsdp"] is True and args["fsdp_config"]["cpu_offload"] is False
        assert args["fsdp_config"]["activation_checkpointing"] is True and args["gradient_checkpointing"] is False


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype():
    q = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert fsdp_quantization("fsdp", q, "bfloat16") == {**q, "bnb_4bit_quant_storage": "bfloat16"}
    assert fsdp_quantization("ddp", q, "bfloat16") == q
    mine = {**q, "bnb_4bit_quant_storage": "float16"}
    assert fsdp_quantization("fsdp", mine, "bfloat16") == mine  # the user's choice stands
    assert fsdp_quantization("fsdp", None, "bfloat16") is None


def test_transformers_parses_the_fsdp_arguments():
    transformers = pytest.importorskip("transformers")
    for quantized in (False, True):
        a = transformers.TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none",
                                           **fsdp_arguments("fsdp", quantized))
        assert a.fsdp and a.fsdp_config["version"] == 2 and a.fsdp_config["cpu_offload"] is False


def test_the_mode_a_run_trains_in():
    assert parallelism(None, True) == parallelism("", False) == "ddp"
    assert parallelism("FSDP", True) == "fsdp"
    assert parallelism("fsdp", False) == "ddp"  # accelerate shards only across GPUs
    with pytest.raises(UserError, match=r"KAITO_PARALLELISM: 'zero3' is not a mode: use ddp or fsdp"):
        parallelism("zero3", True)
