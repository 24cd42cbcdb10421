"""Fixtures of the fault-injection suite (the helpers they use are in helpers.py)."""

from __future__ import annotations

import json

import pytest
from fixtures_data import messages_rows

from kaito_tuning import retry

from .helpers import JobPod, Scripted
from .operator_faults import Zygote


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
    """A Scripted server holding chat.parquet, alpaca.parquet and chat.jsonl from the shared datasets, and
    big.jsonl (about 190 KB: a cut after the first 64 KiB chunks leaves something to resume)."""
    files = {f"/{name}": datasets_dir[key].read_bytes()
             for name, key in (("chat.parquet", "messages"), ("alpaca.parquet", "alpaca"), ("chat.jsonl", "jsonl"))}
    files["/big.jsonl"] = "".join(json.dumps(r) + "\n" for r in messages_rows(100)).encode()
    s = Scripted(files)
    yield s
    s.close()




@pytest.fixture(scope="module")
def zygote():
    """Forks operator processes that have their imports done (tests/reliability/operator_faults.py)."""
    z = Zygote()
    yield z
    z.close()
