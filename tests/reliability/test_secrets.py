"""Planted secrets after a whole Job with faults on the way: the registry password (push secret) and a signed
dataset URL's token must appear in no file written, no termination log, no log line and no pushed blob."""

from __future__ import annotations

import base64
import json
import secrets

from fixtures_data import training_configmap, tuning_workspace
from fixtures_registry import HttpStub

from kaito_tuning.dev.localregistry import LocalRegistry

from .helpers import auth_file_for, files_holding


def test_no_planted_secret_anywhere_after_a_job_with_faults(pod, scripted, tmp_path):
    password = "PW-" + secrets.token_hex(8)
    sig = "SIG" + secrets.token_hex(8)
    basic = base64.b64encode(f"planted:{password}".encode()).decode()
    scripted.script["/chat.parquet"] = [("status", 500)]  # the first try fails: the retry is logged
    url = f"{scripted.url}/chat.parquet?sv=2030-01-01&se=2030-01-02&sig={sig}&sp=r"
    failed_once: set = set()

    def flaky(stub, req):  # the registry's first manifest PUT fails: the retry is logged
        if req["method"] == "PUT" and "/manifests/" in req["path"] and not failed_once:
            failed_once.add(1)
            return 503, {}, b'{"errors": [{"code": "UNAVAILABLE", "message": "try again"}]}'
        return None

    with LocalRegistry(user="planted", password=password) as reg, HttpStub(reg.url, flaky) as proxy:
        image = f"{proxy.host}/secrets/adapter:1"
        ws = tuning_workspace([url], config="tiny-config")
        ws["tuning"]["output"] = {"image": image, "imagePushSecret": "push"}
        pod.set(ws, training_configmap(training={"max_steps": 2, "per_device_train_batch_size": 2},
                                       dataset={"train_test_split": 1.0}))
        secret = tmp_path / "push-secret"  # outside every directory the Job writes
        secret.mkdir()
        pod.setenv("KAITO_PUSH_AUTH_FILE", auth_file_for(secret / ".dockerconfigjson", proxy.host, "planted", password))
        logs, results = [], {}
        for step in ("download", "train", "push"):
            done = pod.spawn(["job", step])
            logs += [done.stdout, done.stderr]
            results[step] = (done.returncode, pod.termination())
            assert done.returncode == 0, done.stderr[-3000:]
        pushed = json.loads(results["push"][1])
        assert pushed["image"] == image
        assert len(failed_once) == 1 and "retrying" in "".join(logs)
        assert sum(1 for path, *_ in scripted.seen if path == "/chat.parquet") == 2

        # every place the token could be: the pod's volumes, its logs, the registry's storage (blobs gunzipped)
        for token in (password.encode(), basic.encode(), sig.encode()):
            assert files_holding(token, [pod.data, pod.results, pod.log, reg.root / "data"]) == []
            assert not any(token.decode() in text for text in logs)
            assert not any(token.decode() in r[1] for r in results.values())
        # the grep sees what it must: the secret's own file, and names inside the gzip layer
        assert files_holding(basic.encode(), [secret]) != []
        assert files_holding(b"data/training_metadata.json", [reg.root / "data"]) != []
    # what replaces the URL: scheme, host and path, and the file's digest
    meta = json.loads((pod.results / "training_metadata.json").read_text())
    assert [d["url"] for d in meta["datasets"]] == [f"{scripted.url}/chat.parquet"]

