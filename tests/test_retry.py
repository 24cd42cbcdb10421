"""The one retry policy (kaito_tuning/retry.py)."""

from __future__ import annotations

import pytest

from kaito_tuning import retry
from kaito_tuning.errors import TransientError, UserError


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(retry, "sleep", waits.append)
    return waits


def failing(times: int, exc: BaseException):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return len(calls)
    return fn, calls


def test_transient_failures_are_retried_with_exponential_backoff(slept):
    fn, calls = failing(3, TransientError("503 from the server"))
    assert retry.call(fn, attempts=4) == 4
    assert slept == [1.0, 2.0, 4.0]


def test_the_last_failure_is_raised_after_the_last_attempt(slept):
    fn, calls = failing(10, TransientError("still down"))
    with pytest.raises(TransientError, match="still down"):
        retry.call(fn, attempts=3)
    assert len(calls) == 3 and slept == [1.0, 2.0]


def test_user_errors_are_never_retried(slept):
    fn, calls = failing(1, UserError("401 unauthorized"))
    with pytest.raises(UserError):
        retry.call(fn)
    assert len(calls) == 1 and slept == []


def test_retry_after_is_honoured_and_capped(slept):
    e = TransientError("429")
    e.retry_after = 7
    big = TransientError("429")
    big.retry_after = 3600
    seq = iter([e, big])

    def fn():
        exc = next(seq, None)
        if exc:
            raise exc
        return "ok"
    assert retry.call(fn) == "ok"
    assert slept == [7.0, retry.MAX_DELAY_S]


def test_backoff_is_bounded():
    assert [retry.backoff(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert retry.backoff(50) == retry.MAX_DELAY_S
