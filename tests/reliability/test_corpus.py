"""The bad-input corpus across layers (issue 11): dataset files, dataset URLs, push secrets, adapter images and
HTTP requests to ``serve``, each through the entry point a user reaches it by, each with the error it must give
(reason, field and words: the one line of the termination log, the CLI or the JSON error). The spec, ConfigMap and
YAML-file cases are in tests/spec/test_bad_inputs.py and are not repeated here."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from fixtures_data import messages_rows, training_configmap, tuning_workspace
from fixtures_registry import make_fake_adapter, push_image, tar_layer

from kaito_tuning.cli import main
from kaito_tuning.errors import EXIT_USER_ERROR


def _jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---------------------------------------------------------------------------------------------
# dataset files: `kaito-tuning job train` on a volume input holding the file

PVC = {"persistentVolumeClaim": {"claimName": "data"}}
NO_COLUMNS = "has no usable columns: it has "
DATASETS = [
    ("empty file", "a.parquet", b"", "a.parquet: is empty (0 bytes)"),
    ("HTML login page", "a.jsonl", b"<!DOCTYPE html><html><body>Sign in</body></html>",
     "a.jsonl: is an HTML page, not a dataset: the URL probably points at a web page"),
    ("XML", "a.json", b"<?xml version='1.0'?><rows/>", "a.json: looks like XML/HTML, not parquet"),
    ("binary, not parquet", "a.parquet", b"\x00\x01\x02\x03" * 64, "a.parquet: is binary but not parquet (no PAR1"),
    ("UTF-16 text", "a.jsonl", json.dumps({"text": "hi"}).encode("utf-16"), "a.jsonl: is binary but not parquet"),
    ("prose", "a.csv", b"just some words\nand more", "a.csv: is not parquet, JSON lines, JSON or CSV"),
    ("truncated parquet", "a.parquet", "truncated", "a.parquet: is not a readable parquet file"),
    ("parquet with other columns", "a.parquet", "no_columns", f"a.parquet: {NO_COLUMNS}question, answer"),
    ("parquet without rows", "a.parquet", "zero_rows", "a.parquet: has zero rows (columns: messages)"),
    ("CSV with other columns", "a.csv", b"question,answer\nq,a\n", f"a.csv: {NO_COLUMNS}question, answer"),
    ("JSON object, not rows", "a.json", b'{"a": 1}', f"a.json: {NO_COLUMNS}a"),
    ("JSON array of numbers", "a.json", b"[1, 2, 3]", "a.json: must be a JSON array of objects"),
    ("broken JSON line", "a.jsonl", b'{"text": "a"}\n{not json\n', "a.jsonl: line 2 is not valid JSON"),
    ("alpaca without output", "a.jsonl", _jsonl({"instruction": "q", "input": ""}), f"a.jsonl: {NO_COLUMNS}instruction, input"),
    ("unknown role", "a.parquet", "robot", "a.parquet: row 0: messages[1].role is 'robot'; allowed: system, user"),
    ("empty assistant turn", "a.parquet", "empty_content", "a.parquet: row 0: messages[1].content is empty (assistant"),
    ("no assistant turn", "a.jsonl", _jsonl({"messages": [{"role": "user", "content": "hi"}]}),
     "a.jsonl: row 0: messages has no assistant message: there is nothing to learn"),
    ("number as content", "a.jsonl", _jsonl({"messages": [{"role": "user", "content": 5},
                                                           {"role": "assistant", "content": "a"}]}),
     "a.jsonl: row 0: messages[0].content is empty (user message)"),
    ("null prompt", "a.jsonl", _jsonl({"prompt": None, "completion": "a"}), "a.jsonl: row 0: prompt is empty or not text"),
]


@pytest.mark.parametrize("case, name, content, words", DATASETS, ids=[c[0] for c in DATASETS])
def test_dataset_file(pod, datasets_dir, case, name, content, words):
    data = datasets_dir[content].read_bytes() if isinstance(content, str) else content
    (pod.data / name).write_bytes(data)
    pod.set(tuning_workspace(volume=PVC))
    assert pod.step("train") == EXIT_USER_ERROR
    line = pod.termination()
    assert line.startswith(f"DatasetInvalid: {words}"), line
    assert line.count("\n") <= 1 and len(line) < 1000 and not (pod.results / "adapter_config.json").exists()


def test_a_huge_row_is_read_as_the_row_it_is(pod):
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}, {"role": "assistant", "content": "y"}]}
    (pod.data / "a.jsonl").write_bytes(_jsonl(big, *messages_rows(1)))
    pod.set(tuning_workspace(volume=PVC, config="tiny-config"), training_configmap(training={"max_steps": 1}))
    rc = pod.step("train")
    assert rc == 0 or "line 1" in pod.termination() or "row 0" in pod.termination(), pod.termination()


# ---------------------------------------------------------------------------------------------
# dataset URLs: `kaito-tuning job download` with the Job's default policy (private addresses refused)

PUBLIC = "dataset URLs must be public (local runs may pass --allow-private-urls)"
URLS = [
    ("file URL", "file:///etc/passwd", "InvalidSpec: tuning.input.urls[0]: 'file:///etc/passwd' uses 'file'; only http"),
    ("ftp URL", "ftp://example.com/a.parquet", "InvalidSpec: tuning.input.urls[0]: 'ftp://example.com/a.parquet' uses"),
    ("credentials in the URL", "https://user:pw@example.com/a.parquet",
     "InvalidSpec: tuning.input.urls[0]: must not carry credentials (user:password@)"),
    ("AWS/Azure metadata", "http://169.254.169.254/latest/meta-data/iam/",
     "URLNotAllowed: tuning.input.urls[0]: http://169.254.169.254/latest/meta-data/iam/: the host is a link-local"),
    ("Alibaba metadata (CGNAT)", "http://100.100.100.200/latest/meta-data/",
     "URLNotAllowed: tuning.input.urls[0]: http://100.100.100.200/latest/meta-data/: the host is in the carrier-grade"),
    ("GCP metadata by name", "http://metadata.google.internal/computeMetadata/v1/",
     "the host is a cloud metadata service"),
    ("private 10/8", "http://10.1.2.3/a.parquet", "the host is a private address (inside the cluster"),
    ("private 172.16/12", "http://172.16.0.1/a.parquet", "the host is a private address"),
    ("private 192.168/16", "http://192.168.0.1/a.parquet", "the host is a private address"),
    ("IPv6 ULA", "http://[fd00::1]/a.parquet", "the host is a private address"),
    ("loopback", "http://127.0.0.1:9/a.parquet", "the host is a loopback address"),
    ("IPv6 loopback", "http://[::1]/a.parquet", "the host is a loopback address"),
    ("IPv4-mapped loopback", "http://[::ffff:127.0.0.1]/a.parquet", "the host is a loopback address"),
    ("localhost", "http://localhost/a.parquet", "the host is the local machine"),
    ("0.0.0.0", "http://0.0.0.0/a.parquet", "the host is not a unicast public address"),
]


@pytest.mark.parametrize("case, url, words", URLS, ids=[c[0] for c in URLS])
def test_dataset_url(pod, case, url, words):
    pod.monkeypatch.delenv("KAITO_ALLOW_PRIVATE_URLS")
    obj = tuning_workspace(["https://example.com/placeholder.parquet"])
    obj["tuning"]["input"]["urls"] = [url]  # as the Job receives it: validated again by the step itself
    pod.monkeypatch.setenv("KAITO_WORKSPACE", json.dumps(obj))
    assert pod.step("download") == EXIT_USER_ERROR
    line = pod.termination()
    assert words in line and line.count("\n") <= 1, line
    if line.startswith("URLNotAllowed"):
        assert PUBLIC in line
    assert list(pod.data.iterdir()) == []


REDIRECTS = [
    ("redirect to the metadata service", [("status", 302, {"Location": "http://169.254.169.254/latest/meta-data/"})],
     "URLNotAllowed: tuning.input.urls[0]: http://169.254.169.254/latest/meta-data/: the host is a link-local"),
    ("redirect to a file URL", [("status", 302, {"Location": "file:///etc/shadow"})],
     "DownloadFailed: tuning.input.urls[0]: file:///etc/shadow is not an http(s) URL"),
    ("redirect loop", [("status", 302, {"Location": "/chat.parquet"})] * 6, "redirects more than 5 times"),
    ("404", [("status", 404)], "answered HTTP 404 (not found): check the URL"),
    ("403 (an expired signature)", [("status", 403)], "answered HTTP 403: the file is not public"),
    ("HTML instead of data", "html", "is an HTML page, not a dataset"),
]


@pytest.mark.parametrize("case, faults, words", REDIRECTS, ids=[c[0] for c in REDIRECTS])
def test_dataset_url_answers(pod, scripted, monkeypatch, case, faults, words):
    from kaito_tuning import addresses

    real = addresses.forbidden  # the policy on, with this loopback server standing in for a public host
    monkeypatch.setattr(addresses, "forbidden", lambda a: None if a == "127.0.0.1" else real(a))
    monkeypatch.setattr(addresses, "forbidden_host", lambda h, real=addresses.forbidden_host:
                        None if h == "127.0.0.1" else real(h))
    monkeypatch.delenv("KAITO_ALLOW_PRIVATE_URLS")
    if faults == "html":
        scripted.files["/chat.parquet"] = b"<html><body>Sign in to continue</body></html>"
    else:
        scripted.script["/chat.parquet"] = list(faults)
    pod.set(tuning_workspace([f"{scripted.url}/chat.parquet?sig=SECRET"]))
    assert pod.step("download") == EXIT_USER_ERROR
    line = pod.termination()
    assert words in line and "SECRET" not in line and "Sign in" not in line, line


# ---------------------------------------------------------------------------------------------
# push secrets: `kaito-tuning push --auth-file` (the Job mounts the imagePushSecret as this file)

HOST = "registry.invalid:5000"
SECRETS = [
    ("Opaque secret", {"kind": "Secret", "type": "Opaque", "data": {"password": _b64("x")}},
     "is a Secret without .dockerconfigjson; use a secret of type kubernetes.io/dockerconfigjson"),
    ("basic-auth secret", {"kind": "Secret", "type": "kubernetes.io/basic-auth",
                           "data": {"username": _b64("u"), "password": _b64("p")}},
     "is a Secret without .dockerconfigjson"),
    ("secret without data", {"kind": "Secret", "type": "kubernetes.io/dockerconfigjson"},
     "is a Secret without .dockerconfigjson"),
    ("secret data not base64", {"kind": "Secret", "data": {".dockerconfigjson": "not base64!"}},
     "the Secret's .dockerconfigjson is not base64 of a JSON object"),
    ("secret data base64 of text", {"kind": "Secret", "data": {".dockerconfigjson": _b64("hello")}},
     "the Secret's .dockerconfigjson is not base64 of a JSON object"),
    ("auths a list", {"auths": ["x"]}, '"auths" must be a map of registry host to credentials'),
    ("auth without a colon", {"auths": {HOST: {"auth": _b64("justuser")}}},
     f'auths[{HOST}].auth must be base64 of "user:password"'),
    ("auth empty", {"auths": {HOST: {"auth": ""}}}, f"auths[{HOST}] has no auth, username/password or identitytoken"),
    ("username without password", {"auths": {HOST: {"username": "u"}}}, "has no auth, username/password or"),
    ("entry a string", {"auths": {HOST: "u:p"}}, f"auths[{HOST}] must be an object"),
    ("empty object", {}, 'has no "auths" map; expected a docker config.json'),
    ("JSON null", None, 'must be a JSON object like {"auths"'),
    ("empty file", "", "is not valid JSON (Expecting value at line 1 column 1)"),
    ("YAML, not JSON", "auths: {}", "is not valid JSON"),
    ("UTF-8 BOM", "\ufeff{}", "is not valid JSON (Unexpected UTF-8 BOM"),
]


@pytest.mark.parametrize("case, content, words", SECRETS, ids=[c[0] for c in SECRETS])
def test_push_secret(fake_adapter, tmp_path, capsys, case, content, words):
    path = tmp_path / ".dockerconfigjson"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["push", str(fake_adapter), f"{HOST}/a/b:1", "--auth-file", str(path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: InvalidAuthFile: ") and words in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# adapter images: `kaito-tuning pull` (what serve and the input step do), and the serve-side base check

ADAPTER_FILES = [("data/adapter_config.json", "file", b"{}"), ("data/adapter_model.safetensors", "file", b"x")]
IMAGES = [
    ("dataset image", [[("data/train.parquet", "file", b"PAR1")]], "NotAnAdapter: image HOST/corpus/",
     "is not an adapter: it has no /data/adapter_config.json (its /data holds: /data/train.parquet)"),
    ("config without weights", [[("data/adapter_config.json", "file", b"{}")]], "AdapterIncomplete: image ",
     "has /data/adapter_config.json but no /data/adapter_model.safetensors"),
    ("nothing under /data", [[("etc/passwd", "file", b"root")]], "NoDataInImage: image ", "has no files under /data"),
    ("../ traversal", [ADAPTER_FILES + [("data/../../evil", "file", b"x")]], "UnsafeImageContent: ", "evil"),
    ("relative symlink out", [ADAPTER_FILES + [("data/rel", "symlink", "../../../etc/passwd")]],
     "UnsafeImageContent: ", "rel"),
    ("symlink out", [ADAPTER_FILES + [("data/link", "symlink", "/etc/passwd")]], "UnsafeImageContent: ", "link"),
    ("hard link out", [ADAPTER_FILES + [("data/hard", "hardlink", "etc/passwd")]], "UnsafeImageContent: ", "hard"),
    ("artifact, not an image", "artifact", "NotAnAdapter: image ", "is an OCI artifact"),
]


@pytest.mark.parametrize("case, layers, reason, words", IMAGES, ids=[c[0] for c in IMAGES])
def test_adapter_image(registry, tmp_path, capsys, case, layers, reason, words):
    tag = "corpus/" + "-".join("".join(c if c.isalnum() else " " for c in case.lower()).split()) + ":1"
    if layers == "artifact":
        image = push_image(registry, tag, [b'{"a": 1}'], config_type="application/vnd.oci.empty.v1+json",
                           layer_type="application/json")
    else:
        image = push_image(registry, tag, [tar_layer(entries) for entries in layers])
    dest = tmp_path / "pulled"
    rc = main(["pull", image, str(dest), "--auth-file", registry.auth_file, "--plain-http"])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR, err
    assert err.startswith(f"error: {reason.replace('HOST', registry.host)}") and words in err, err
    assert not dest.exists() or list(dest.iterdir()) == []


def test_adapter_image_for_another_base_model(registry, tmp_path):
    from kaito_tuning.serving.adapters import AdapterMismatch, parse_adapter_args, prepare_adapters
    from kaito_tuning.spec.presets import get_preset

    adapter = make_fake_adapter(tmp_path / "adapter")  # trained for SmolLM2-135M-Instruct
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
    shutil.rmtree(adapter / "README.md", ignore_errors=True)
    from kaito_tuning.artifacts import push_adapter

    image = push_adapter(adapter, f"{registry.host}/corpus/other-base:1", auth_file=registry.auth_file,
                         plain_http=True).reference
    with pytest.raises(AdapterMismatch, match=r"was trained for meta-llama/Llama-3.1-8B, but this server runs "
                       r"HuggingFaceTB/SmolLM2-135M-Instruct \(preset smollm2-135m-instruct\)"):
        prepare_adapters(parse_adapter_args([image]), get_preset("smollm2-135m-instruct"), tmp_path / "work",
                         auth_file=registry.auth_file, plain_http=True)


# ---------------------------------------------------------------------------------------------
# HTTP requests to `serve` (the FastAPI app; tests/serving/test_app.py has the request-model cases)


@pytest.fixture(scope="module")
def client(tiny_llama, tmp_path_factory):
    import torch
    from fastapi.testclient import TestClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kaito_tuning.serving.adapters import parse_adapter_args
    from kaito_tuning.serving.app import create_app
    from kaito_tuning.serving.engine import load_engine

    out = tmp_path_factory.mktemp("corpus-adapter") / "corpus"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(out)
    (out / "training_metadata.json").write_text(json.dumps({"preset": "smollm2-135m-instruct", "method": "lora"}))
    engine = load_engine("smollm2-135m-instruct", parse_adapter_args([str(out)]), model_dir=str(tiny_llama),
                         workdir=tmp_path_factory.mktemp("corpus-pulled"))
    return TestClient(create_app(engine))


REQUESTS = [
    ("prompt a list", "/chat", {"prompt": ["hi"]}, 400, "prompt", "string"),
    ("prompt a number", "/chat", {"prompt": 5}, 400, "prompt", "string"),
    ("negative temperature", "/chat", {"prompt": "hi", "temperature": -1}, 400, "temperature", ""),
    ("top_p above 1", "/chat", {"prompt": "hi", "top_p": 2}, 400, "top_p", ""),
    ("max_tokens zero", "/chat", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "from 1 to"),
    ("max_tokens 10**30", "/chat", {"prompt": "hi", "max_tokens": 10 ** 30}, 400, "max_tokens", "from 1 to"),
    ("max_length 2**40", "/chat", {"prompt": "hi", "generate_kwargs": {"max_length": 1 << 40}}, 400,
     "generate_kwargs.max_length", ""),
    ("messages an object", "/v1/chat/completions", {"messages": {"role": "user", "content": "hi"}}, 400, "messages",
     "list"),
    ("role missing", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role", ""),
    ("temperature a string", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "temperature": "hot"}, 400, "temperature", "number"),
    ("model a list", "/v1/chat/completions", {"model": ["corpus"], "messages": [{"role": "user", "content": "hi"}]},
     400, "model", ""),
    ("max_tokens a string", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": "many"}, 400, "max_tokens", "integer"),
]


@pytest.mark.parametrize("case, path, body, status, field, words", REQUESTS, ids=[c[0] for c in REQUESTS])
def test_serve_request(client, case, path, body, status, field, words):
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}: ") and words in err["message"], err
    assert "Traceback" not in err["message"] and len(err["message"]) < 500


def test_serve_wrong_method_and_content_type(client):
    assert client.get("/chat").status_code == 405
    resp = client.post("/chat", content=b"prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "body", resp.text


def test_corpus_size():
    cases = len(DATASETS) + len(URLS) + len(REDIRECTS) + len(SECRETS) + len(IMAGES) + 1 + len(REQUESTS) + 2
    assert cases >= 60, cases
