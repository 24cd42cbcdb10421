"""Base weights from an image, Kaito's way (issue 10): the Job's real download step with the env the
rendered Job gives it, no hub access (HF_HUB_OFFLINE=1), then the weights load with local_files_only;
and one `kaito-tuning run` end to end (2 steps on a tiny model) from a weights image."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_data import messages_rows, write_parquet

from kaito_tuning import contract as c
from kaito_tuning.artifacts import cached_weights, push_weights
from kaito_tuning.artifacts.errors import NoWeightsInImage, RegistryAuthFailed, RegistryUnreachable
from kaito_tuning.controller import manifests
from kaito_tuning.controller.settings import Settings
from kaito_tuning.errors import EXIT_TRANSIENT, EXIT_USER_ERROR
from kaito_tuning.spec.rules import load_workspace
from kaito_tuning.spec.training_config import load_config
from kaito_tuning.tuner import job

_spec = importlib.util.spec_from_file_location("weights_publishers", Path(__file__).parents[1] / "artifacts" /
                                               "test_weights.py")
publishers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(publishers)

#: Kaito's ModelConfig says the weights are local (they are in its image): it must hold here too
KAITO_SHAPED_CONFIG = """\
training_config:
  ModelConfig:
    pretrained_model_name_or_path: /workspace/tfs/weights
    local_files_only: true
  LoraConfig:
    r: 4
    lora_alpha: 8
    lora_dropout: 0.0
  TrainingArguments:
    output_dir: /mnt/results
    per_device_train_batch_size: 2
"""


def workspace(image: str | None, *, secrets: list[str] | None = None, data: dict | None = None) -> dict:
    preset: dict = {"name": "phi-3-mini-128k-instruct"}
    if image:
        preset["presetOptions"] = {"image": image, **({"imagePullSecrets": secrets} if secrets else {})}
    return {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "weights-ws",
                                                                                   "namespace": "team-a"},
            "resource": {"instanceType": "Standard_NC24ads_A100_v4",
                         "labelSelector": {"matchLabels": {"apps": "tuning"}}},
            "tuning": {"preset": preset, "method": "lora", "config": "kaito-config",
                       "input": data or {"volumeSource": {"persistentVolumeClaim": {"claimName": "data"}}},
                       "output": {"volumeSource": {"persistentVolumeClaim": {"claimName": "out"}}}}}


def job_env(ws_obj: dict, tmp: Path, auth_file: str | None, settings: Settings = Settings()) -> dict[str, str]:
    """The download container's environment as the operator renders it, the mounts mapped to ``tmp``."""
    ws = load_workspace(ws_obj)
    rendered = manifests.tuning_job(ws, settings, load_config(KAITO_SHAPED_CONFIG, "lora"))
    download = rendered["spec"]["template"]["spec"]["initContainers"][0]
    assert download["name"] == "download"
    env = {e["name"]: e["value"] for e in download["env"] if "value" in e}
    env[c.ENV_WORKSPACE] = manifests.workspace_secret(ws)["stringData"][manifests.WORKSPACE_SECRET_KEY]
    mounts = {c.HF_CACHE_DIR: tmp / "hf-cache", c.DATA_DIR: tmp / "data", c.PULL_SECRETS_DIR: tmp / "pull-secrets"}
    for k, v in list(env.items()):
        for mount, local in mounts.items():
            if v == mount or v.startswith(mount + "/"):
                env[k] = str(local) + v[len(mount):]
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / c.CONFIG_KEY).write_text(KAITO_SHAPED_CONFIG)
    if auth_file and c.ENV_PULL_SECRETS_DIR in env:  # the projected dockerconfigjson secrets
        (tmp / "pull-secrets").mkdir(exist_ok=True)
        for secret in ws_obj["tuning"]["preset"]["presetOptions"].get("imagePullSecrets") or []:
            shutil.copy(auth_file, tmp / "pull-secrets" / f"{secret}.json")
    env.update({c.ENV_CONFIG_DIR: str(tmp / "config"), c.ENV_OUTPUT_DIR: str(tmp / "results"),
                c.ENV_TERMINATION_LOG: str(tmp / "termination-log"), c.ENV_PLAIN_HTTP: "1",
                "HF_HUB_OFFLINE": "1"})
    return env


def assert_loads_offline(model_dir: str, expected: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    ref = AutoModelForCausalLM.from_pretrained(expected, local_files_only=True)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert AutoTokenizer.from_pretrained(model_dir, local_files_only=True).eos_token == "<|end|>"


@pytest.mark.parametrize("shape", ["artifact", "image"])
def test_download_step_pulls_the_weights_image_with_the_rendered_env_and_no_hub(shape, registry, tiny_phi3,
                                                                                tmp_path):
    image = f"{registry.host}/models/tiny-phi3-{shape}:0.2.0"
    if shape == "artifact":
        push_weights(tiny_phi3, image, auth_file=registry.auth_file, plain_http=True)
    else:
        files = publishers.model_files_in_image(tiny_phi3, "workspace/weights")
        publishers.push_image_with_skopeo(files, registry, image.split("/", 1)[1], tmp_path,
                                          symlinks={"workspace/tfs/weights": "/workspace/weights"})
    env = job_env(workspace(image, secrets=["weights-cred"]), tmp_path / "pod", registry.auth_file)
    assert env[c.ENV_WEIGHTS_IMAGE] == image and env[c.ENV_PULL_SECRETS_DIR].endswith("pull-secrets")
    empty_hub = tmp_path / "empty-hf-home"
    run = subprocess.run([sys.executable, "-m", "kaito_tuning.cli", "job", "download"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, **env, "HF_HOME": str(empty_hub)})
    assert run.returncode == 0, run.stderr[-2000:]
    got = cached_weights(image, env[c.ENV_WEIGHTS_DIR])
    assert got is not None and got.shape == shape
    assert Path(got.model_dir).is_relative_to(tmp_path / "pod" / "hf-cache")  # the cache volume the steps share
    assert_loads_offline(got.model_dir, tiny_phi3)
    assert not empty_hub.exists() or not any(empty_hub.rglob("*.safetensors"))  # nothing from the hub

    # the train step (no pull secrets mounted) finds the same weights without the registry
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv(c.ENV_PULL_SECRETS_DIR)
        plan = job.plan_from_env()
        from kaito_tuning.tuner.pipeline import fetch_weights

        assert plan.weights_image == image and str(fetch_weights(plan)) == got.model_dir


def _step_fails(env: dict, monkeypatch) -> tuple[Exception, str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Exception) as e:
        job.run_step("download")
    return e.value, Path(env[c.ENV_TERMINATION_LOG]).read_text()


def test_download_step_wrong_password_fails_once_with_one_line_and_no_secret(registry, tiny_phi3, tmp_path,
                                                                              monkeypatch):
    image = f"{registry.host}/models/tiny-auth:1"
    push_weights(tiny_phi3, image, auth_file=registry.auth_file, plain_http=True)
    bad = tmp_path / "bad.json"
    secret = "wrong-password-0451"
    import base64

    bad.write_text(json.dumps({"auths": {registry.host: {"auth": base64.b64encode(f"tester:{secret}".encode()).decode()}}}))
    err, told = _step_fails(job_env(workspace(image, secrets=["weights-cred"]), tmp_path / "pod", str(bad)),
                            monkeypatch)
    assert isinstance(err, RegistryAuthFailed) and err.exit_code == EXIT_USER_ERROR
    assert told.startswith("RegistryAuthFailed") and "\n" not in told.strip() and secret not in told


def test_download_step_unreachable_registry_is_transient(tmp_path, monkeypatch, no_sleep_retry):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err, told = _step_fails(job_env(workspace(f"127.0.0.1:{port}/models/x:1"), tmp_path / "pod", None), monkeypatch)
    assert isinstance(err, RegistryUnreachable) and err.exit_code == EXIT_TRANSIENT
    assert told.startswith("RegistryUnreachable") and f"127.0.0.1:{port}" in told


def test_download_step_image_without_config_json_says_what_was_expected(registry, tmp_path, monkeypatch):
    publishers.push_image_with_skopeo({"workspace/weights/readme.txt": "no model here"}, registry,
                                      "models/empty:1", tmp_path)
    image = f"{registry.host}/models/empty:1"
    err, told = _step_fails(job_env(workspace(image, secrets=["weights-cred"]), tmp_path / "pod",
                                    registry.auth_file), monkeypatch)
    assert isinstance(err, NoWeightsInImage) and err.exit_code == EXIT_USER_ERROR
    assert image in told and "config.json" in told and "/workspace/weights" in told


@pytest.fixture()
def no_sleep_retry(monkeypatch):
    from kaito_tuning import retry

    monkeypatch.setattr(retry, "sleep", lambda s: None)


def test_operator_preset_registry_names_kaitos_artifact(registry, tiny_phi3, tmp_path, monkeypatch):
    """KAITO_PRESET_REGISTRY (Kaito's PRESET_REGISTRY_NAME) + the preset's tag: <registry>/kaito-<model>:<tag>."""
    push_weights(tiny_phi3, f"{registry.host}/aks/kaito/kaito-phi-3-mini-128k-instruct:0.2.0",
                 auth_file=registry.auth_file, plain_http=True)
    env = job_env(workspace(None), tmp_path / "pod", None, Settings(preset_registry=f"{registry.host}/aks/kaito"))
    assert env[c.ENV_WEIGHTS_IMAGE] == f"{registry.host}/aks/kaito/kaito-phi-3-mini-128k-instruct:0.2.0"
    # no preset pull secrets here: the operator's registry credentials come through the node or anonymous
    # pulls; this registry wants a password, so give the step the auth folder as a projected secret would
    (tmp_path / "pod" / "pull-secrets").mkdir()
    shutil.copy(registry.auth_file, tmp_path / "pod" / "pull-secrets" / "cred.json")
    env[c.ENV_PULL_SECRETS_DIR] = str(tmp_path / "pod" / "pull-secrets")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert job.run_step("download") == 0
    got = cached_weights(env[c.ENV_WEIGHTS_IMAGE], env[c.ENV_WEIGHTS_DIR])
    assert got is not None
    assert_loads_offline(got.model_dir, tiny_phi3)


def test_admission_names_the_field_of_a_bad_weights_image(tmp_path, capsys):
    from kaito_tuning import cli

    f = tmp_path / "ws.yaml"
    f.write_text(yaml.safe_dump(workspace("registry.example/Bad Name:1")))
    assert cli.main(["validate", str(f)]) != 0
    out = capsys.readouterr()
    assert "tuning.preset.presetOptions.image" in out.out + out.err


def test_kaito_tuning_run_trains_two_steps_from_a_weights_image_without_the_hub(registry, tiny_phi3, tmp_path):
    image = f"{registry.host}/models/tiny-e2e:0.2.0"
    push_weights(tiny_phi3, image, auth_file=registry.auth_file, plain_http=True)
    data = tmp_path / "data"
    data.mkdir()
    write_parquet(data / "chat.parquet", messages_rows(repeat=1))
    ws = workspace(image, data={"volumeSource": {"hostPath": {"path": str(data)}}})
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kaito-config"},
          "data": {c.CONFIG_KEY: KAITO_SHAPED_CONFIG}}
    spec = tmp_path / "ws.yaml"
    spec.write_text(yaml.safe_dump_all([ws, cm]))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), c.ENV_CACHE_DIR: str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "kaito_tuning.cli", "run", str(spec), "--output-dir", str(out),
                          "--max-steps", "2", "--auth-file", registry.auth_file, "--plain-http", "--no-push",
                          "--no-progress"], capture_output=True, text=True, timeout=500, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["steps"] == 2 and (out / "adapter_model.safetensors").is_file()
    assert cached_weights(image, tmp_path / "cache" / "weights") is not None
    assert f"base weights of phi-3-mini-128k-instruct from {image}" in run.stderr + run.stdout


@pytest.mark.parametrize("named_by", ["presetOptions.image", "--weights-image"])
def test_kaito_tuning_run_without_the_password_exits_65_in_one_line(registry, tiny_phi3, tmp_path, named_by):
    image = f"{registry.host}/models/tiny-nopass:1"
    push_weights(tiny_phi3, image, auth_file=registry.auth_file, plain_http=True)
    data = tmp_path / "data"
    data.mkdir()
    write_parquet(data / "chat.parquet", messages_rows(repeat=1))
    spec = tmp_path / "ws.yaml"
    ws = workspace(image if named_by == "presetOptions.image" else None,
                   data={"volumeSource": {"hostPath": {"path": str(data)}}})
    del ws["tuning"]["config"]  # the method's defaults
    spec.write_text(yaml.safe_dump(ws))
    flag = ["--weights-image", image] if named_by == "--weights-image" else []
    run = subprocess.run([sys.executable, "-m", "kaito_tuning.cli", "run", str(spec), "--output-dir",
                          str(tmp_path / "out"), "--plain-http", "--no-push", "--no-progress", *flag], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                      c.ENV_CACHE_DIR: str(tmp_path / "cache")})
    assert run.returncode == EXIT_USER_ERROR, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "RegistryAuthFailed" in last and "Traceback" not in run.stderr
