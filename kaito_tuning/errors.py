"""Errors split by intent, as kopf does: the user must change something, or trying again may help.

Every error that reaches a user carries a CamelCase ``reason`` a script can match and a
``message`` a person can act on. Where the problem is in a spec or config it also names the
``field`` (``tuning.input.urls[1]``, ``LoraConfig.rank``) or the file.

Exit codes of the tuner (and of every CLI command that is not ``validate``) follow sysexits,
and the operator's Job ``podFailurePolicy`` keys on them: a user error fails the Job at once,
anything else is retried up to ``backoffLimit``.
"""

from __future__ import annotations

EXIT_USER_ERROR = 65  # EX_DATAERR: bad spec, config or dataset: do not retry
EXIT_OUT_OF_MEMORY = 66  # the model/batch does not fit: retrying will not help either
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: network, registry, disruption: retry


class KaitoError(Exception):
    """Base of all errors we report to users."""

    reason = "Error"
    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if reason:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def one_line(self) -> str:
        """``Reason: field: message`` on one line, for /dev/termination-log and status."""
        text = " ".join(str(self).split())
        return f"{self.reason}: {text}"


class UserError(KaitoError):
    """The input is wrong; the user must change the spec, config or data. Never retried."""

    reason = "InvalidInput"
    exit_code = EXIT_USER_ERROR


class ValidationError(UserError):
    """A spec or config failed validation: carries every problem found, not just the first."""

    reason = "InvalidSpec"

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class TransientError(KaitoError):
    """Something outside the user's control failed (network, registry, node); retrying may help."""

    reason = "Transient"
    exit_code = EXIT_TRANSIENT


class OutOfMemoryError(KaitoError):
    reason = "OutOfMemory"
    exit_code = EXIT_OUT_OF_MEMORY


class Problem:
    """One validation finding: where (a field path or Section.key) and what to fix."""

    __slots__ = ("path", "message")

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __repr__(self) -> str:
        return f"Problem({self.path!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and (self.path, self.message) == (other.path, other.message)

    def __hash__(self) -> int:
        return hash((self.path, self.message))
