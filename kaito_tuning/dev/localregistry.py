"""A throwaway OCI registry on 127.0.0.1 for tests and the demo: Debian's ``docker-registry``.

    with LocalRegistry(user="kaito", password="s3cret") as reg:
        push_adapter(adapter_dir, f"{reg.host}/adapters/x:1", auth_file=reg.auth_file, plain_http=True)

The registry (distribution 2.8) listens on a free loopback port, stores blobs in a temporary
directory and checks a bcrypt htpasswd file (or any ``auth`` section given); leaving the ``with``
block kills it and removes every file it wrote.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import yaml

from kaito_tuning.errors import UserError

_BINARIES = ("docker-registry", "registry")  # Debian's name, upstream's name
_START_TIMEOUT_S = 15.0


class RegistryNotInstalled(UserError):
    reason = "RegistryNotInstalled"


class RegistryStartFailed(UserError):
    reason = "RegistryStartFailed"


def _bcrypt_line(user: str, password: str) -> str:
    """An htpasswd line with a bcrypt hash (the only kind distribution accepts); cost 5 keeps requests fast."""
    try:
        import bcrypt
    except ImportError:
        htpasswd = shutil.which("htpasswd")
        if not htpasswd:
            raise RegistryStartFailed("need the Python package bcrypt or htpasswd (apt-get install apache2-utils) "
                                      "to write the registry's password file") from None
        out = subprocess.run([htpasswd, "-nbB", "-C", "5", user, password], check=True, capture_output=True, text=True)
        return out.stdout.strip()
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1:PORT with htpasswd auth, as a context manager.

    Attributes once started: ``host`` ("127.0.0.1:PORT"), ``url``, ``auth_file`` (a docker
    config.json with credentials for ``host``), ``user``, ``password``, ``root`` (the temp dir).
    ``auth`` replaces the registry's ``auth:`` section (e.g. token auth); ``None`` means htpasswd.
    """

    def __init__(self, user: str = "kaito", password: str | None = None, *, auth: dict | None = None):
        self.user = user
        self.password = password if password is not None else secrets.token_urlsafe(12)
        self._auth = auth
        self._proc: subprocess.Popen | None = None
        self.root: Path | None = None
        self.host = self.url = self.auth_file = ""

    def __enter__(self) -> "LocalRegistry":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        binary = next(filter(None, map(shutil.which, _BINARIES)), None)
        if not binary:
            raise RegistryNotInstalled("the OCI registry binary docker-registry is not installed: "
                                       "apt-get install docker-registry")
        self.root = Path(tempfile.mkdtemp(prefix="kaito-registry-"))
        try:
            (self.root / "htpasswd").write_text(_bcrypt_line(self.user, self.password) + "\n")
            for _ in range(3):  # another process may grab the free port before the registry binds it
                if self._launch(binary, _free_port()):
                    break
            else:
                raise RegistryStartFailed(f"docker-registry did not start: {self._log_tail()}")
            auth = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            self.auth_file = str(self.root / "config.json")
            Path(self.auth_file).write_text(json.dumps({"auths": {self.host: {"auth": auth}}}, indent=2))
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: str, port: int) -> bool:
        """Start the registry on ``port``; True once it answers, False if the port was taken."""
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
            "auth": self._auth or {"htpasswd": {"realm": "kaito-local", "path": str(self.root / "htpasswd")}},
        }
        (self.root / "config.yml").write_text(yaml.safe_dump(config))
        log = open(self.root / "registry.log", "wb")
        self._proc = subprocess.Popen([binary, "serve", str(self.root / "config.yml")], stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "address already in use" in self._log_tail():
                    return False
                raise RegistryStartFailed(f"docker-registry exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                requests.get(f"{self.url}/v2/", timeout=1)
                return True
            except requests.RequestException:
                time.sleep(0.05)
        raise RegistryStartFailed(f"docker-registry did not answer on {self.host} within {_START_TIMEOUT_S:.0f} s: "
                                  f"{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return (self.root / "registry.log").read_text(errors="replace")[-800:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Kill the registry (if running) and delete its files; safe to call twice."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
