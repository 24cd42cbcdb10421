"""`kaito-tuning validate`: exit 0 valid, 1 with `FILE: field.path: message` lines, 2 unreadable."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from kaito_tuning.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(str(p) for p in (ROOT / "examples").rglob("*.yaml"))


@pytest.fixture
def validate(capsys, monkeypatch):
    """``kaito-tuning validate FILES`` through the CLI's own main (the output is what is tested)."""
    def run(*files, input=None):
        if input is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(input))
        rc = main(["validate", *map(str, files)])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def test_the_installed_entry_point_exits_with_the_codes(tmp_path):
    """Once through a real interpreter: exit codes 0 / 1 / 2 as a shell sees them."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text()
                   .replace("method: qlora", "method: full"))
    codes = [subprocess.run([sys.executable, "-m", "kaito_tuning.cli", "validate", str(f)], capture_output=True,
                            timeout=120).returncode
             for f in (ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml", bad, tmp_path / "nope.yaml")]
    assert codes == [0, 1, 2]


def test_examples_are_valid(validate):
    rc, out, err = validate(*EXAMPLES)
    assert (rc, out) == (0, ""), err


def test_problems_one_line_each(tmp_path, validate):
    f = tmp_path / "ws.yaml"
    text = (ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text()
    f.write_text(text.replace("method: qlora", "method: full").replace('"https://', '"ftp://'))
    rc, out, _ = validate(f)
    assert rc == 1
    lines = out.strip().splitlines()
    assert f"{f}: tuning.method: 'full' is not supported: use lora or qlora" in lines
    assert any(line.startswith(f"{f}: tuning.input.urls[0]: ") and "only http and https" in line for line in lines)
    assert "Traceback" not in out


def test_configmap_in_the_same_file_is_checked_with_its_workspace(tmp_path, validate):
    text = (ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3_with_configmap.yaml").read_text()
    f = tmp_path / "ws.yaml"
    f.write_text(text.replace("        r: 16", "        rank: 16").replace("load_in_4bit: true", "load_in_4bit: \"yes\""))
    rc, out, _ = validate(f)
    assert rc == 1
    assert f"{f}: ConfigMap phi-3-qlora-params: LoraConfig.rank: unknown key for peft.LoraConfig; did you mean 'r'?" in out
    assert "QuantizationConfig.load_in_4bit: must be true or false" in out
    # a qlora workspace whose ConfigMap turns quantization off
    f.write_text(text.replace("load_in_4bit: true", "load_in_4bit: false"))
    rc, out, _ = validate(f)
    assert rc == 1 and "method qlora needs a quantized base" in out


@pytest.mark.parametrize("content,words", [
    ("", "is empty"),
    ("key: [unclosed", "is not valid YAML"),
    ("\x00\x01binary", "is not valid YAML"),
    ("- just\n- a list\n", "is a list, not a Kubernetes object"),
])
def test_unreadable_or_not_yaml_exits_2(tmp_path, content, words, validate):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    rc, out, err = validate(f)
    assert rc == 2 and words in err and "Traceback" not in err


def test_missing_file_and_stdin(tmp_path, validate):
    rc, _, err = validate(tmp_path / "nope.yaml")
    assert rc == 2 and "no such file" in err
    text = (ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text()
    assert validate("-", input=text)[0] == 0


def test_both_tuning_and_inference(tmp_path, validate):
    text = (ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml").read_text()
    f = tmp_path / "ws.yaml"
    f.write_text(text + "inference:\n  preset:\n    name: phi-3-mini-128k-instruct\n")
    rc, out, _ = validate(f)
    assert rc == 1 and "either tuning or inference, not both" in out


SHAPES = Path(__file__).parent / "kaito_shapes"


@pytest.mark.parametrize("name", ["workspace_tuning_pvc_volumes.yaml", "configmap_qlora_kaito_keys.yaml",
                                  "workspace_v1beta1_full.yaml"])
def test_kaito_shaped_files_validate(name, validate):
    rc, out, err = validate(SHAPES / name)
    assert (rc, out) == (0, ""), out + err


def test_other_kinds_are_checked_against_the_kubernetes_schema(tmp_path, validate):
    text = (SHAPES / "workspace_tuning_pvc_volumes.yaml").read_text()
    f = tmp_path / "ws.yaml"
    f.write_text(text.replace("accessModes: [ReadWriteMany]", "accessModes: [ReadWriteMany]\n  volumeMode: 7", 1))
    rc, out, _ = validate(f)
    assert rc == 1 and "PersistentVolumeClaim training-data-claim: spec.volumeMode: " in out, out
    assert "neither a Workspace nor a ConfigMap" not in out
    f.write_text(text + "---\napiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\nspec: {x: 1}\n")
    assert validate(f)[:2] == (0, "")  # a kind Kubernetes' schema does not know is passed over
