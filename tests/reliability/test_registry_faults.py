"""Registry faults through the real entry points (``kaito-tuning job push``, ``push``, ``pull``) against
Debian's docker-registry: down during the push then back, 5xx then recovering, garbage answers."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures_data import training_configmap, tuning_workspace
from fixtures_registry import REGISTRY_PASSWORD, REGISTRY_USER, HttpStub

from kaito_tuning.artifacts import pull_adapter
from kaito_tuning.cli import main
from kaito_tuning.contract import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from kaito_tuning.errors import EXIT_TRANSIENT, EXIT_USER_ERROR

from .helpers import Relay, auth_file_for


def _no_training(*args, **kwargs):
    raise AssertionError("the retried pod trained again")


def _adapter_job(pod, data_url: str, image: str, push_auth: str) -> None:
    ws = tuning_workspace([data_url], config="tiny-config")
    ws["tuning"]["output"] = {"image": image, "imagePushSecret": "push"}
    pod.set(ws, training_configmap(training={"max_steps": 2, "per_device_train_batch_size": 2},
                                   dataset={"train_test_split": 1.0}))
    pod.setenv("KAITO_PUSH_AUTH_FILE", push_auth)


def _new_pod_volumes(pod) -> None:
    """A retried pod gets a fresh emptyDir for the data; the results volume (a PVC) survives."""
    shutil.rmtree(pod.data)
    pod.data.mkdir()
    pod.log.unlink(missing_ok=True)


def test_registry_down_during_push_then_back_pushes_what_was_trained(pod, scripted, registry, waits, monkeypatch,
                                                                     tmp_path):
    relay = Relay(registry.host)  # down: nothing listens on its port
    image = f"{relay.host}/faults/down:1"
    _adapter_job(pod, f"{scripted.url}/chat.parquet", image,
                 auth_file_for(tmp_path / "push.json", relay.host, REGISTRY_USER, REGISTRY_PASSWORD))
    assert pod.step("download") == 0
    assert pod.step("train") == 0
    weights = pod.results / ADAPTER_WEIGHTS
    stamp, trained = weights.stat().st_mtime_ns, weights.read_bytes()

    assert pod.step("push") == EXIT_TRANSIENT  # retried by the Job, not failed
    line = pod.termination()
    assert line.startswith(f"RegistryUnreachable: cannot reach registry {relay.host}") and "tried 4 times" in line
    assert waits == [1.0, 2.0, 4.0]
    assert (pod.results / ADAPTER_CONFIG).is_file() and weights.stat().st_mtime_ns == stamp

    # the registry is back; the Job retries the pod: every step runs again, none retrains
    relay.up()
    try:
        _new_pod_volumes(pod)
        monkeypatch.setattr("kaito_tuning.tuner.recipe.train", _no_training)
        assert pod.step("download") == 0
        assert pod.step("train") == 0
        assert json.loads(pod.termination())["steps"] == 2
        assert weights.stat().st_mtime_ns == stamp
        assert pod.step("push") == 0
        pushed = json.loads(pod.termination())
        assert pushed["image"] == image and pushed["digest"].startswith("sha256:")
        pulled = pull_adapter(image, tmp_path / "pulled", auth_file=tmp_path / "push.json", plain_http=True)
    finally:
        relay.down()
    assert pulled.digest == pushed["digest"]
    assert (tmp_path / "pulled" / ADAPTER_WEIGHTS).read_bytes() == trained


def test_a_retried_push_does_not_need_the_dataset_again(pod, scripted, registry, waits, monkeypatch, tmp_path):
    relay = Relay(registry.host)
    image = f"{relay.host}/faults/expired:1"
    _adapter_job(pod, f"{scripted.url}/chat.parquet?sig=SHORTLIVED", image,
                 auth_file_for(tmp_path / "push.json", relay.host, REGISTRY_USER, REGISTRY_PASSWORD))
    assert pod.step("download") == 0
    assert pod.step("train") == 0
    assert pod.step("push") == EXIT_TRANSIENT
    del scripted.files["/chat.parquet"]  # the signed URL expired while the registry was down
    relay.up()
    try:
        _new_pod_volumes(pod)
        monkeypatch.setattr("kaito_tuning.tuner.recipe.train", _no_training)
        rcs = [pod.step(step) for step in ("download", "train", "push")]
        requests = [path for path, *_ in scripted.seen]
    finally:
        relay.down()
    assert rcs == [0, 0, 0], pod.termination()
    assert requests == ["/chat.parquet"]  # the retried pod asked for nothing: the expired URL is not needed


# ---------------------------------------------------------------------------------------------
# 5xx then recovering, during the push and during the pull


def _fail_first(counts: dict[str, int], plan: dict[tuple[str, str], list[int]]):
    """Answer the first requests of each (method, kind) with the planned statuses, then forward."""
    def handle(stub, req):
        path = req["path"].split("?")[0]
        kind = "manifest" if "/manifests/" in path else "blob" if "/blobs/" in path else "other"
        key = (req["method"], kind)
        n = counts[key] = counts.get(key, 0) + 1
        statuses = plan.get(key, [])
        if n <= len(statuses):
            return statuses[n - 1], {"Retry-After": "2"} if statuses[n - 1] == 503 else {}, b'{"errors": []}'
        return None
    return handle


def test_registry_5xx_then_recovering_during_push_and_pull(fake_adapter, registry, waits, tmp_path, capsys):
    counts: dict[str, int] = {}
    plan = {("POST", "blob"): [503], ("PUT", "manifest"): [500, 502], ("GET", "manifest"): [503],
            ("GET", "blob"): [500]}
    with HttpStub(registry.url, _fail_first(counts, plan)) as proxy:
        auth = auth_file_for(tmp_path / "auth.json", proxy.host, REGISTRY_USER, REGISTRY_PASSWORD)
        image = f"{proxy.host}/faults/flaky:1"
        assert main(["push", str(fake_adapter), image, "--auth-file", auth, "--plain-http"]) == 0
        pushed = json.loads(capsys.readouterr().out)
        assert waits == [2.0, 1.0, 2.0]  # Retry-After honoured; else the policy's 1, 2 s
        waits.clear()
        assert main(["pull", image, str(tmp_path / "pulled"), "--auth-file", auth, "--plain-http"]) == 0
        pulled = json.loads(capsys.readouterr().out)
    assert waits == [2.0, 1.0]
    assert pulled["digest"] == pushed["digest"]
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (tmp_path / "pulled" / name).read_bytes() == (fake_adapter / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# garbage from the registry: refused, nothing written


def _tamper(what: str):
    def handle(stub, req):
        status, headers, body = stub.forward(req)
        path = req["path"].split("?")[0]
        if status != 200 or req["method"] not in ("GET", "PUT"):
            return status, headers, body
        if what == "truncated manifest" and "/manifests/" in path and req["method"] == "GET":
            return status, headers, body[: len(body) // 2]
        if what == "another manifest" and "/manifests/" in path and req["method"] == "GET":
            doc = json.loads(body)
            doc.setdefault("annotations", {})["injected"] = "yes"
            return status, headers, json.dumps(doc).encode()
        if what == "flipped blob byte" and "/blobs/" in path and req["method"] == "GET":
            return status, headers, body[:-1] + bytes([body[-1] ^ 1])
        return status, headers, body
    return handle


@pytest.mark.parametrize("what, by_digest, words", [
    ("truncated manifest", False, "RegistryError: registry HOST sent a manifest that is not JSON"),
    ("another manifest", True, "RegistryError: registry HOST sent a manifest whose digest sha256:"),
    ("flipped blob byte", False, "arrived with a different size or digest"),
])
def test_garbage_from_the_registry_is_refused_and_nothing_is_written(fake_adapter, registry, waits, tmp_path,
                                                                     capsys, what, by_digest, words):
    from kaito_tuning.artifacts import push_adapter

    pushed = push_adapter(fake_adapter, f"{registry.host}/faults/garbage:1", auth_file=registry.auth_file,
                          plain_http=True)
    with HttpStub(registry.url, _tamper(what)) as proxy:
        auth = auth_file_for(tmp_path / "auth.json", proxy.host, REGISTRY_USER, REGISTRY_PASSWORD)
        ref = f"{proxy.host}/faults/garbage" + (f"@{pushed.digest}" if by_digest else ":1")
        dest = tmp_path / "pulled"
        assert main(["pull", ref, str(dest), "--auth-file", auth, "--plain-http"]) == EXIT_TRANSIENT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words.replace("HOST", proxy.host) in err, err
    assert not dest.exists() or list(dest.iterdir()) == []


def test_a_registry_that_stores_another_manifest_than_sent_fails_the_push(fake_adapter, registry, tmp_path, capsys):
    def handle(stub, req):
        status, headers, body = stub.forward(req)
        if req["method"] == "PUT" and "/manifests/" in req["path"]:
            headers["Docker-Content-Digest"] = "sha256:" + "0" * 64
        return status, headers, body
    with HttpStub(registry.url, handle) as proxy:
        auth = auth_file_for(tmp_path / "auth.json", proxy.host, REGISTRY_USER, REGISTRY_PASSWORD)
        rc = main(["push", str(fake_adapter), f"{proxy.host}/faults/echo:1", "--auth-file", auth, "--plain-http"])
    assert rc == EXIT_TRANSIENT
    assert f"stored the manifest as sha256:{'0' * 64}, not sha256:" in capsys.readouterr().err


def test_registry_auth_failure_is_not_retried(fake_adapter, registry, waits, tmp_path, capsys):
    auth = auth_file_for(tmp_path / "auth.json", registry.host, REGISTRY_USER, "wrong")
    rc = main(["push", str(fake_adapter), f"{registry.host}/faults/auth:1", "--auth-file", auth, "--plain-http"])
    assert rc == EXIT_USER_ERROR and waits == []
    assert "RegistryAuthFailed: authentication failed" in capsys.readouterr().err
