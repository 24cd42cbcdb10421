"""``kaito-tuning chat`` and ``serve``: answers printed, startup errors as one line (no traceback), and the
real server process as the inference Deployment runs it (Kaito's /mnt/adapter layout, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kaito_tuning import cli

from .helpers import FACT, PRESET, QUESTION, RIVAL_FACT, copy_adapter


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_chat_with_adapter_dir(capsys, tiny_llama, zorblax):
    rc, out, err = run_cli(capsys, "chat", "--model-dir", str(tiny_llama), "--adapter", str(zorblax), "--compare",
                           "--max-tokens", "12", QUESTION)
    assert rc == 0, err
    # answers may span lines (a tiny random base model says anything): split at the second label
    assert out.startswith(f"[{PRESET}] ") and "\n[zorblax] " in out
    base, tuned = out.split("\n[zorblax] ", 1)
    assert FACT not in base and tuned.strip() == f"{FACT} is the capital."


@pytest.mark.parametrize("strength, words", [("1.5", "out of range"), ("abc", "not a number")])
def test_bad_strength(capsys, zorblax, strength, words):
    rc, _, err = run_cli(capsys, "chat", "--adapter", f"{zorblax}={strength}", "hi")
    line = one_line_error(err)
    assert rc == 65 and "--adapter[0]" in line and words in line and '"0.0" to "1.0"' in line


def test_too_many_adapters(capsys, zorblax, tmp_path):
    dirs = [copy_adapter(zorblax, tmp_path / f"a{i}") for i in range(11)]
    rc, _, err = run_cli(capsys, "chat", *[x for d in dirs for x in ("--adapter", str(d))], "hi")
    line = one_line_error(err)
    assert rc == 65 and "11 adapters" in line and "at most 10" in line


def test_two_adapters_with_one_name(capsys, zorblax, tmp_path):
    a = copy_adapter(zorblax, tmp_path / "one" / "zorblax")
    rc, _, err = run_cli(capsys, "chat", "--adapter", str(zorblax), "--adapter", str(a), "hi")
    line = one_line_error(err)
    assert rc == 65 and "--adapter[1]" in line and "two adapters are named 'zorblax'" in line


def test_adapter_named_like_the_base_model(capsys, zorblax, tmp_path):
    a = copy_adapter(zorblax, tmp_path / PRESET)
    rc, _, err = run_cli(capsys, "chat", "--adapter", str(a), "hi")
    line = one_line_error(err)
    assert rc == 65 and "the base model's name" in line


def test_adapter_that_is_nothing(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "chat", "--adapter", str(tmp_path / "missing"), "hi")
    line = one_line_error(err)
    assert rc == 65 and "neither an existing directory nor an image reference" in line


@pytest.mark.parametrize("config, metadata, words", [
    ({"base_model_name_or_path": "microsoft/Phi-3-mini-4k-instruct"}, None,
     "was trained for microsoft/Phi-3-mini-4k-instruct, but this server runs HuggingFaceTB/SmolLM2-135M-Instruct"),
    (None, {"preset": "phi-3-mini-4k-instruct"}, "tuned from preset phi-3-mini-4k-instruct"),
])
def test_adapter_for_another_base_model(capsys, tiny_llama, zorblax, tmp_path, config, metadata, words):
    other = copy_adapter(zorblax, tmp_path / "other", config=config, metadata=metadata)
    rc, _, err = run_cli(capsys, "chat", "--model-dir", str(tiny_llama), "--adapter", str(other), "hi")
    line = one_line_error(err)
    assert rc == 65 and "AdapterMismatch" in line and words in line


def test_adapter_with_other_shapes(capsys, tiny_phi3, zorblax, tmp_path):
    other = copy_adapter(zorblax, tmp_path / "llama-adapter")
    (other / "training_metadata.json").unlink()
    rc, _, err = run_cli(capsys, "chat", "--preset", "phi-3-mini-4k-instruct", "--model-dir", str(tiny_phi3),
                         "--adapter", str(other), "hi")
    line = one_line_error(err)
    assert rc == 65 and "AdapterMismatch" in line and "does not fit phi-3-mini-4k-instruct" in line


def test_serve_with_a_port_in_use(capsys, tiny_llama):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, err = run_cli(capsys, "serve", "--model-dir", str(tiny_llama), "--port", str(port))
    line = one_line_error(err)
    assert rc == 65 and f"--port: cannot listen on 127.0.0.1:{port}" in line


def test_serve_with_a_bad_limit(capsys):
    rc, _, err = run_cli(capsys, "serve", "--max-queue", "0")
    line = one_line_error(err)
    assert rc == 65 and "--max-queue: must be at least 1" in line


# ---------------------------------------------------------------------------------------------
# adapters as images from a registry


@pytest.mark.registry
def test_chat_with_adapter_image(capsys, registry, tiny_llama, zorblax):
    from kaito_tuning.artifacts import push_adapter

    image = f"{registry.host}/adapters/zorblax:1"
    push_adapter(zorblax, image, auth_file=registry.auth_file, plain_http=True)
    rc, out, err = run_cli(capsys, "chat", "--model-dir", str(tiny_llama), "--adapter", image,
                           "--auth-file", registry.auth_file, "--plain-http", "--max-tokens", "12", QUESTION)
    assert rc == 0, err
    assert out.strip() == f"{FACT} is the capital."


@pytest.mark.registry
def test_adapter_image_that_does_not_exist(capsys, registry):
    rc, _, err = run_cli(capsys, "chat", "--adapter", f"{registry.host}/adapters/missing:1",
                         "--auth-file", registry.auth_file, "--plain-http", "hi")
    line = one_line_error(err)
    assert rc == 65 and "missing" in line and "--adapter[0]" in line


@pytest.mark.registry
def test_adapter_image_needs_a_secret_we_lack(capsys, registry, zorblax):
    from kaito_tuning.artifacts import push_adapter

    image = f"{registry.host}/adapters/private:1"
    push_adapter(zorblax, image, auth_file=registry.auth_file, plain_http=True)
    rc, _, err = run_cli(capsys, "chat", "--adapter", image, "--plain-http", "hi")
    line = one_line_error(err)
    assert rc == 65 and "--adapter[0]" in line and registry.host in line


# ---------------------------------------------------------------------------------------------
# `kaito-tuning serve` as a process, with Kaito's pod layout (/mnt/adapter/<name>, strength in $<name>)


def call(base: str, path: str, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_until_healthy(proc, base: str, timeout: float = 300) -> None:
    """Until the server process answers /health with 200 (it must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if call(base, "/health")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def test_serve_process(tiny_llama, zorblax, rival, tmp_path):
    """The console script, as the inference Deployment runs it: answers, limits, idle clients, SIGTERM → exit 0."""
    mnt = tmp_path / "mnt-adapter"
    copy_adapter(zorblax, mnt / "zorblax")
    copy_adapter(rival, mnt / "rival")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    idle = 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "rival": "0.0"}
    entry = Path(sys.executable).parent / "kaito-tuning"
    proc = subprocess.Popen([str(entry), "serve", "--model-dir", str(tiny_llama), "--adapters-dir", str(mnt),
                             "--port", str(port), "--idle-timeout", str(idle)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    socks: list[socket.socket] = []
    try:
        wait_until_healthy(proc, base)
        _, models = call(base, "/v1/models")
        assert {m["id"]: m.get("strength") for m in models["data"]} == {PRESET: None, "rival": 0.0, "zorblax": 1.0}
        _, tuned = call(base, "/v1/chat/completions", {"model": "zorblax", "max_tokens": 12,
                                                       "messages": [{"role": "user", "content": QUESTION}]})
        assert tuned["choices"][0]["message"]["content"] == f"{FACT} is the capital."
        assert tuned["choices"][0]["finish_reason"] == "stop"
        _, off = call(base, "/chat", {"prompt": QUESTION, "model": "rival", "max_new_tokens": 12})
        assert RIVAL_FACT not in off["Result"]  # strength 0.0: the base model's behaviour
        assert call(base, "/openapi.json")[1]["info"]["title"] == "kaito-tuning inference"
        status, bad = call(base, "/chat", {"prompt": "hi", "generate_kwargs": {"num_beams": 2}})
        assert status == 400 and bad["error"]["param"] == "generate_kwargs"

        # 200 clients that connect and say nothing: no thread each, all closed after the idle timeout
        threads = threads_of(proc.pid)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=idle + 20) for _ in range(200)]
        assert call(base, "/health")[0] == 200  # served past them
        assert threads_of(proc.pid) <= threads + 2
        assert all(s.recv(1) == b"" for s in socks)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert "Traceback" not in log and "serving smollm2-135m-instruct, rival, zorblax" in log
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_serve_from_a_weights_image_without_the_hub(registry, tiny_llama, tmp_path):
    """``serve --weights-image`` as the inference Deployment runs it: the base weights pulled from the registry
    (Kaito's artifact shape) into the weights cache, the hub never asked, then served."""
    from kaito_tuning.artifacts import cached_weights, push_weights

    image = f"{registry.host}/models/served-weights:0.2.0"
    push_weights(tiny_llama, image, auth_file=registry.auth_file, plain_http=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "weights"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "KAITO_WEIGHTS_DIR": str(cache)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "kaito-tuning"), "serve", "--weights-image", image,
                             "--auth-file", registry.auth_file, "--plain-http", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base)
        status, answer = call(base, "/v1/chat/completions", {"model": PRESET, "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": QUESTION}]})
        assert status == 200 and answer["choices"][0]["message"]["content"] is not None
        assert cached_weights(image, cache) is not None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        log = proc.stdout.read()
        proc.stdout.close()
    assert "Traceback" not in log
