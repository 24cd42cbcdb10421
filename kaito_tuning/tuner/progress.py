"""Progress and failure reporting of a training run.

- ``Progress``: the run's state (phase, step, losses, tokens/s, ETA), written atomically to a JSON
  file at every change and served over HTTP (``GET /progress`` JSON, ``GET /metrics`` Prometheus
  text) for the operator to poll.
- ``ProgressCallback``: a ``transformers.TrainerCallback`` that feeds it from the trainer.
- ``write_termination``: the one line the operator shows when the pod ends
  (``$KAITO_TERMINATION_LOG``, default ``/dev/termination-log`` when it is writable).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PORT = 5000
PHASES = ("starting", "downloading", "loading", "training", "evaluating", "saving", "pushing", "succeeded", "failed")
_FIELDS = ("phase", "step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_second",
           "eta_seconds", "updated_at")


class Progress:
    """Thread-safe progress state; every ``update`` rewrites the file and the metrics."""

    def __init__(self, path: str | Path | None = None):
        from prometheus_client import CollectorRegistry, Gauge

        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self.state: dict = {k: None for k in _FIELDS}
        self.state.update(phase="starting", step=0)
        self.registry = CollectorRegistry()
        g = lambda name, doc: Gauge(f"kaito_tuning_{name}", doc, registry=self.registry)  # noqa: E731
        self._gauges = {
            "step": g("step", "optimizer steps done"),
            "total_steps": g("total_steps", "optimizer steps planned"),
            "epoch": g("epoch", "epochs done (fractional)"),
            "loss": g("train_loss", "latest training loss"),
            "eval_loss": g("eval_loss", "latest evaluation loss"),
            "learning_rate": g("learning_rate", "current learning rate"),
            "tokens_per_second": g("tokens_per_second", "training tokens per second"),
            "eta_seconds": g("eta_seconds", "estimated seconds to the end of training"),
        }
        self._phase = Gauge("kaito_tuning_phase", "1 for the current phase", ["phase"], registry=self.registry)
        self._server: ThreadingHTTPServer | None = None
        self.update()

    def update(self, **fields) -> None:
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise KeyError(f"unknown progress fields: {sorted(unknown)}")
        with self._lock:
            self.state.update(fields)
            self.state["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            for k, gauge in self._gauges.items():
                if self.state.get(k) is not None:
                    gauge.set(self.state[k])
            for ph in PHASES:
                self._phase.labels(ph).set(1 if ph == self.state["phase"] else 0)
            snapshot = dict(self.state)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(snapshot))
            os.replace(tmp, self.path)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.state)

    def metrics(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # -------------------------------------------------------------- HTTP

    def serve(self, port: int = DEFAULT_PORT, host: str = "0.0.0.0") -> int | None:
        """Serve /progress and /metrics in a daemon thread; return the bound port.

        ``port`` 0 turns the server off (returns None); -1 binds any free port (tests)."""
        if port == 0:
            return None
        progress = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] == "/progress":
                    body, ctype = json.dumps(progress.snapshot()).encode(), "application/json"
                elif self.path.split("?")[0] == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    body, ctype = progress.metrics(), CONTENT_TYPE_LATEST
                else:
                    self.send_error(404, "try /progress or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, 0 if port == -1 else port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="progress-http", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def progress_port() -> int:
    """$KAITO_PROGRESS_PORT (0 turns the server off), default 5000."""
    return int(os.environ.get("KAITO_PROGRESS_PORT", DEFAULT_PORT))


def make_callback(progress: Progress):
    """A TrainerCallback that reports the trainer's state into ``progress``."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.step0 = 0
            self.tokens0 = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0 = time.monotonic(), state.global_step
            progress.update(phase="training", step=state.global_step, total_steps=state.max_steps,
                            epoch=state.epoch or 0.0)

        def on_step_end(self, args, state, control, **kwargs):
            fields = {"step": state.global_step, "total_steps": state.max_steps, "epoch": state.epoch}
            done = state.global_step - self.step0
            if done > 0 and self.t0 is not None:
                per_step = (time.monotonic() - self.t0) / done
                fields["eta_seconds"] = round(per_step * (state.max_steps - state.global_step), 1)
            progress.update(**fields)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            fields = {}
            if "loss" in logs:
                fields["loss"] = float(logs["loss"])
            if "eval_loss" in logs:
                fields["eval_loss"] = float(logs["eval_loss"])
            if "learning_rate" in logs:
                fields["learning_rate"] = float(logs["learning_rate"])
            tokens = logs.get("num_tokens")  # trl logs the running total of trained tokens
            if tokens is not None and self.t0 is not None:
                if self.tokens0 is None:
                    self.tokens0 = (float(tokens), time.monotonic())
                else:
                    dt = time.monotonic() - self.tokens0[1]
                    if dt > 0:
                        fields["tokens_per_second"] = round((float(tokens) - self.tokens0[0]) / dt, 1)
            if fields:
                progress.update(**fields)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                progress.update(eval_loss=float(metrics["eval_loss"]))

    return ProgressCallback()


# ------------------------------------------------------------------ termination log

def termination_log_path() -> Path | None:
    env = os.environ.get("KAITO_TERMINATION_LOG")
    if env:
        return Path(env)
    default = Path("/dev/termination-log")
    if default.exists() and os.access(default, os.W_OK):
        return default
    return None


def write_termination(message: str | dict) -> None:
    """``Reason: message`` (one line) on failure, a JSON object on success; where Kubernetes reads it."""
    path = termination_log_path()
    if path is None:
        return
    text = json.dumps(message) if isinstance(message, dict) else " ".join(str(message).split())
    try:
        path.write_text(text[:4000] + "\n")  # Kubernetes keeps at most 4096 bytes
    except OSError as e:
        log.warning("cannot write the termination log %s: %s", path, e)
