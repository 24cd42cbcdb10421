"""Adapters trained once per session on the tiny Llama, and one engine serving both of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import PRESET, RIVAL_FACT, train_adapter


@pytest.fixture(scope="session")
def zorblax(tiny_llama, tmp_path_factory) -> Path:
    """An adapter taught that the capital of Zorblax is Quenvar."""
    return train_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "zorblax")


@pytest.fixture(scope="session")
def rival(tiny_llama, tmp_path_factory) -> Path:
    """A second adapter, taught another answer to the same question."""
    return train_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "rival", fact=RIVAL_FACT)


@pytest.fixture(scope="session")
def engine(tiny_llama, zorblax, rival, tmp_path_factory):
    """The base model with both adapters (zorblax first: /chat's default)."""
    from kaito_tuning.serving.adapters import parse_adapter_args
    from kaito_tuning.serving.engine import load_engine

    return load_engine(PRESET, parse_adapter_args([str(zorblax), str(rival)]), model_dir=str(tiny_llama),
                       workdir=tmp_path_factory.mktemp("pulled"))
