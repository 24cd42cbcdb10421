"""`kaito-tuning run`: the local pipeline end to end, resume after a kill, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from fixtures_data import training_configmap, tuning_workspace

from kaito_tuning.errors import EXIT_USER_ERROR, UserError, ValidationError
from kaito_tuning.tuner.local import input_dir, load_spec, run_local


def test_several_urls_to_a_pushed_adapter(data_server, tiny_phi3, tmp_path, registry, registry_auth_file):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, files = data_server
    ws = tuning_workspace([f"{base}/chat.parquet", f"{base}/chat.jsonl", f"{base}/alpaca.parquet"],
                          config="tiny-config")
    ws["tuning"]["output"] = {"image": f"{registry.host}/adapters/tiny:1", "imagePushSecret": "push"}
    result = run_local([ws, training_configmap()], output_dir=str(tmp_path / "out"), max_steps=3,
                       model_dir=str(tiny_phi3), push_auth=registry_auth_file, plain_http=True,
                       allow_private_urls=True, show_progress=False)
    assert result.steps == 3 and result.image == f"{registry.host}/adapters/tiny:1"
    assert result.digest.startswith("sha256:") and result.eval_loss is not None
    meta = json.loads((tmp_path / "out" / "training_metadata.json").read_text())
    assert [d["name"] for d in meta["datasets"]] == ["alpaca.parquet", "chat.jsonl", "chat.parquet"]
    assert {d["url"] for d in meta["datasets"]} == set(ws["tuning"]["input"]["urls"])
    assert meta["train_rows"] + meta["eval_rows"] == 32 + 8 + 32
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["phase"] == "succeeded" and progress["step"] == 3 and progress["total_steps"] == 3

    from kaito_tuning.artifacts import pull_adapter
    pulled = pull_adapter(result.image, tmp_path / "pulled", auth_file=registry_auth_file, plain_http=True)
    assert pulled.digest == result.digest
    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32),
                                      tmp_path / "pulled")
    ids = tok("Hello", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_killed_run_resumes_from_its_checkpoint(data_server, tiny_phi3, tmp_path):
    base, _ = data_server
    spec = tmp_path / "ws.yaml"
    spec.write_text(yaml.safe_dump_all([
        tuning_workspace([f"{base}/chat.parquet"], config="tiny-config"),
        training_configmap(training={"per_device_train_batch_size": 2, "save_steps": 4, "logging_steps": 2},
                           dataset={"train_test_split": 1.0})]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kaito_tuning.cli", "run", str(spec), "--output-dir", str(out),
           "--model-dir", str(tiny_phi3), "--max-steps", "40", "--no-progress", "--allow-private-urls"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)  # as a node loss would
        first.wait()
    assert not (out / "adapter_config.json").exists(), "the first run finished before it could be killed"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["resumed_from_step"] >= 4 and meta["resumed_from_step"] % 4 == 0
    assert meta["steps"] == 40
    assert "adapter:" in second.stdout


def test_missing_configmap_and_unknown_preset(tmp_path):
    with pytest.raises(UserError, match="names ConfigMap 'tiny-config', which is not in the file"):
        load_spec([tuning_workspace(["http://127.0.0.1:9/a.parquet"], config="tiny-config")])
    with pytest.raises(ValidationError, match="tuning.preset.name: .*unknown preset 'phi-9'") as e:
        load_spec([tuning_workspace(["http://127.0.0.1:9/a.parquet"], preset="phi-9")])
    assert e.value.exit_code == EXIT_USER_ERROR
    with pytest.raises(ValidationError, match="LoraConfig.rank: unknown key"):
        cm = training_configmap(lora={"rank": 8})
        load_spec([tuning_workspace(["http://127.0.0.1:9/a.parquet"], config="tiny-config"), cm])


def test_cli_reports_bad_input_in_one_line(data_server, tmp_path):
    from kaito_tuning.cli import main
    base, _ = data_server
    spec = tmp_path / "ws.yaml"
    spec.write_text(yaml.safe_dump(tuning_workspace([f"{base}/nocols.parquet"])))
    rc = main(["run", str(spec), "--output-dir", str(tmp_path / "out"), "--no-progress", "--allow-private-urls"])
    assert rc == EXIT_USER_ERROR
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["phase"] == "failed"


def test_hostpath_input(datasets_dir, tmp_path):
    ws, _ = load_spec([tuning_workspace(volume={"hostPath": {"path": str(datasets_dir["messages"].parent)}})])
    assert input_dir(ws, tmp_path) == datasets_dir["messages"].parent
    ws, _ = load_spec([tuning_workspace(volume={"persistentVolumeClaim": {"claimName": "x"}})])
    with pytest.raises(UserError, match="persistentVolumeClaim volume cannot be read outside Kubernetes"):
        input_dir(ws, tmp_path)


KAITO_LORA_PARAMS = """\
training_config:
  ModelConfig:
    torch_dtype: "bfloat16"
    local_files_only: true
    device_map: "auto"
  QuantizationConfig:
    load_in_4bit: false
  LoraConfig:
    r: 8
    lora_alpha: 8
    lora_dropout: 0.0
  TrainingArguments:
    output_dir: "/mnt/results"
    ddp_find_unused_parameters: false
    save_strategy: "no"
    per_device_train_batch_size: 1
  DataCollator:
    mlm: true
  DatasetConfig:
    shuffle_dataset: true
    train_test_split: 1
"""


def test_kaitos_default_configmap_trains_unchanged(data_server, tiny_phi3, tmp_path):
    """Kaito's chart ships this ConfigMap (lora-params-template) with every workspace: it must train as is."""
    base, _ = data_server
    ws = tuning_workspace([f"{base}/chat.parquet"], config="lora-params-template")
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "lora-params-template"},
          "data": {"training_config.yaml": KAITO_LORA_PARAMS}}
    result = run_local([ws, cm], output_dir=str(tmp_path / "out"), max_steps=2, model_dir=str(tiny_phi3),
                       allow_private_urls=True, show_progress=False)
    assert result.steps == 2
    meta = json.loads((tmp_path / "out" / "training_metadata.json").read_text())
    assert meta["rank"] == 8 and meta["loss_mask"] == "assistant_only"


KAITO_QLORA_PARAMS = KAITO_LORA_PARAMS.replace("""  QuantizationConfig:
    load_in_4bit: false""", """  QuantizationConfig:
    load_in_4bit: true
    bnb_4bit_quant_type: "nf4"
    bnb_4bit_compute_dtype: "bfloat16"
    bnb_4bit_use_double_quant: true""")


@pytest.mark.slow
@pytest.mark.parametrize("method,template", [("lora", KAITO_LORA_PARAMS), ("qlora", KAITO_QLORA_PARAMS)])
def test_kaitos_default_configmaps_train_smollm2_unchanged(data_server, tmp_path, method, template):
    """Kaito's chart ConfigMaps (lora-params-template, qlora-params-template) as they are, on the real SmolLM2 (the
    embedded default model) with its preset swapped in: local_files_only holds (the weights are made local
    first, never from the hub), bfloat16 becomes float32 on a CPU, mlm: true is TRL's collator, and it trains."""
    assert template.count("local_files_only: true") == 1 and "mlm: true" in template
    base, _ = data_server
    name = f"{method}-params-template"
    ws = tuning_workspace([f"{base}/chat.parquet"], preset="smollm2-135m-instruct", method=method, config=name)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
          "data": {"training_config.yaml": template}}
    result = run_local([ws, cm], output_dir=str(tmp_path / "out"), max_steps=2, allow_private_urls=True,
                       show_progress=False)
    meta = json.loads((tmp_path / "out" / "training_metadata.json").read_text())
    assert result.steps == meta["steps"] == 2 and meta["preset"] == "smollm2-135m-instruct"
    assert meta["rank"] == 8 and meta["lora_alpha"] == 8 and meta["dtype"] == "float32"
    assert bool(meta["quantization"]) == (method == "qlora")
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0


def test_a_rerun_of_a_finished_run_does_not_train_again(data_server, tiny_phi3, tmp_path):
    base, _ = data_server
    docs = [tuning_workspace([f"{base}/chat.parquet"], config="tiny-config"), training_configmap()]
    kw = dict(output_dir=str(tmp_path / "out"), max_steps=2, model_dir=str(tiny_phi3), allow_private_urls=True,
              show_progress=False)
    first = run_local(docs, **kw)
    stamp = (tmp_path / "out" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run_local(docs, **kw)
    assert not first.already_trained and again.already_trained and again.steps == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
