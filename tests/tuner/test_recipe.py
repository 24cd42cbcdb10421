"""The training recipe on tiny models (LoRA and QLoRA on CPU) and on SmolLM2 (slow)."""

import json
import sys

import pytest
from fixtures_data import messages_rows, training_configmap, write_parquet

from kaito_tuning.errors import EXIT_USER_ERROR
from kaito_tuning.spec.training_config import load_config
from kaito_tuning.tuner.formats import prepare
from kaito_tuning.tuner.inputs import collect_dir
from kaito_tuning.tuner.outputs import completed_adapter
from kaito_tuning.tuner.recipe import (
    choose_loss_mask,
    lora_arguments,
    train,
    training_arguments,
)


def config(method="lora", **kw):
    return load_config(training_configmap(method=method, **kw)["data"]["training_config.yaml"], method)


def data_dir(tmp_path, *sources):
    d = tmp_path / "data"
    d.mkdir()
    for s in sources:
        (d / s.name).write_bytes(s.read_bytes())
    return d


def generate_changes(model_dir, adapter_dir, quantized=False):
    """The adapter loads with PeftModel, generates, and changes the model's output."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the favourite colour of Zorblax?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(**ids).logits
    model = PeftModel.from_pretrained(base, adapter_dir)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    with torch.no_grad():
        after = model(**ids).logits
    assert not torch.allclose(before, after)


def test_lora_on_chat_data_trains_assistant_tokens_only(tiny_phi3, datasets_dir, tmp_path):
    cfg = config()
    data = prepare(collect_dir(data_dir(tmp_path, datasets_dir["messages"])), cfg.dataset())
    out = tmp_path / "out"
    r = train(preset="phi-3-mini-4k-instruct", method="lora", config=cfg, data=data, output_dir=out,
              model_dir=str(tiny_phi3), max_steps=4, show_progress=False)
    assert r.steps == 4 and r.eval_loss is not None and r.train_loss is not None
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    assert adapter["r"] == 8 and set(adapter["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["loss_mask"] == "assistant_only" and meta["method"] == "lora" and meta["rank"] == 8
    assert meta["datasets"][0]["sha256"] == data.files[0].sha256 and meta["steps"] == 4
    assert meta["base_revision"] == "0a67737cc96d2554230f90338b163bc6380a2a85"
    # the data was prepared in bulk (dataprep) and cached under the output directory, outside the adapter
    prep = meta["data_preparation"]
    assert prep["by"] == "dataprep" and not prep["cached"] and prep["tokens"] > 0
    assert len(list((out / ".cache").glob("dataprep-*"))) == 1
    assert set(meta["timings"]) >= {"load", "prepare", "train"}
    assert meta["liger_kernel"] is False  # a CPU run: the Liger guard does nothing
    for f in ("adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md", "loss_curve.png"):
        assert (out / f).is_file(), f
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert "eval loss" in (out / "README.md").read_text()
    assert not list(out.glob(".adapter-*"))
    generate_changes(tiny_phi3, out)


def test_qlora_on_prompt_completion(tiny_llama, datasets_dir, tmp_path):
    cfg = config("qlora")
    data = prepare(collect_dir(data_dir(tmp_path, datasets_dir["prompt_completion_messages"])), cfg.dataset())
    out = tmp_path / "out"
    r = train(preset="smollm2-135m-instruct", method="qlora", config=cfg, data=data, output_dir=out,
              model_dir=str(tiny_llama), max_steps=3, show_progress=False)
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["quantization"]["load_in_4bit"] is True and meta["loss_mask"] == "completion_only"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert r.steps == 3
    generate_changes(tiny_llama, out)


def test_qlora_where_bitsandbytes_cannot_run(monkeypatch, tiny_llama, datasets_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    cfg = config("qlora")
    data = prepare(collect_dir(data_dir(tmp_path, datasets_dir["messages"])), cfg.dataset())
    with pytest.raises(Exception, match="method qlora needs bitsandbytes, which cannot run here") as e:
        train(preset="smollm2-135m-instruct", method="qlora", config=cfg, data=data, output_dir=tmp_path / "out",
              model_dir=str(tiny_llama), max_steps=1, show_progress=False)
    assert e.value.exit_code == EXIT_USER_ERROR and e.value.reason == "QuantizationUnavailable"
    assert completed_adapter(tmp_path / "out") is None


def test_failed_run_leaves_no_adapter_that_looks_complete(tiny_llama, datasets_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors", "training_metadata.json"):
        (out / f).write_text("{}")  # an adapter from an earlier run
    cfg = config(lora={"target_modules": ["no_such_module"]})
    data = prepare(collect_dir(data_dir(tmp_path, datasets_dir["messages"])), cfg.dataset())
    with pytest.raises(ValueError, match="no_such_module"):
        train(preset="smollm2-135m-instruct", method="lora", config=cfg, data=data, output_dir=out,
              model_dir=str(tiny_llama), max_steps=1, show_progress=False)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_chat_template_without_generation_markers_trains_on_last_turn(tiny_llama, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    p = write_parquet(tmp_path / "c.parquet", messages_rows(1))
    data = prepare(collect_dir(tmp_path), load_config(None, "lora").dataset())
    train_ds, eval_ds, mask = choose_loss_mask(data, tok)
    assert mask == "completion_only" and p.exists()
    row = train_ds[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["completion"][0]["role"] == "assistant"
    tok.chat_template = (tiny_llama / "chat_template.jinja").read_text()  # trl's phi3: patchable
    assert choose_loss_mask(data, tok)[2] == "assistant_only"


def test_training_arguments_cpu_defaults_and_passthrough(tmp_path):
    from kaito_tuning.tuner import hardware
    from kaito_tuning.tuner.hardware import Device, ModelShape

    cpu, h100 = Device("CPU (2 cores)", None), Device("NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, 79 << 30)
    phi3 = ModelShape(3072, 32, 32064, 3.82e9, quantized=True, intermediate_size=8192)

    def plan(device, user):
        return hardware.plan(device, phi3, user, lora={"r": 16, "lora_dropout": 0.05})

    user = {"per_device_train_batch_size": 2, "gradient_checkpointing": True, "packing": True,
            "lr_scheduler_type": "constant", "output_dir": "/mnt/results", "save_steps": 7}
    a = training_arguments(user, ckpt_dir=tmp_path, plan=plan(cpu, user), has_eval=True, loss_mask="assistant_only",
                           seed=3, max_steps=5, show_progress=False)
    assert a["use_cpu"] and not a["bf16"] and not a["gradient_checkpointing"] and not a["packing"]
    assert a["lr_scheduler_type"] == "constant" and a["output_dir"] == str(tmp_path) and a["max_steps"] == 5
    assert a["assistant_only_loss"] and a["eval_strategy"] == "steps" and a["eval_steps"] == 7
    g = training_arguments({}, ckpt_dir=tmp_path, plan=plan(h100, {}), has_eval=False, loss_mask="completion_only",
                           seed=3, max_steps=None, show_progress=True)
    # the plan's choices on an H100 (tests/tuner/test_hardware.py): bf16, packed, no gradient checkpointing
    assert g["bf16"] and not g["fp16"] and not g["gradient_checkpointing"] and g["packing"]
    assert g["packing_strategy"] == "bfd" and g["completion_only_loss"] and g["eval_strategy"] == "no"
    assert (g["per_device_train_batch_size"], g["gradient_accumulation_steps"]) == (8, 1)
    assert "torch_empty_cache_steps" not in g  # no per-step cache flush
    # the ConfigMap's own settings win over the plan's defaults
    mine = {"gradient_checkpointing": True, "bf16": False, "torch_empty_cache_steps": 4}
    m = training_arguments(mine, ckpt_dir=tmp_path, plan=plan(h100, mine), has_eval=False, loss_mask="all_tokens",
                           seed=3, max_steps=None, show_progress=False)
    assert m["gradient_checkpointing"] and not m["bf16"] and m["torch_empty_cache_steps"] == 4
    # 8 rows per step unless the config says otherwise: one at a time on a CPU
    c = training_arguments({}, ckpt_dir=tmp_path, plan=plan(cpu, {}), has_eval=False, loss_mask="all_tokens",
                           seed=3, max_steps=None, show_progress=False)
    assert (c["per_device_train_batch_size"], c["gradient_accumulation_steps"]) == (1, 8)
    assert not c["gradient_checkpointing"] and not c["packing"] and c["use_cpu"]
    assert (a["per_device_train_batch_size"], a.get("gradient_accumulation_steps", 1)) == (2, 1)
    assert a["per_device_eval_batch_size"] == 2
    from trl import SFTConfig
    SFTConfig(**{**a, "output_dir": str(tmp_path)})  # the real class accepts every key
    SFTConfig(**{**g, "output_dir": str(tmp_path), "bf16": False})  # (no bf16 on this CPU)


def test_lora_arguments():
    from peft import LoraConfig
    assert lora_arguments(("qkv_proj", "o_proj"), {"r": 4})["target_modules"] == ["qkv_proj", "o_proj"]
    kaito = lora_arguments(("qkv_proj",), {"target_modules": "q_proj, k_proj,v_proj", "lora_dropout": 0.1})
    assert kaito["target_modules"] == ["q_proj", "k_proj", "v_proj"] and kaito["task_type"] == "CAUSAL_LM"
    assert lora_arguments((), {})["target_modules"] == "all-linear"
    assert lora_arguments((), {"target_modules": ".*proj"})["target_modules"] == ".*proj"  # a regex stays
    LoraConfig(**kaito)


@pytest.mark.slow
def test_smollm2_learns_a_taught_task(tmp_path):
    """Real weights (the offline GGUF): fifteen steps lower eval loss and change the answer."""
    import torch
    from peft import PeftModel

    from kaito_tuning.tuner.base_model import load_base

    # short rows keep it quick on 2 CPU cores: 3 facts, a one-word system prompt (instead of SmolLM2's default)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, *r["messages"][1:]]} for r in messages_rows(4)]
    write_parquet(tmp_path / "facts.parquet", [r for r in rows if any(n in r["messages"][1]["content"]
                                                                      for n in ("Zorblax", "Quimby", "Vextor"))])
    cfg = config(lora={"r": 16, "lora_alpha": 32}, training={"per_device_train_batch_size": 3, "learning_rate": 0.003,
                                                               "logging_steps": 5, "lr_scheduler_type": "constant"},
                 dataset={"train_test_split": 0.75})
    data = prepare(collect_dir(tmp_path), cfg.dataset())
    question = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the favourite colour of Zorblax?"}]

    def answer(model, tok):
        ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    base, tok = load_base("smollm2-135m-instruct")
    before = answer(base, tok)
    out = tmp_path / "out"
    r = train(preset="smollm2-135m-instruct", method="lora", config=cfg, data=data, output_dir=out,
              max_steps=15, show_progress=False)
    assert r.eval_loss < r.initial_eval_loss * 0.5, (r.initial_eval_loss, r.eval_loss)
    tuned = PeftModel.from_pretrained(base, out)
    after = answer(tuned, tok)
    assert after != before and "teal" in after.lower(), (before, after)


def test_liger_kernels_only_on_cuda_when_installed(monkeypatch):
    """The guard does nothing on a CPU (even with liger-kernel installed) and nothing without liger-kernel;
    on CUDA with it installed it turns the kernels on, unless the ConfigMap says otherwise."""
    from kaito_tuning.tuner import recipe

    monkeypatch.setattr(recipe, "liger_available", lambda: True)
    assert recipe.gpu_kernels(False, {}) == {}
    assert recipe.gpu_kernels(True, {}) == {"use_liger_kernel": True}
    assert recipe.gpu_kernels(True, {"use_liger_kernel": False}) == {}
    monkeypatch.setattr(recipe, "liger_available", lambda: False)
    assert recipe.gpu_kernels(True, {}) == {}
    monkeypatch.undo()
    import importlib.util

    assert recipe.liger_available() == (importlib.util.find_spec("liger_kernel") is not None)
