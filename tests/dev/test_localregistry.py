"""LocalRegistry (kaito_tuning/dev/localregistry.py): the throwaway registry of the tests and the demo."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import requests


def test_local_registry_cleans_up_and_checks_its_password(registry):
    from kaito_tuning.dev.localregistry import LocalRegistry

    with LocalRegistry(user="demo", password="pw") as reg:
        proc, root = reg._proc, reg.root
        config = json.loads(Path(reg.auth_file).read_text())
        assert base64.b64decode(config["auths"][reg.host]["auth"]) == b"demo:pw"
        assert requests.get(f"{reg.url}/v2/", auth=("demo", "pw"), timeout=5).status_code == 200
        assert requests.get(f"{reg.url}/v2/", auth=("demo", "bad"), timeout=5).status_code == 401
    assert proc.poll() is not None and not root.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{reg.url}/v2/", timeout=2)


def test_local_registry_without_the_binary_says_what_to_install(monkeypatch):
    from kaito_tuning.dev import localregistry

    monkeypatch.setattr(localregistry.shutil, "which", lambda name: None)
    with pytest.raises(localregistry.RegistryNotInstalled, match="apt-get install docker-registry"):
        localregistry.LocalRegistry().start()
