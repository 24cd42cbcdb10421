"""Batches padded or end to end (tuner/batches.py): the cheaper layout, the same loss and gradients."""

import pytest

from kaito_tuning.tuner import hardware
from kaito_tuning.tuner.batches import CheaperLayout, model_flops, padding_free_is_cheaper
from kaito_tuning.tuner.hardware import Device, ModelShape

GIB = 1 << 30
CPU = Device("CPU (2 cores)", None, 8 * GIB, 6 * GIB)
H100 = Device("NVIDIA H100 80GB HBM3", (9, 0), int(79.11 * GIB), int(78.6 * GIB))
SMOLLM2_LORA = ModelShape(576, 30, 49152, 0.135e9, False, 1536, 8192)
TRAINING = {"max_length": 1024}


def plan(device, model, training=TRAINING):
    return hardware.plan(device, model, training, lora={"r": 16})

TOKEN, PAIR = model_flops(SMOLLM2_LORA)


@pytest.mark.parametrize("lengths,cheaper", [
    ([300], False),                    # one row: nothing to pad
    # measured on SmolLM2 (LoRA r=16, fp32, fwd+bwd, this 2-core CPU): end to end / padded
    ([512, 512, 512, 512], False),     # 1.43x: no padding to save, and attention over the whole line costs more
    ([512, 380, 300, 420], False),     # 1.06x: 22% padding is about even
    ([512, 40, 90, 200], True),        # 0.49x: mostly padding
    ([4096, 3000, 2500, 3500], False),  # long rows: the line's attention outgrows the padding saved
])
def test_the_cheaper_layout(lengths, cheaper):
    assert padding_free_is_cheaper(lengths, token_flops=TOKEN, pair_flops=PAIR) is cheaper


def test_layout_only_on_a_cpu_with_masks_that_keep_rows_apart():
    four = {**TRAINING, "per_device_train_batch_size": 4}
    p = hardware.row_layout(plan(CPU, SMOLLM2_LORA, four), four, native_model=True)
    assert p.layout == "cheaper" and "4 rows" in p.reasons["layout"] and p.metadata()["layout"] == "cheaper"
    assert hardware.row_layout(plan(CPU, SMOLLM2_LORA), TRAINING, native_model=True).layout == "padded"  # 1 row
    assert hardware.row_layout(plan(H100, SMOLLM2_LORA, four), four, native_model=True) == plan(H100, SMOLLM2_LORA,
                                                                                                   four)
    own = {**four, "padding_free": False}
    assert hardware.row_layout(plan(CPU, SMOLLM2_LORA, own), own, native_model=True).layout == "padded"
    remote = hardware.row_layout(plan(CPU, SMOLLM2_LORA, four), four, native_model=False)
    assert remote.layout == "padded" and "trust_remote_code" in remote.reasons["layout"]


@pytest.fixture(scope="module", params=["phi3", "llama"])
def peft_model(request, tiny_models):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_models[request.param], dtype=torch.float32,
                                             attn_implementation="sdpa")
    return get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))


def test_same_loss_and_gradients_padded_or_end_to_end(peft_model):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(10, 2000, (n,), generator=g).tolist() for n in (57, 9, 120, 33)]
    examples = [{"input_ids": r, "labels": [-100] * 4 + r[4:]} for r in rows]  # a masked prompt, as SFT has
    layout = CheaperLayout(SMOLLM2_LORA, DataCollatorForLanguageModeling(pad_token_id=0))
    results = []
    for collate in (layout.padded, layout.free):
        batch = collate(examples)
        assert ("attention_mask" in batch) is (collate is layout.padded)
        peft_model.zero_grad()
        # use_cache=False as SFTTrainer.compute_loss sets it: with a cache, transformers does not look for rows
        # laid end to end in position_ids and the rows would see each other
        loss = peft_model(**{k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask",
                                                                      "position_ids")}, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6) for n in grads_a)
    # and the collator picks a layout per batch
    layout(examples)
    layout([{"input_ids": r, "labels": r} for r in [rows[2], rows[2]]])
    assert layout.counts == {"padded": 1, "padding-free": 1}


def test_training_lays_uneven_batches_end_to_end_with_the_padded_loss(tiny_llama, tmp_path):
    import json

    from fixtures_data import training_configmap, write_parquet

    from kaito_tuning.spec.training_config import load_config
    from kaito_tuning.tuner.formats import prepare
    from kaito_tuning.tuner.inputs import collect_dir
    from kaito_tuning.tuner.recipe import train

    d = tmp_path / "data"
    d.mkdir()
    answer = "The capital of France is Paris. "
    write_parquet(d / "uneven.parquet", [
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": answer * (12 if i % 4 == 0 else 1)}]} for i in range(16)])
    runs = {}
    for name, extra in (("padded", {"padding_free": False}), ("ours", {})):
        text = training_configmap(training={"max_length": 128, **extra},
                                  dataset={"train_test_split": 1.0, "shuffle_dataset": False})
        cfg = load_config(text["data"]["training_config.yaml"], "lora")
        data = prepare(collect_dir(d), cfg.dataset())
        out = tmp_path / name
        r = train(preset="smollm2-135m-instruct", method="lora", config=cfg, data=data, output_dir=out,
                  model_dir=str(tiny_llama), max_steps=2, show_progress=False)
        runs[name] = (r, json.loads((out / "training_metadata.json").read_text())["hardware"])
    (padded, hw_padded), (ours, hw_ours) = runs["padded"], runs["ours"]
    assert hw_padded["layout"] == "padded" and hw_ours["layout"] == "cheaper"
    assert hw_ours["layout_batches"]["padding-free"] >= 1  # one long row and three short ones a batch
    assert ours.train_loss == pytest.approx(padded.train_loss, rel=1e-4)
