"""Registry fixtures: a real docker-registry (htpasswd) for the session, its auth file, tiny adapters.

``registry`` starts Debian's docker-registry once per session (about 0.1 s) and stops it at the end;
``fake_adapter`` writes a small but valid PEFT-shaped adapter (no torch needed).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from kaito_tuning.localregistry import LocalRegistry

REGISTRY_USER = "tester"
REGISTRY_PASSWORD = "correct horse battery staple"


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    """A safetensors file of F32 tensors: {name: (shape, raw little-endian bytes)}."""
    header, offset = {}, 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(d for _, d in tensors.values()))


def make_fake_adapter(directory: Path, *, rank: int = 8, seed: int = 0, metadata: bool = True) -> Path:
    """An adapter directory as our trainer writes it: config, safetensors weights, metadata, README."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }, indent=2))
    weights = {f"base_model.model.layers.0.self_attn.{m}.lora_{ab}.weight":
               ([rank, 16] if ab == "A" else [16, rank], bytes((seed + i) % 256 for i in range(rank * 16 * 4)))
               for m in ("q_proj", "v_proj") for ab in ("A", "B")}
    write_safetensors(directory / "adapter_model.safetensors", weights)
    if metadata:
        (directory / "training_metadata.json").write_text(json.dumps({
            "preset": "smollm2-135m-instruct", "method": "qlora",
            "baseModel": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "datasetDigests": ["sha256:" + "ab" * 32], "finishedAt": "2026-01-02T03:04:05Z",
        }, indent=2))
        (directory / "README.md").write_text("# a test adapter\n")
    return directory


@pytest.fixture(scope="session")
def registry():
    """A running docker-registry with htpasswd auth (user tester); skipped if not installed."""
    if not (shutil.which("docker-registry") or shutil.which("registry")):
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    with LocalRegistry(user=REGISTRY_USER, password=REGISTRY_PASSWORD) as reg:
        yield reg


@pytest.fixture()
def registry_auth_file(registry) -> str:
    """A docker config.json with the registry's credentials (auths[host].auth)."""
    return registry.auth_file


@pytest.fixture()
def fake_adapter(tmp_path) -> Path:
    return make_fake_adapter(tmp_path / "adapter")
