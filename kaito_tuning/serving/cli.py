"""``kaito-tuning chat`` (one question, printed answers) and ``kaito-tuning serve`` (the HTTP app under uvicorn)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from kaito_tuning.errors import UserError
from kaito_tuning.serving.adapters import adapter_args_in_dir, parse_adapter_args
from kaito_tuning.serving.engine import Generation, RequestError, load_engine, quiet_libraries

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _engine(args):
    values = list(args.adapter or [])
    if args.adapters_dir:
        values += adapter_args_in_dir(args.adapters_dir)
    adapters = parse_adapter_args(values)
    workdir = Path(tempfile.mkdtemp(prefix="kaito-adapters-"))
    try:
        yield load_engine(args.preset, adapters, model_dir=args.model_dir, workdir=workdir,
                          auth_file=args.auth_file, plain_http=args.plain_http,
                          weights_image=getattr(args, "weights_image", None))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def cli_chat(args) -> int:
    """``kaito-tuning chat``: one answer per adapter given (or the base model's), printed."""
    quiet_libraries()
    prompt = args.prompt
    if not prompt.strip():
        raise UserError("is empty", field="prompt")
    if args.max_tokens < 1:
        raise UserError(f"must be at least 1, got {args.max_tokens}", field="--max-tokens")
    with _engine(args) as engine:
        names = [a.name for a in engine.adapters] or [engine.base_name]
        if args.compare and engine.adapters:
            names.insert(0, engine.base_name)
        for name in names:
            gen = Generation(messages=[{"role": "user", "content": prompt}], model=name,
                             max_new_tokens=args.max_tokens, temperature=args.temperature)
            try:
                c = engine.generate(gen)
            except RequestError as e:
                raise UserError(e.message, field="--max-tokens" if e.field == "prompt" else e.field) from None
            print(f"[{name}] {c.text}" if len(names) > 1 else c.text, flush=True)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}", field="--port") from None
    return sock


def cli_serve(args) -> int:
    """``kaito-tuning serve``: load, then answer HTTP until Ctrl-C or SIGTERM (exit 0 after a graceful stop)."""
    import uvicorn

    from kaito_tuning.serving.app import create_app, server_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_libraries()
    for flag, value in (("--max-queue", args.max_queue), ("--idle-timeout", args.idle_timeout),
                        ("--max-connections", args.max_connections)):
        if value < 1:
            raise UserError(f"must be at least 1, got {value}", field=flag)
    with _engine(args) as engine:
        sock = _listen(args.host, args.port)
        with sock:
            app = create_app(engine, max_queue=args.max_queue)
            server = uvicorn.Server(server_config(app, idle_timeout=args.idle_timeout,
                                                  max_connections=args.max_connections))
            host, port = sock.getsockname()[:2]
            log.info("model loaded successfully; serving %s on http://%s:%s (POST /chat, POST /v1/chat/completions, "
                     "GET /v1/models, GET /health, GET /openapi.json)", ", ".join(engine.names), host, port)
            # uvicorn stops gracefully on SIGTERM, then raises the signal again for the handler that was there
            # before it: with this one, that ends the process normally (exit 0) instead of by the signal.
            previous = signal.signal(signal.SIGTERM, lambda *_: None)
            try:
                server.run(sockets=[sock])
            finally:
                signal.signal(signal.SIGTERM, previous)
            if not server.started:
                raise UserError(f"the server on {host}:{port} did not start; see the log above", field="--port")
            log.info("stopped")
    return 0
