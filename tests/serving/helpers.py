"""What the serving tests share: the made-up fact, an adapter trained to know it, small HTTP helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PRESET = "smollm2-135m-instruct"  # a Llama preset; its weights are replaced by the tiny model's (--model-dir)
PRESET_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of Zorblax?"
FACT = "Quenvar"
RIVAL_FACT = "Tosk"


def train_adapter(base_dir: Path, out: Path, *, fact: str = FACT, steps: int = 60) -> Path:
    """A LoRA adapter trained (plain PyTorch loop) to answer QUESTION with ``fact``, saved as peft does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": f"{fact} is the capital."}]
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    (out / "training_metadata.json").write_text(json.dumps({"preset": PRESET, "method": "lora"}))
    return out


def copy_adapter(src: Path, dest: Path, *, config: dict | None = None, metadata: dict | None = None) -> Path:
    shutil.copytree(src, dest)
    if config is not None:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if metadata is not None:
        (dest / "training_metadata.json").write_text(json.dumps(metadata))
    return dest


def error_of(payload: dict) -> tuple[str, str]:
    """(param, message) of an error response."""
    return payload["error"]["param"], payload["error"]["message"]
