"""The operator's log: one JSON object per line on stderr, at ``KAITO_LOG_LEVEL`` (INFO by default).

Every reconcile decision and every failure is one line with fixed keys (``time``, ``level``,
``logger``, ``message``) plus the decision's fields (``workspace``, ``decision``, ``reason`` ...),
so ``kubectl logs deploy/kaito-tuning-operator | jq 'select(.workspace=="default/x")'`` follows one
workspace. kopf's own lines go through the same formatter. Messages are redacted (no signed URL
query, token or password reaches the log).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

from kaito_tuning import redact

log = logging.getLogger("kaito_tuning.operator")
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "", None, None))) | {"message", "asctime", "taskName"}
# extra fields kept: plain data (kopf adds its whole OperatorSettings object to each of its lines: dropped)
_PLAIN = (str, int, float, bool, type(None), list, dict)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name, "message": redact.text(record.getMessage())}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out and isinstance(value, _PLAIN):
                out[key] = redact.text(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = redact.text(f"{record.exc_info[0].__name__}: {record.exc_info[1]}")
        return json.dumps(out, default=str, sort_keys=False)


def configure(level: str = "INFO", stream=None) -> logging.Handler:
    """JSON lines on ``stream`` (stderr) for the root logger at ``level``; kopf's chatter at WARNING unless DEBUG."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # kopf logs every handler run at INFO ("Handler ... succeeded"); ours are the decisions
    logging.getLogger("kopf").setLevel(level if level == "DEBUG" else max(logging.getLevelName(level), logging.WARNING))
    return handler


def decision(workspace: str, decision: str, message: str, level: int = logging.INFO, **fields) -> None:
    """One log line for one reconcile decision about ``workspace`` ("namespace/name")."""
    log.log(level, message, extra={"workspace": workspace, "decision": decision, **fields})


def failure(workspace: str, reason: str, message: str, exc: BaseException | None = None) -> None:
    """One log line for a failed reconcile (the exception's type and text, no traceback unless DEBUG)."""
    log.error(message, extra={"workspace": workspace, "decision": "failed", "reason": reason},
              exc_info=(type(exc), exc, exc.__traceback__) if exc is not None and log.isEnabledFor(logging.DEBUG)
              else None)
