"""Regenerate ``spec/data/config_fields.json``: the fields of the real classes the ConfigMap sections feed.

The operator validates ConfigMaps without torch, transformers, peft or trl; it reads this snapshot
instead, and ``tests/spec/test_training_config.py`` checks the snapshot against the installed
libraries. After upgrading one of them: ``python -m kaito_tuning.dev.config_snapshot``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from importlib import resources

from kaito_tuning.spec.training_config import (
    DATA_COLLATOR_EXCLUDED,
    DatasetConfig,
    ModelConfig,
    _kind,
)


def build_snapshot() -> dict:
    """Fields and kinds of the real classes (imports transformers, peft, trl)."""
    import peft
    import transformers
    import trl

    def dc_fields(cls: type, exclude: tuple = ()) -> dict:
        return {f.name: _kind(f.type) for f in dataclasses.fields(cls)
                if f.init and not f.name.startswith("_") and f.name not in exclude}

    bnb_params = inspect.signature(transformers.BitsAndBytesConfig.__init__).parameters
    bnb = {n: _kind(p.annotation) if p.annotation is not inspect.Parameter.empty else "any"
           for n, p in bnb_params.items() if n not in ("self", "kwargs")}
    # transformers' signature leaves some of these unannotated
    bnb.update({"load_in_4bit": "bool", "load_in_8bit": "bool", "bnb_4bit_use_double_quant": "bool",
                "llm_int8_threshold": "float", "bnb_4bit_quant_type": "str", "bnb_4bit_compute_dtype": "any",
                "llm_int8_has_fp16_weight": "bool", "llm_int8_enable_fp32_cpu_offload": "bool",
                "bnb_4bit_quant_storage": "any", "llm_int8_skip_modules": "list?"})
    return {
        "_versions": {"transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__},
        "ModelConfig": dc_fields(ModelConfig),
        "QuantizationConfig": dict(sorted(bnb.items())),
        "LoraConfig": dc_fields(peft.LoraConfig),
        "TrainingArguments": dc_fields(trl.SFTConfig),
        "DataCollator": dc_fields(transformers.DataCollatorForLanguageModeling, DATA_COLLATOR_EXCLUDED),
        "DatasetConfig": dc_fields(DatasetConfig),
    }


def main() -> None:
    out = resources.files("kaito_tuning.spec").joinpath("data/config_fields.json")
    with open(str(out), "w") as fh:
        json.dump(build_snapshot(), fh, indent=1, sort_keys=False)
        fh.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
