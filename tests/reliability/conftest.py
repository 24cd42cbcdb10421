"""Fixtures of the fault-injection suite (the helpers they use are in helpers.py)."""

from __future__ import annotations

import pytest

from kaito_tuning import retry

from .helpers import JobPod, Scripted


@pytest.fixture()
def waits(monkeypatch) -> list[float]:
    """The back-off of the one retry policy, recorded instead of slept (in-process runs only)."""
    slept: list[float] = []
    monkeypatch.setattr(retry, "sleep", slept.append)
    return slept


@pytest.fixture()
def pod(tmp_path, tiny_phi3, monkeypatch) -> JobPod:
    return JobPod(tmp_path / "pod", tiny_phi3, monkeypatch)


@pytest.fixture()
def scripted(datasets_dir):
    """A Scripted server holding chat.parquet, alpaca.parquet and chat.jsonl from the shared datasets."""
    s = Scripted({f"/{name}": datasets_dir[key].read_bytes()
                  for name, key in (("chat.parquet", "messages"), ("alpaca.parquet", "alpaca"),
                                    ("chat.jsonl", "jsonl"))})
    yield s
    s.close()


