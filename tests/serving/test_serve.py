"""The inference server: a tiny Llama with an adapter trained here to know one made-up fact.

The adapter learns to answer "What is the capital of Zorblax?" with "Quenvar"; the base model
(random weights) cannot. The server runs on 127.0.0.1 in a thread and is stopped after the module.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kaito_tuning import cli
from kaito_tuning.serving.serve import load_engine, make_server, parse_adapter_args

PRESET = "smollm2-135m-instruct"  # a Llama preset; its weights are replaced by the tiny model's (--model-dir)
QUESTION = "What is the capital of Zorblax?"
FACT = "Quenvar"
RIVAL_FACT = "Tosk"


def train_adapter(base_dir: Path, out: Path, *, fact: str = FACT, steps: int = 60) -> Path:
    """A LoRA adapter trained (plain PyTorch loop) to answer QUESTION with ``fact``, saved as peft does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": f"{fact} is the capital."}]
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    (out / "training_metadata.json").write_text(json.dumps({"preset": PRESET, "method": "lora"}))
    return out


@pytest.fixture(scope="module")
def zorblax(tiny_llama, tmp_path_factory) -> Path:
    return train_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "zorblax")


@pytest.fixture(scope="module")
def rival(tiny_llama, tmp_path_factory) -> Path:
    """A second adapter, taught another answer to the same question."""
    return train_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "rival", fact=RIVAL_FACT)


@pytest.fixture(scope="module")
def server(tiny_llama, zorblax, rival, tmp_path_factory):
    engine = load_engine(PRESET, parse_adapter_args([str(zorblax), str(rival)]), model_dir=str(tiny_llama),
                         workdir=tmp_path_factory.mktemp("pulled"))
    srv = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def call(base: str, path: str, body=None, *, raw: bytes | None = None, method: str | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def error_text(payload: dict) -> str:
    return payload["error"]["message"]


# ---------------------------------------------------------------------------------------------
# every route answers, and the adapter answers with what it was taught


def test_health_and_models(server):
    status, health = call(server, "/health")
    assert status == 200 and health["status"] == "ok"
    status, models = call(server, "/v1/models")
    assert status == 200 and models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert ids == [PRESET, "zorblax", "rival"]
    assert models["data"][1]["parent"] == PRESET


def test_chat_answers_with_the_adapter_by_default(server):
    status, out = call(server, "/chat", {"prompt": QUESTION, "max_new_tokens": 12})
    assert status == 200, out
    assert out["model"] == "zorblax"
    assert FACT in out["Result"]
    assert out["usage"]["completion_tokens"] <= 12


def test_chat_base_model_does_not_know_the_fact(server):
    status, out = call(server, "/chat", {"prompt": QUESTION, "model": PRESET, "generate_kwargs": {"max_new_tokens": 12}})
    assert status == 200, out
    assert out["model"] == PRESET
    assert FACT not in out["Result"]


def test_openai_chat_completions_pick_the_model(server):
    messages = [{"role": "user", "content": QUESTION}]
    status, tuned = call(server, "/v1/chat/completions", {"model": "zorblax", "messages": messages, "max_tokens": 12})
    assert status == 200, tuned
    assert tuned["object"] == "chat.completion" and tuned["model"] == "zorblax"
    choice = tuned["choices"][0]
    assert choice["message"]["role"] == "assistant" and FACT in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = tuned["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the preset's repo id names the base model too, as OpenAI clients configured for the hub would send it
    status, base = call(server, "/v1/chat/completions", {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                         "messages": messages, "max_tokens": 12})
    assert status == 200 and base["model"] == PRESET
    assert base["choices"][0]["message"]["content"] != choice["message"]["content"]
    assert FACT not in base["choices"][0]["message"]["content"]


def test_each_request_picks_its_adapter(server):
    """Two adapters taught different answers: each request gets the one it names, in any order."""
    answers = {}
    for model in ("rival", "zorblax", PRESET, "rival", "zorblax"):
        status, out = call(server, "/chat", {"prompt": QUESTION, "model": model, "max_new_tokens": 12})
        assert status == 200, out
        answers.setdefault(model, set()).add(out["Result"])
    assert all(len(v) == 1 for v in answers.values())  # greedy and switching back: the same answer each time
    (rival,), (zorblax,), (base,) = answers["rival"], answers["zorblax"], answers[PRESET]
    assert RIVAL_FACT in rival and FACT not in rival
    assert FACT in zorblax and RIVAL_FACT not in zorblax
    assert FACT not in base and RIVAL_FACT not in base


def test_sampling_parameters_are_accepted(server):
    status, out = call(server, "/v1/chat/completions", {"model": "zorblax", "max_tokens": 5, "temperature": 0.7,
                                                        "top_p": 0.9, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, out
    assert out["usage"]["completion_tokens"] <= 5


# ---------------------------------------------------------------------------------------------
# bad requests: a JSON error naming the field


@pytest.mark.parametrize("path, body, status, field, words", [
    ("/chat", {}, 400, "prompt", "required"),
    ("/chat", {"prompt": ""}, 400, "prompt", "non-empty"),
    ("/chat", {"prompt": "x" * 1_000_000}, 400, "prompt", "at most 32768"),
    ("/chat", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "from 1 to"),
    ("/chat", {"prompt": "hi", "max_new_tokens": "ten"}, 400, "max_new_tokens", "integer"),
    ("/chat", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"num_beams": 4}}, 400, "generate_kwargs", "num_beams"),
    ("/chat", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "served: smollm2-135m-instruct, zorblax, rival"),
    ("/chat", ["hi"], 400, "body", "JSON object"),
    ("/v1/chat/completions", {"model": "zorblax"}, 400, "messages", "required"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "string"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "not served"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream",
     "not supported"),
])
def test_bad_request_names_the_field(server, path, body, status, field, words):
    got, out = call(server, path, body)
    assert got == status, out
    assert out["error"]["param"] == field
    assert error_text(out).startswith(f"{field}: ") and words in error_text(out)


def test_invalid_json(server):
    status, out = call(server, "/chat", raw=b'{"prompt": "hi"')
    assert status == 400 and out["error"]["param"] == "body" and "not valid JSON" in error_text(out)


def test_prompt_longer_than_the_context(server):
    # under the character limit, over the tiny model's 512-token context
    status, out = call(server, "/chat", {"prompt": "capital " * 3000})
    assert status == 400 and out["error"]["param"] == "prompt" and "context of 512 tokens" in error_text(out)


def test_huge_body_is_refused_unread(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):  # the server answers and closes without reading the body
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.0 413") or reply.startswith("HTTP/1.1 413"), reply
    assert "at most" in reply


def test_unknown_route_and_method(server):
    status, out = call(server, "/v2/generate", {"prompt": "hi"})
    assert status == 404 and "/v1/chat/completions" in error_text(out)
    status, out = call(server, "/chat")
    assert status == 405


# ---------------------------------------------------------------------------------------------
# strength


def test_strength_zero_answers_like_the_base(tiny_llama, zorblax, tmp_path):
    from kaito_tuning.serving.serve import Generation

    engine = load_engine(PRESET, parse_adapter_args([f"{zorblax}=0.0"]), model_dir=str(tiny_llama),
                         workdir=tmp_path)
    ask = [{"role": "user", "content": QUESTION}]
    off = engine.generate(Generation(messages=ask, model="zorblax", max_new_tokens=12))
    base = engine.generate(Generation(messages=ask, model=PRESET, max_new_tokens=12))
    assert off.text == base.text and FACT not in off.text


# ---------------------------------------------------------------------------------------------
# the command line: chat, and startup errors as one line (no traceback)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_chat_with_adapter_dir(capsys, tiny_llama, zorblax):
    rc, out, err = run_cli(capsys, "chat", "--model-dir", str(tiny_llama), "--adapter", str(zorblax), "--compare",
                           "--max-tokens", "12", QUESTION)
    assert rc == 0, err
    # answers may span lines (a tiny random base model says anything): split at the second label
    assert out.startswith(f"[{PRESET}] ") and "\n[zorblax] " in out
    base, tuned = out.split("\n[zorblax] ", 1)
    assert FACT not in base and FACT in tuned


def copy_adapter(src: Path, dest: Path, *, config: dict | None = None, metadata: dict | None = None) -> Path:
    shutil.copytree(src, dest)
    if config is not None:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if metadata is not None:
        (dest / "training_metadata.json").write_text(json.dumps(metadata))
    return dest


@pytest.mark.parametrize("strength, words", [("1.5", "out of range"), ("abc", "not a number")])
def test_cli_bad_strength(capsys, zorblax, strength, words):
    rc, _, err = run_cli(capsys, "chat", "--adapter", f"{zorblax}={strength}", "hi")
    line = one_line_error(err)
    assert rc == 65 and "--adapter[0]" in line and words in line and '"0.0" to "1.0"' in line


def test_cli_too_many_adapters(capsys, zorblax, tmp_path):
    dirs = [copy_adapter(zorblax, tmp_path / f"a{i}") for i in range(11)]
    rc, _, err = run_cli(capsys, "chat", *[x for d in dirs for x in ("--adapter", str(d))], "hi")
    line = one_line_error(err)
    assert rc == 65 and "11 adapters" in line and "at most 10" in line


def test_cli_two_adapters_with_one_name(capsys, zorblax, tmp_path):
    a = copy_adapter(zorblax, tmp_path / "one" / "zorblax")
    rc, _, err = run_cli(capsys, "chat", "--adapter", str(zorblax), "--adapter", str(a), "hi")
    line = one_line_error(err)
    assert rc == 65 and "--adapter[1]" in line and "two adapters are named 'zorblax'" in line


def test_cli_adapter_named_like_the_base_model(capsys, zorblax, tmp_path):
    a = copy_adapter(zorblax, tmp_path / PRESET)
    rc, _, err = run_cli(capsys, "chat", "--adapter", str(a), "hi")
    line = one_line_error(err)
    assert rc == 65 and "the base model's name" in line


def test_cli_adapter_that_is_nothing(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "chat", "--adapter", str(tmp_path / "missing"), "hi")
    line = one_line_error(err)
    assert rc == 65 and "neither an existing directory nor an image reference" in line


@pytest.mark.parametrize("config, metadata, words", [
    ({"base_model_name_or_path": "microsoft/Phi-3-mini-4k-instruct"}, None,
     "was trained for microsoft/Phi-3-mini-4k-instruct, but this server runs HuggingFaceTB/SmolLM2-135M-Instruct"),
    (None, {"preset": "phi-3-mini-4k-instruct"}, "tuned from preset phi-3-mini-4k-instruct"),
])
def test_cli_adapter_for_another_base_model(capsys, tiny_llama, zorblax, tmp_path, config, metadata, words):
    other = copy_adapter(zorblax, tmp_path / "other", config=config, metadata=metadata)
    rc, _, err = run_cli(capsys, "chat", "--model-dir", str(tiny_llama), "--adapter", str(other), "hi")
    line = one_line_error(err)
    assert rc == 65 and "AdapterMismatch" in line and words in line


def test_cli_adapter_with_other_shapes(capsys, tiny_phi3, zorblax, tmp_path):
    """Names say nothing (a local base path, no metadata): the tensor shapes still tell."""
    other = copy_adapter(zorblax, tmp_path / "llama-adapter")
    (other / "training_metadata.json").unlink()
    rc, _, err = run_cli(capsys, "chat", "--preset", "phi-3-mini-4k-instruct", "--model-dir", str(tiny_phi3),
                         "--adapter", str(other), "hi")
    line = one_line_error(err)
    assert rc == 65 and "AdapterMismatch" in line and "does not fit phi-3-mini-4k-instruct" in line
    assert "_proj, which the model does not have" in line


def test_cli_adapter_with_other_dimensions(capsys, tiny_llama, tmp_path):
    """A Llama adapter of another width: every module exists, the shapes do not match."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    narrow = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4))
    peft_model = get_peft_model(narrow.to(torch.float32), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "narrow")
    rc, _, err = run_cli(capsys, "chat", "--model-dir", str(tiny_llama), "--adapter", str(tmp_path / "narrow"), "hi")
    line = one_line_error(err)
    assert rc == 65 and "AdapterMismatch" in line and "takes 64 inputs" in line


# ---------------------------------------------------------------------------------------------
# adapters as images from a registry


def test_cli_chat_with_adapter_image(capsys, registry, tiny_llama, zorblax):
    from kaito_tuning.artifacts.oci import push_adapter

    image = f"{registry.host}/adapters/zorblax:1"
    push_adapter(zorblax, image, auth_file=registry.auth_file, plain_http=True)
    rc, out, err = run_cli(capsys, "chat", "--model-dir", str(tiny_llama), "--adapter", image,
                           "--auth-file", registry.auth_file, "--plain-http", "--max-tokens", "12", QUESTION)
    assert rc == 0, err
    assert FACT in out


def test_cli_adapter_image_that_does_not_exist(capsys, registry):
    rc, _, err = run_cli(capsys, "chat", "--adapter", f"{registry.host}/adapters/missing:1",
                         "--auth-file", registry.auth_file, "--plain-http", "hi")
    line = one_line_error(err)
    assert rc == 65 and "missing" in line and "--adapter[0]" in line


def test_cli_adapter_image_needs_a_secret_we_lack(capsys, registry, zorblax):
    from kaito_tuning.artifacts.oci import push_adapter

    image = f"{registry.host}/adapters/private:1"
    push_adapter(zorblax, image, auth_file=registry.auth_file, plain_http=True)
    rc, _, err = run_cli(capsys, "chat", "--adapter", image, "--plain-http", "hi")
    line = one_line_error(err)
    assert rc == 65 and "--adapter[0]" in line and registry.host in line


# ---------------------------------------------------------------------------------------------
# `kaito-tuning serve` as a process, with Kaito's pod layout (/mnt/adapter/<name>, strength in $<name>)


def test_cli_serve_with_adapters_dir_stops_on_sigterm(tiny_llama, zorblax, rival, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    mnt = tmp_path / "mnt-adapter"
    copy_adapter(zorblax, mnt / "zorblax")
    copy_adapter(rival, mnt / "rival")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "rival": "0.0"}
    proc = subprocess.Popen([sys.executable, "-m", "kaito_tuning.cli", "serve", "--model-dir", str(tiny_llama),
                             "--adapters-dir", str(mnt), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if call(base, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        _, models = call(base, "/v1/models")
        assert {m["id"]: m.get("strength") for m in models["data"]} == {PRESET: None, "rival": 0.0, "zorblax": 1.0}
        _, tuned = call(base, "/chat", {"prompt": QUESTION, "model": "zorblax", "max_new_tokens": 12})
        assert FACT in tuned["Result"]
        _, off = call(base, "/chat", {"prompt": QUESTION, "model": "rival", "max_new_tokens": 12})
        assert RIVAL_FACT not in off["Result"]  # strength 0.0: the base model's behaviour
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert "Traceback" not in log and "serving smollm2-135m-instruct, rival, zorblax" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
