"""Adapter specs: parsed from arguments and Kaito's pod layout, checked against the base model before loading."""

from __future__ import annotations

import json

import pytest

from kaito_tuning.errors import UserError, ValidationError
from kaito_tuning.serving.adapters import (
    AdapterMismatch,
    AdapterNotFound,
    adapter_args_in_dir,
    check_names,
    check_shapes,
    check_trained_for,
    parse_adapter_args,
    prepare_adapters,
)
from kaito_tuning.spec.presets import get_preset

from .helpers import PRESET, copy_adapter


def test_directories_images_and_strengths(zorblax, tmp_path):
    odd = copy_adapter(zorblax, tmp_path / "a=b")  # "=" in a directory name is not a strength
    adapters = parse_adapter_args([f"{zorblax}=0.25", str(odd), "registry.example:5000/team/legal-adapter:v1=0.5",
                                   "docker.io/library/plain"])
    assert [(a.name, a.strength, a.image) for a in adapters] == [
        ("zorblax", 0.25, None), ("a=b", 1.0, None),
        ("legal-adapter", 0.5, "registry.example:5000/team/legal-adapter:v1"),
        ("plain", 1.0, "docker.io/library/plain")]
    assert adapters[0].path == zorblax.resolve() and adapters[2].path is None
    assert [a.field for a in adapters] == ["--adapter[0]", "--adapter[1]", "--adapter[2]", "--adapter[3]"]


@pytest.mark.parametrize("strength, words", [("1.5", "out of range"), ("abc", "not a number"), ("-0.1", "out of")])
def test_bad_strength(zorblax, strength, words):
    with pytest.raises(ValidationError) as e:
        parse_adapter_args([f"{zorblax}={strength}"])
    assert e.value.field is None and str(e.value).startswith("--adapter[0]: strength")
    assert words in str(e.value) and '"0.0" to "1.0"' in str(e.value)


def test_every_problem_is_reported_at_once(zorblax, tmp_path):
    (tmp_path / "file").write_text("x")
    dup = copy_adapter(zorblax, tmp_path / "one" / "zorblax")
    with pytest.raises(ValidationError) as e:
        parse_adapter_args([str(zorblax), str(dup), str(tmp_path / "file"), str(tmp_path / "missing"),
                            "localhost:5000/repo@sha256:xyz"])
    fields = [p.path for p in e.value.problems]
    assert fields == ["--adapter[2]", "--adapter[3]", "--adapter[4]", "--adapter[1]"]
    text = str(e.value)
    assert "is a file; give the adapter's directory" in text
    assert "neither an existing directory nor an image reference" in text
    assert "two adapters are named 'zorblax'" in text and "image reference 'localhost:5000/repo@sha256:xyz'" in text


def test_at_most_ten_adapters(zorblax, tmp_path):
    dirs = [str(copy_adapter(zorblax, tmp_path / f"a{i}")) for i in range(11)]
    with pytest.raises(ValidationError) as e:
        parse_adapter_args(dirs)
    assert "11 adapters given; at most 10" in str(e.value)
    assert len(parse_adapter_args(dirs[:10])) == 10


def test_kaitos_pod_layout(zorblax, rival, tmp_path):
    mnt = tmp_path / "mnt-adapter"
    copy_adapter(zorblax, mnt / "zorblax")
    copy_adapter(rival, mnt / "rival")
    (mnt / "not-an-adapter").mkdir()
    values = adapter_args_in_dir(mnt, environ={"rival": "0.3"})
    assert values == [f"{mnt / 'rival'}=0.3", str(mnt / "zorblax")]
    assert [(a.name, a.strength) for a in parse_adapter_args(values)] == [("rival", 0.3), ("zorblax", 1.0)]
    with pytest.raises(AdapterNotFound) as e:
        adapter_args_in_dir(tmp_path / "nowhere", environ={})
    assert e.value.field == "--adapters-dir"


def test_an_adapter_may_not_take_the_base_models_name(zorblax, tmp_path):
    preset = get_preset(PRESET)
    for name in (PRESET, "SmolLM2-135M-Instruct"):  # the preset's name, or its repo's
        adapters = parse_adapter_args([str(copy_adapter(zorblax, tmp_path / name / name))])
        with pytest.raises(UserError) as e:
            check_names(adapters, preset)
        assert e.value.reason == "AdapterNameTaken" and "the base model's name" in str(e.value)
    check_names(parse_adapter_args([str(zorblax)]), preset)


@pytest.mark.parametrize("config, metadata, words", [
    ({"base_model_name_or_path": "microsoft/Phi-3-mini-4k-instruct"}, None,
     "was trained for microsoft/Phi-3-mini-4k-instruct, but this server runs HuggingFaceTB/SmolLM2-135M-Instruct"),
    (None, {"preset": "phi-3-mini-4k-instruct"}, "tuned from preset phi-3-mini-4k-instruct"),
    ({"peft_type": "PREFIX_TUNING"}, None, "is a PREFIX_TUNING adapter; only LoRA adapters can be served"),
])
def test_trained_for_another_base_model(zorblax, tmp_path, config, metadata, words):
    other = copy_adapter(zorblax, tmp_path / "other", config=config, metadata=metadata)
    (adapter,) = parse_adapter_args([str(other)])
    with pytest.raises(AdapterMismatch) as e:
        check_trained_for(adapter, get_preset(PRESET))
    assert e.value.field == "--adapter[0]" and words in str(e.value) and "'other'" in str(e.value)


def test_trained_for_this_base_model_passes(zorblax, tmp_path):
    (adapter,) = parse_adapter_args([str(zorblax)])
    check_trained_for(adapter, get_preset(PRESET))
    # a local path as base_model_name_or_path says nothing; the hub id of the preset is ours
    same = copy_adapter(zorblax, tmp_path / "same", config={"base_model_name_or_path": "huggingfacetb/smollm2-135m-instruct"})
    check_trained_for(parse_adapter_args([str(same)])[0], get_preset(PRESET))


@pytest.mark.parametrize("damage, error, words", [
    ("no-config", AdapterNotFound, "has no adapter_config.json"),
    ("bad-config", UserError, "cannot read"),
    ("no-weights", AdapterNotFound, "has no adapter_model.safetensors"),
    ("bad-weights", UserError, "cannot read"),
])
def test_damaged_adapter_directories(zorblax, tmp_path, damage, error, words):
    bad = copy_adapter(zorblax, tmp_path / "bad")
    if damage == "no-config":
        (bad / "adapter_config.json").unlink()
    elif damage == "bad-config":
        (bad / "adapter_config.json").write_text("{not json")
    elif damage == "no-weights":
        (bad / "adapter_model.safetensors").unlink()
    else:
        (bad / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(error) as e:
        prepare_adapters(parse_adapter_args([str(bad)]), get_preset(PRESET), tmp_path / "work")
    assert words in str(e.value) and e.value.field == "--adapter[0]"
    assert "Traceback" not in str(e.value)


def test_shapes_against_another_architecture(tiny_phi3, zorblax, tmp_path):
    """Names say nothing (a local base path, no metadata): the tensor shapes still tell."""
    from transformers import AutoModelForCausalLM

    other = copy_adapter(zorblax, tmp_path / "llama-adapter")
    (other / "training_metadata.json").unlink()
    (adapter,) = parse_adapter_args([str(other)])
    phi3 = get_preset("phi-3-mini-4k-instruct")
    check_trained_for(adapter, phi3)  # nothing in the files says otherwise
    with pytest.raises(AdapterMismatch) as e:
        check_shapes(adapter, phi3, AutoModelForCausalLM.from_pretrained(tiny_phi3))
    assert "does not fit phi-3-mini-4k-instruct" in str(e.value)
    assert "_proj, which the model does not have" in str(e.value)


def test_shapes_of_another_width(tiny_llama, tmp_path):
    """A Llama adapter of another width: every module exists, the shapes do not match."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    narrow = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4))
    get_peft_model(narrow.to(torch.float32), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "narrow")
    (adapter,) = parse_adapter_args([str(tmp_path / "narrow")])
    with pytest.raises(AdapterMismatch) as e:
        check_shapes(adapter, get_preset(PRESET), AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert "takes 64 inputs but the adapter's lora_A has shape (4, 32)" in str(e.value)
    cfg = json.loads((tmp_path / "narrow" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"  # a real peft adapter, refused for its shapes alone


@pytest.mark.registry
def test_image_adapters_are_pulled_then_checked(registry, zorblax, tmp_path):
    from kaito_tuning.artifacts import push_adapter

    image = f"{registry.host}/adapters/phi-tuned:1"
    other = copy_adapter(zorblax, tmp_path / "phi-tuned", metadata={"preset": "phi-3-mini-4k-instruct"})
    push_adapter(other, image, auth_file=registry.auth_file, plain_http=True)
    adapters = parse_adapter_args([f"{image}=0.5"])
    with pytest.raises(AdapterMismatch) as e:
        prepare_adapters(adapters, get_preset(PRESET), tmp_path / "work", auth_file=registry.auth_file,
                         plain_http=True)
    assert adapters[0].path == tmp_path / "work" / "phi-tuned"
    assert (adapters[0].path / "adapter_model.safetensors").is_file()
    assert "tuned from preset phi-3-mini-4k-instruct" in str(e.value) and e.value.field == "--adapter[0]"
