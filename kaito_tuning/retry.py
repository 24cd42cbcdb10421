"""The one retry policy: which failures are retried, how often, and how long to wait (tenacity).

Dataset downloads and registry calls both retry *transient* failures only (``TransientError``:
5xx, 429, timeouts, dropped connections) and never a user's error (401/403/404, bad data), with the
same exponential backoff: ``attempts`` tries in all, sleeping 1, 2, 4, … s (at most 30 s) between
them, or what a ``Retry-After`` asked for when the failure carries one (``retry_after`` attribute,
capped at 30 s). ``sleep`` is module-level so tests can record the waits instead of waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from kaito_tuning.errors import TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_ATTEMPTS = 4          # one try and three retries
BASE_DELAY_S = 1.0
MAX_DELAY_S = 30.0


def sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


def backoff(retry_number: int, base: float = BASE_DELAY_S) -> float:
    """Seconds before retry number ``retry_number`` (1-based): base, 2·base, 4·base, … at most 30 s."""
    return min(base * 2 ** (retry_number - 1), MAX_DELAY_S)


def _wait(base: float) -> Callable[[tenacity.RetryCallState], float]:
    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        if isinstance(asked, (int, float)) and asked >= 0:
            return min(float(asked), MAX_DELAY_S)
        return backoff(state.attempt_number, base)
    return wait


def _log(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.info("attempt %d failed (%s); retrying in %.1f s", state.attempt_number, exc,
             state.next_action.sleep if state.next_action else 0)


def call(fn: Callable[[], T], *, attempts: int = DEFAULT_ATTEMPTS, base_delay: float = BASE_DELAY_S,
         retry_on: tuple[type[BaseException], ...] = (TransientError,)) -> T:
    """``fn()``, retried on ``retry_on`` up to ``attempts`` tries in all; the last failure is raised as is."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(1, attempts)),
        wait=_wait(base_delay),
        retry=tenacity.retry_if_exception_type(retry_on),
        sleep=lambda s: sleep(s),
        before_sleep=_log,
        reraise=True,
    )
    return retrying(fn)
