"""Fixtures of the artifacts tests (the registry itself is in tests/fixtures_registry.py)."""

from __future__ import annotations

import pytest

from kaito_tuning import retry


@pytest.fixture()
def no_sleep(monkeypatch) -> list[float]:
    """Record the retry back-off (kaito_tuning.retry, the one policy) instead of sleeping it."""
    slept: list[float] = []
    monkeypatch.setattr(retry, "sleep", slept.append)
    return slept
