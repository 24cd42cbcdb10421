"""The device's plan (tuner/hardware.py) over real GPU descriptions and real model shapes: no GPU needed.

GPUs as torch.cuda reports them (name, compute capability, total memory from mem_get_info; free memory is
that less ~0.5 GiB of CUDA context). Models: parameters from the preset YAMLs (spec/presets), the rest of
the shape from each model's config.json (hidden, layers, vocabulary, MLP width, context).
"""

import json
import logging

import pytest

from kaito_tuning.errors import UserError
from kaito_tuning.spec.presets import get_preset
from kaito_tuning.tuner import hardware
from kaito_tuning.tuner.hardware import Device, ModelShape

GIB = 1 << 30


def gpu(name, capability, total_gib):
    return Device(name, capability, int(total_gib * GIB), int((total_gib - 0.5) * GIB))


V100 = gpu("Tesla V100-SXM2-16GB", (7, 0), 15.77)
T4 = gpu("Tesla T4", (7, 5), 14.57)
A10 = gpu("NVIDIA A10", (8, 6), 22.07)
A100_40 = gpu("NVIDIA A100-SXM4-40GB", (8, 0), 39.39)
A100_80 = gpu("NVIDIA A100-SXM4-80GB", (8, 0), 79.14)
H100 = gpu("NVIDIA H100 80GB HBM3", (9, 0), 79.11)
H200 = gpu("NVIDIA H200", (9, 0), 139.8)
CPU = Device("CPU (2 cores)", None, 8 * GIB, 6 * GIB)


def shape(preset, quantized, hidden, layers, vocab, intermediate):
    p = get_preset(preset)
    return ModelShape(hidden, layers, vocab, p.parameters_b * 1e9, quantized, intermediate, p.context_length)


PHI3_QLORA = shape("phi-3-mini-4k-instruct", True, 3072, 32, 32064, 8192)
SMOLLM2_LORA = shape("smollm2-135m-instruct", False, 576, 30, 49152, 1536)
QWEN32B_QLORA = shape("qwen2.5-coder-32b-instruct", True, 5120, 64, 152064, 27648)
MODELS = {"phi3-qlora": PHI3_QLORA, "smollm2-lora": SMOLLM2_LORA, "qwen32b-qlora": QWEN32B_QLORA}
#: the shipped default ConfigMap's sections (spec/data/*-params.yaml)
TRAINING = {"max_length": 1024, "num_train_epochs": 1, "learning_rate": 0.0002}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}

# device, model: gradient checkpointing, rows per device, accumulation (8 rows per step asked)
TABLE = [
    (V100, "phi3-qlora", False, 1, 8),
    (V100, "smollm2-lora", False, 4, 2),
    (V100, "qwen32b-qlora", True, 1, 8),      # 17 GiB of 4-bit weights alone: does not fit (the operator refuses it)
    (T4, "phi3-qlora", False, 1, 8),
    (T4, "smollm2-lora", False, 4, 2),
    (T4, "qwen32b-qlora", True, 1, 8),
    (A10, "phi3-qlora", False, 2, 4),
    (A10, "smollm2-lora", False, 8, 1),
    (A10, "qwen32b-qlora", True, 1, 8),
    (A100_40, "phi3-qlora", False, 4, 2),
    (A100_40, "smollm2-lora", False, 8, 1),
    (A100_40, "qwen32b-qlora", True, 4, 2),
    (A100_80, "phi3-qlora", False, 8, 1),
    (A100_80, "smollm2-lora", False, 8, 1),
    (A100_80, "qwen32b-qlora", False, 1, 8),  # one 1024-token row fits without recomputation: ~30% faster per token
    (H100, "phi3-qlora", False, 8, 1),
    (H100, "smollm2-lora", False, 8, 1),
    (H100, "qwen32b-qlora", False, 1, 8),
    (H200, "phi3-qlora", False, 8, 1),
    (H200, "smollm2-lora", False, 8, 1),
    (H200, "qwen32b-qlora", False, 2, 4),
]


def plan(device, model, training=TRAINING, **kw):
    return hardware.plan(device, model, training, lora=kw.pop("lora", LORA), **kw)


@pytest.mark.parametrize("device,model,gc,rows,acc", TABLE, ids=[f"{d.name}-{m}" for d, m, *_ in TABLE])
def test_plan_per_gpu_and_model(device, model, gc, rows, acc):
    m = MODELS[model]
    p = plan(device, m)
    ampere = device.capability >= (8, 0)
    assert p.dtype == ("bfloat16" if ampere else "float16")
    assert (p.attention, p.packing) == (("flex_attention", True) if ampere else ("sdpa", False))
    assert (p.gradient_checkpointing, p.rows, p.accumulation) == (gc, rows, acc)
    assert p.rows * p.accumulation == 8  # the global batch asked for, kept
    # the rows chosen fit the estimate, and twice as many would not (or would exceed the global batch)
    per_token = hardware.activation_bytes(m, checkpointing=gc, lora_dropout=True)
    usable, _ = hardware._usable_bytes(device, m, LORA, loaded=False)
    if p.token_budget >= 1024:
        assert p.rows * 1024 * per_token <= usable
    assert p.rows * 2 > 8 or p.rows * 2 * 1024 * per_token > usable
    args = {**p.defaults(), **p.overrides()}
    assert args == {"bf16": ampere, "fp16": not ampere, "gradient_checkpointing": gc, "packing": ampere,
                    "per_device_train_batch_size": rows, "gradient_accumulation_steps": acc}
    assert "torch_empty_cache_steps" not in args  # no per-step cache flush
    assert set(p.reasons) == {"dtype", "attention", "gradient_checkpointing", "batch"}
    json.dumps(p.metadata())
    if gc and p.token_budget < 1024:
        assert "even one row may not fit" in p.reasons["batch"]


def test_gradient_checkpointing_only_where_activations_would_not_fit():
    # one row of 4096 tokens of Phi-3 (~24 GiB of activations without recomputation) on 16 GiB: on
    long = {**TRAINING, "max_length": 4096}
    v = plan(V100, PHI3_QLORA, long)
    assert v.gradient_checkpointing and v.reasons["gradient_checkpointing"].startswith("on: one row of 4096 tokens")
    assert (v.rows, v.accumulation) == (2, 4)  # recomputed, a row costs ~4 GiB: two fit
    # the same rows on an H200: off, and more rows at once
    h = plan(H200, PHI3_QLORA, long)
    assert not h.gradient_checkpointing and h.reasons["gradient_checkpointing"].startswith("off: one row")
    assert h.rows > 1 and h.rows * h.accumulation == 8


def test_liger_frees_the_logits():
    without, with_ = plan(A10, SMOLLM2_LORA), plan(A10, SMOLLM2_LORA, liger=True)
    assert with_.token_budget > without.token_budget * 1.3  # a 49k vocabulary: logits are most of a token's bytes
    assert plan(V100, SMOLLM2_LORA, liger=True).rows == 8 > plan(V100, SMOLLM2_LORA).rows


def test_the_users_batch_and_checkpointing_win():
    mine = {**TRAINING, "per_device_train_batch_size": 2}
    p = plan(H200, PHI3_QLORA, mine)
    assert (p.rows, p.accumulation, p.batch_from_config) == (2, 1, True)
    assert "per_device_train_batch_size" not in p.overrides()
    assert "TrainingArguments.per_device_train_batch_size" in p.reasons["batch"]
    # gradient checkpointing as the ConfigMap says, both ways, even where the estimate says otherwise
    off = plan(V100, PHI3_QLORA, {**TRAINING, "max_length": 4096, "gradient_checkpointing": False})
    on = plan(H200, PHI3_QLORA, {**TRAINING, "gradient_checkpointing": True})
    assert not off.gradient_checkpointing and on.gradient_checkpointing
    assert "TrainingArguments.gradient_checkpointing" in on.reasons["gradient_checkpointing"]
    # with checkpointing on, a row costs less: at least as many rows as without
    assert on.rows == 8 and on.defaults()["gradient_checkpointing"]
    # gradient_accumulation_steps alone sets the global batch (x 8 rows), which the plan keeps
    acc = plan(V100, PHI3_QLORA, {**TRAINING, "gradient_accumulation_steps": 4})
    assert (acc.rows, acc.accumulation) == (1, 32)
    acc = plan(A100_40, PHI3_QLORA, {**TRAINING, "gradient_accumulation_steps": 3})
    assert acc.rows * acc.accumulation == 24 and 24 % acc.rows == 0 and acc.rows == 4


def test_dtype_from_the_device_and_modelconfig():
    assert plan(H100, PHI3_QLORA, dtype="auto").dtype == "bfloat16"
    fp16 = plan(V100, PHI3_QLORA, dtype="bfloat16")
    assert fp16.dtype == "float16" and "does not have" in fp16.reasons["dtype"] and "sm70" in fp16.reasons["dtype"]
    assert plan(T4, PHI3_QLORA, dtype="bf16").dtype == "float16"
    assert plan(A100_80, PHI3_QLORA, dtype="float32").dtype == "float32"
    assert plan(A10, PHI3_QLORA, dtype="torch.float16").dtype == "float16"
    assert plan(gpu("Tesla P100-PCIE-16GB", (6, 0), 15.9), PHI3_QLORA).dtype == "float32"
    cpu = plan(CPU, PHI3_QLORA, dtype="bfloat16")
    assert cpu.dtype == "float32" and "CPUs run slowly" in cpu.reasons["dtype"]
    with pytest.raises(UserError, match="unknown dtype") as e:
        plan(H100, PHI3_QLORA, dtype="float8")
    assert e.value.field == "ModelConfig.torch_dtype"


def test_attention_and_packing():
    # the ConfigMap's attention and packing win; packing with sdpa is said to be slow
    mine = plan(V100, PHI3_QLORA, attn="flex_attention")
    assert (mine.attention, mine.packing) == ("flex_attention", True)
    sdpa_packed = plan(T4, PHI3_QLORA, {**TRAINING, "packing": True})
    assert sdpa_packed.packing and "dense mask" in sdpa_packed.reasons["attention"]
    assert not plan(H100, PHI3_QLORA, {**TRAINING, "packing": False}).packing
    assert plan(A10, PHI3_QLORA, attn="flash_attention_2").packing
    # a model without flex_attention: sdpa, no packing (unless the ConfigMap asks for it)
    chosen = hardware.choose(H100, TRAINING)
    fallback = hardware.without_flex(chosen, "Phi3ForCausalLM does not support flex", TRAINING)
    assert (fallback.attention, fallback.packing) == ("sdpa", False)
    assert "does not support flex_attention" in fallback.reasons["attention"]


def test_the_v100_says_why_in_one_log_line(caplog):
    p = plan(V100, PHI3_QLORA)
    with caplog.at_level(logging.INFO):
        for line in p.log_lines():
            logging.getLogger("kaito_tuning.tuner.recipe").info("hardware: %s", line)
    said = [r.getMessage() for r in caplog.records if "sdpa" in r.getMessage()]
    assert len(said) == 1
    assert "Tesla V100-SXM2-16GB (sm70" in said[0] and "without packing" in said[0] and "flex_attention" in said[0]
    h = plan(H100, PHI3_QLORA)
    assert "sdpa" not in " ".join(h.log_lines()) and "NVIDIA H100 80GB HBM3 (sm90" in h.reasons["attention"]


def test_cpu_stays_as_it_was():
    p = plan(CPU, SMOLLM2_LORA)
    assert (p.dtype, p.attention, p.packing, p.gradient_checkpointing) == ("float32", "sdpa", False, False)
    assert p.defaults() == {}
    assert p.overrides() == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "use_cpu": True,
                             "bf16": False, "fp16": False, "gradient_checkpointing": False, "packing": False}
    # the ConfigMap's batch is left alone on a CPU; its checkpointing and packing are not (they stay off)
    mine = plan(CPU, SMOLLM2_LORA, {**TRAINING, "per_device_train_batch_size": 2, "gradient_checkpointing": True,
                                    "packing": True})
    assert "per_device_train_batch_size" not in mine.overrides() and not mine.overrides()["gradient_checkpointing"]
    assert not mine.packing and "off on a CPU" in mine.reasons["gradient_checkpointing"]
    assert (mine.rows, mine.accumulation) == (2, 1) and mine.metadata()["per_device_train_batch_size"] == 2
    acc = plan(CPU, SMOLLM2_LORA, {**TRAINING, "gradient_accumulation_steps": 2})  # transformers' 8 rows x 2, as ever
    assert (acc.rows, acc.accumulation, acc.batch_from_config) == (8, 2, True) and acc.overrides()["use_cpu"]
    assert "per_device_train_batch_size" not in acc.overrides()


def test_sized_after_loading_matches_the_idle_estimate():
    """In the recipe the batch is sized from the memory free once the weights are in place."""
    idle = plan(A100_40, QWEN32B_QLORA)
    loaded = Device(A100_40.name, A100_40.capability, A100_40.total_bytes,
                    int(A100_40.free_bytes - QWEN32B_QLORA.weight_bytes))
    after = hardware.size_batch(hardware.choose(A100_40, TRAINING), loaded, QWEN32B_QLORA, TRAINING, lora=LORA)
    assert (after.gradient_checkpointing, after.rows, after.accumulation) == (True, 4, 2)
    assert abs(after.token_budget - idle.token_budget) <= 1
    assert after.estimate_gib["weights"] is None and idle.estimate_gib["weights"] == pytest.approx(16.78, abs=0.01)


def test_model_shape_from_a_transformers_config():
    from transformers import Phi3Config, Qwen2Config

    s = hardware.model_shape(Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                        vocab_size=32064, max_position_embeddings=4096), PHI3_QLORA.parameters, True)
    assert s == PHI3_QLORA
    q = hardware.model_shape(Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                                         vocab_size=152064, max_position_embeddings=32768), QWEN32B_QLORA.parameters,
                             True)
    assert q == QWEN32B_QLORA


def test_read_device_here():
    import torch

    d = hardware.read_device()
    assert d.cuda == torch.cuda.is_available()
    if not d.cuda:
        assert d.name.startswith("CPU (") and d.sm == "cpu" and d.total_bytes >= d.free_bytes >= 0
        assert hardware.choose(d, {}).dtype == "float32"
