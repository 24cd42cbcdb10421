"""``kaito-tuning push`` / ``pull``: JSON on stdout, one-line errors with sysexits codes."""

from __future__ import annotations

import json

import requests
from fixtures_registry import REGISTRY_PASSWORD, REGISTRY_USER

from kaito_tuning import cli
from kaito_tuning.artifacts import layers

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_metadata.json"]


def test_cli_push_and_pull_print_json(fake_adapter, registry, tmp_path, capsys):
    image = f"{registry.host}/adapters/cli:2"
    assert cli.main(["push", str(fake_adapter), image, "--auth-file", registry.auth_file, "--plain-http",
                     "--annotation", "org.opencontainers.image.source=https://example.com/repo"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["reference"] == image and pushed["digest"].startswith("sha256:")
    assert pushed["image"] == f"{registry.host}/adapters/cli@{pushed['digest']}"
    assert cli.main(["pull", image, str(tmp_path / "got"), "--auth-file", registry.auth_file, "--plain-http"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["digest"] == pushed["digest"] and pulled["files"] == ADAPTER_FILES
    manifest = requests.get(f"{registry.url}/v2/adapters/cli/manifests/2", auth=(REGISTRY_USER, REGISTRY_PASSWORD),
                            headers={"Accept": layers.MEDIA_MANIFEST}, timeout=10).json()
    assert manifest["annotations"]["org.opencontainers.image.source"] == "https://example.com/repo"

    assert cli.main(["push", str(fake_adapter), image, "--annotation", "novalue", "--plain-http"]) == 65
    assert "InvalidAnnotation" in capsys.readouterr().err


def test_cli_errors_are_one_line_with_the_right_exit_code(fake_adapter, registry, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auths": {registry.host: {"username": REGISTRY_USER, "password": "hunter2"}}}))
    assert cli.main(["push", str(fake_adapter), f"{registry.host}/a/b:1", "--auth-file", str(bad),
                     "--plain-http"]) == 65
    err = capsys.readouterr().err
    assert err.startswith("error: RegistryAuthFailed: ") and err.count("\n") == 1 and "hunter2" not in err
    assert cli.main(["pull", f"{registry.host}/a/missing:1", str(tmp_path / "x"), "--auth-file", registry.auth_file,
                     "--plain-http"]) == 65
    assert "ImageNotFound" in capsys.readouterr().err
