"""What users get: the wheel, installed non-editable into a fresh venv with only the operator's extra.

The tests' own environment is an editable install, which hides files the wheel lacks (the presets
were once missing from it, so the operator image failed at start). This builds the wheel as the
Dockerfiles do and runs the operator image's commands from a venv that has no torch.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"

pytestmark = pytest.mark.timeout(600)


def run(*argv, cwd, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=500, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def operator_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", work / "dist", ROOT, cwd=work)
    (wheel,) = (work / "dist").glob("kaito_tuning-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    run(env_dir / "bin/pip", "install", "-q", "--disable-pip-version-check",
        "-c", ROOT / "requirements/constraints.txt", f"{wheel}[operator]", cwd=work)
    return env_dir


def test_the_wheel_carries_presets_and_default_configs(operator_venv, tmp_path):
    site = run(operator_venv / "bin/python", "-c", "import kaito_tuning, os; print(os.path.dirname(kaito_tuning.__file__))",
               cwd=tmp_path).stdout.strip()
    assert "site-packages" in site, "not the installed wheel"
    shipped = {p.name for p in Path(site, "spec/presets").glob("*.yaml")}
    assert shipped == {p.name for p in (ROOT / "kaito_tuning/spec/presets").glob("*.yaml")}
    for f in ("lora-params.yaml", "qlora-params.yaml", "config_fields.json"):
        assert Path(site, "spec/data", f).is_file()


def test_the_operator_image_commands_run_without_torch(operator_venv, tmp_path):
    exe = operator_venv / "bin/kaito-tuning"
    presets = run(exe, "presets", cwd=tmp_path).stdout
    assert "phi-3-mini-128k-instruct" in presets and "smollm2-135m-instruct" in presets
    rendered = run(exe, "render", QUICK, cwd=tmp_path).stdout
    here = run(sys.executable, "-m", "kaito_tuning.cli", "render", QUICK, cwd=tmp_path).stdout
    assert rendered == here and "kind: Job" in rendered
    checked = run(exe, "validate", QUICK, cwd=tmp_path)
    assert (checked.stdout + checked.stderr).strip().endswith("valid")
    assert "--namespace" in run(exe, "operator", "--help", cwd=tmp_path).stdout
    # no cluster here: a one-line error, not a traceback
    no_cluster = run(exe, "operator", cwd=tmp_path, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert no_cluster.returncode == 65 and "Traceback" not in no_cluster.stderr
    assert "no cluster to talk to" in no_cluster.stderr
    missing = run(operator_venv / "bin/python", "-c",
                  "import importlib.util as u; print([m for m in ('torch', 'transformers', 'trl', 'peft') if u.find_spec(m)])",
                  cwd=tmp_path).stdout.strip()
    assert missing == "[]"
