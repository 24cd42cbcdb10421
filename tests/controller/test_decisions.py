"""The reconcile decisions (controller/decisions.py) and the operator's settings and log format."""

from __future__ import annotations

import io
import json
import logging

import pytest

from kaito_tuning.controller import decisions as d
from kaito_tuning.controller import logs
from kaito_tuning.controller.settings import Settings, from_env
from kaito_tuning.errors import UserError

WS_UID = "ws-uid"


def job(hash_="h1", revision="2", uid="job-uid", owner=WS_UID, label="w"):
    return {"metadata": {"name": "w", "uid": uid, "labels": {"kaito.sh/workspace": label} if label else {},
                         "annotations": {"kaito.sh/spec-hash": hash_, "workspace.kaito.io/revision": revision},
                         "ownerReferences": [{"kind": "Workspace", "uid": owner}] if owner else []}}


def test_revision_numbering():
    assert d.revision(job(revision="3"), {}, "h1") == 3  # the current Job's
    assert d.revision(None, {"specHash": "h1", "revision": 4}, "h1") == 4  # unchanged spec: same run
    assert d.revision(None, {"specHash": "h0", "revision": 4}, "h1") == 5  # changed: one more
    assert d.revision(None, {}, "h1") == 1


def test_stale_job_is_one_of_another_spec():
    assert d.job_is_stale(job("h0"), "h1")
    assert not d.job_is_stale(job("h1"), "h1")
    assert not d.job_is_stale(None, "h1")


def test_ownership_needs_uid_and_label():
    assert d.owned_by(job(), WS_UID, "w")
    assert not d.owned_by(job(owner="someone-else"), WS_UID, "w")
    assert not d.owned_by(job(owner=None), WS_UID, "w")
    assert not d.owned_by(job(label=None), WS_UID, "w")
    assert not d.owned_by(job(), None, "w")
    c = d.conflict("Job", "w", "default")
    assert c["reason"] == "JobConflict" and "not owned by this workspace" in c["message"]


def test_pods_of_the_current_job_only():
    mine = {"metadata": {"name": "a", "ownerReferences": [{"uid": "job-uid"}]}}
    old = {"metadata": {"name": "b", "ownerReferences": [{"uid": "old-job"}]}}
    stray = {"metadata": {"name": "c"}}
    assert d.pods_of([mine, old, stray], "job-uid") == [mine]


@pytest.mark.parametrize("state,finished", [("Succeeded", True), ("Failed", True), ("Running", False)])
def test_a_finished_runs_deleted_job_is_not_recreated(state, finished):
    prev = {"state": state, "tuning": {"specHash": "h1", "jobName": "w", "revision": 1}}
    assert d.finished(prev, "h1") is finished
    assert d.recreate_deleted_job(None, prev, "h1") is (not finished)
    assert not d.recreate_deleted_job(job(), prev, "h1")  # it exists
    assert not d.recreate_deleted_job(None, {**prev, "tuning": {"specHash": "h0", "jobName": "w"}}, "h1")
    kept = d.kept_result(prev)
    assert kept["state"] == state and kept["tuning"]["jobName"] is None and "kept" in kept["tuning"]["note"]


def test_nodeclaim_lifecycle():
    assert d.needs_nodeclaim(True, False, "OnCompletion")
    assert not d.needs_nodeclaim(True, True, "OnCompletion")
    assert d.needs_nodeclaim(True, True, "OnDelete")
    assert not d.needs_nodeclaim(False, False, "OnDelete")
    assert d.release_nodeclaim(True, "Succeeded", "OnCompletion") and d.release_nodeclaim(True, "Failed", "OnCompletion")
    assert not d.release_nodeclaim(True, "Running", "OnCompletion")
    assert not d.release_nodeclaim(True, "Failed", "OnDelete")
    assert not d.release_nodeclaim(False, "Failed", "OnCompletion")


def test_placeholder_secret_names_are_explained_not_looked_up():
    b = d.placeholder_secret("tuning.output.imagePushSecret", "ACR_REGISTRY_SECRET_HERE", "default")
    assert b["reason"] == "SecretNamePlaceholder" and "placeholder" in b["message"]
    # the advice is a command the API server accepts: it never names the placeholder as the secret to create
    assert "docker-registry ACR_REGISTRY_SECRET_HERE" not in b["message"]
    assert "docker-registry my-registry-secret -n default" in b["message"]
    assert not d.retry_helps(b) and d.retry_helps({"reason": "SecretNotFound"})
    assert d.placeholder_secret("f", "acr-push", "default") is None
    assert d.placeholder_secret("f", "a.b-c", "default") is None
    for bad in ("Upper", "-x", "x-", "a_b", "a" * 254, ""):
        assert d.placeholder_secret("f", bad, "default") is not None


def test_status_patch_removes_what_the_new_status_does_not_have():
    prev = {"state": "Succeeded", "targetNodeCount": 1, "conditions": [{"type": "A"}],
            "tuning": {"revision": 1, "output": {"image": "r/a:1", "digest": "sha256:1"}, "finishedAt": "t",
                       "failure": {"reason": "X"}, "jobName": "w"}}
    new = {"state": "Pending", "targetNodeCount": 1, "conditions": [{"type": "B"}],
           "tuning": {"revision": 2, "jobName": "w"}}
    patch = d.status_patch(prev, new)
    assert patch["tuning"] == {"revision": 2, "jobName": "w", "output": None, "finishedAt": None, "failure": None}
    assert patch["conditions"] == [{"type": "B"}] and patch["state"] == "Pending"
    assert d.status_patch(None, new) == new
    assert d.status_patch({"extra": 1}, {})["extra"] is None


def test_error_status_always_explains():
    s = d.error_status(None, inference=False, reason="OperatorError", message="no presets directory", generation=3,
                       now="t")
    assert s["state"] == "Pending"
    conds = {c["type"]: c for c in s["conditions"]}
    assert set(conds) == {"ResourceReady", "JobStarted", "WorkspaceSucceeded"}
    assert conds["WorkspaceSucceeded"]["reason"] == "OperatorError" and conds["WorkspaceSucceeded"]["status"] == "False"
    assert conds["WorkspaceSucceeded"]["observedGeneration"] == 3
    prev = {"state": "Running", "tuning": {"revision": 1}, "conditions": [{"type": "NodeClaimReady", "status": "True"}]}
    s = d.error_status(prev, inference=False, reason="OperatorError", message="x", generation=1, now="t")
    assert s["state"] == "Running" and s["tuning"] == {"revision": 1}
    assert any(c["type"] == "NodeClaimReady" for c in s["conditions"])
    s = d.error_status(None, inference=True, reason="OperatorError", message="x", generation=1, now="t")
    assert s["state"] == "NotReady" and {c["type"] for c in s["conditions"]} == {"ResourceReady", "InferenceReady"}


def test_messages_are_redacted_and_bounded():
    msg = d.clip("GET https://host/data.parquet?sig=SECRET123&se=2030 failed; token=abc " + "x" * 3000)
    assert "SECRET123" not in msg and "abc" not in msg and len(msg) <= d.MAX_MESSAGE
    assert "https://host/data.parquet" in msg


def _st(state, reason, stage=None, message="m"):
    out = {"state": state, "conditions": [{"type": "WorkspaceSucceeded", "status": "False", "reason": reason,
                                           "message": message}]}
    if stage:
        out["tuning"] = {"stage": stage}
    return out


def test_events_on_phase_changes_only():
    assert d.events(None, _st("Pending", "JobPending")) == [
        {"type": "Normal", "reason": "JobPending", "message": "Pending: m"}]
    assert d.events(_st("Pending", "JobPending"), _st("Pending", "JobPending", message="other")) == []
    e = d.events(_st("Pending", "JobPending"), _st("Running", "Running", "downloading"))
    assert e[0]["type"] == "Normal" and "downloading" in e[0]["message"]
    assert d.events(_st("Running", "Running", "training", "step 1"), _st("Running", "Running", "training", "step 2")) \
        == []  # progress is not an Event
    assert d.events(_st("Running", "Running", "training"), _st("Running", "Running", "pushing"))
    failed = d.events(_st("Running", "Running"), _st("Failed", "OutOfMemory", message="token=abc OOM"))
    assert failed[0]["type"] == "Warning" and failed[0]["reason"] == "OutOfMemory" and "abc" not in failed[0]["message"]
    assert d.events(None, _st("Pending", "SecretNotFound"))[0]["type"] == "Warning"
    ok = {"state": "Succeeded", "conditions": [{"type": "WorkspaceSucceeded", "status": "True", "reason": "Succeeded",
                                                "message": "done"}]}
    assert d.events(_st("Running", "Running"), ok)[0]["type"] == "Normal"


# ------------------------------------------------------------------ settings and logs

def test_settings_from_env():
    s = from_env({"KAITO_LOG_LEVEL": "debug", "KAITO_WEBHOOK_PORT": "9443", "KAITO_NODE_AUTO_PROVISIONING": "yes",
                  "KAITO_WEBHOOK_SERVICE": "ns/svc", "KAITO_WEBHOOK_CONFIGURATION": "", "KAITO_RETRY_DELAY_SECONDS": "2.5",
                  "UNRELATED": "x"})
    assert s.log_level == "DEBUG" and s.webhook_port == 9443 and s.node_auto_provisioning is True
    assert s.webhook_service == "ns/svc" and s.webhook_configuration is None and s.retry_delay_seconds == 2.5
    assert from_env({}) == Settings()
    assert Settings().log_level == "INFO"


@pytest.mark.parametrize("env,field", [
    ({"KAITO_LOG_LEVEL": "LOUD"}, "KAITO_LOG_LEVEL"),
    ({"KAITO_WEBHOOK_PORT": "http"}, "KAITO_WEBHOOK_PORT"),
    ({"KAITO_WEBHOOK_PORT": "70000"}, "KAITO_WEBHOOK_PORT"),
    ({"KAITO_WEBHOOK_SERVICE": "no-namespace"}, "KAITO_WEBHOOK_SERVICE"),
    ({"KAITO_NODE_AUTO_PROVISIONING": "maybe"}, "KAITO_NODE_AUTO_PROVISIONING"),
    ({"KAITO_NODECLAIM_RELEASE": "Never"}, "KAITO_NODECLAIM_RELEASE"),
    ({"KAITO_RETRY_DELAY_SECONDS": "0"}, "KAITO_RETRY_DELAY_SECONDS"),
    ({"KAITO_JOB_BACKOFF_LIMIT": "-1"}, "KAITO_JOB_BACKOFF_LIMIT"),
])
def test_bad_settings_name_the_variable(env, field):
    with pytest.raises(UserError) as e:
        from_env(env)
    assert e.value.field == field


def test_log_lines_are_json_with_the_decision_and_redacted():
    stream = io.StringIO()
    handler = logs.configure("INFO", stream)
    try:
        logs.decision("default/w", "create-job", "created job w from https://h/x?sig=SECRET", revision=2)
        logs.log.debug("not shown")
        logs.failure("default/w", "OperatorError", "boom", ValueError("token=abc"))
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["level"] == "INFO" and lines[0]["workspace"] == "default/w" and lines[0]["decision"] == "create-job"
    assert lines[0]["revision"] == 2 and "SECRET" not in lines[0]["message"]
    assert lines[1]["level"] == "ERROR" and lines[1]["reason"] == "OperatorError"


# ------------------------------------------------------------------ the progress poll (issue 11, item 8)

@pytest.fixture
def server():
    """A tuner stand-in whose /progress answer is set per test: ok, trickling, redirecting, huge."""
    import http.server
    import threading
    import time

    mode = {"kind": "ok"}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            kind = mode["kind"]
            if kind == "redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            body = b'{"step": 3, "total_steps": 9}' if kind != "huge" else b'{"x": "' + b"a" * 200_000 + b'"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            if kind == "trickle":  # one byte per 0.5 s: each read is quick, the whole answer is not
                for b in body:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.5)
            else:
                self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], mode
    srv.shutdown()
    srv.server_close()


def test_progress_read_has_one_deadline_and_follows_no_redirect(server):
    import time

    from kaito_tuning.controller.reconciler import read_progress

    port, mode = server
    assert read_progress("127.0.0.1", port) == {"step": 3, "total_steps": 9}
    mode["kind"] = "trickle"
    t = time.monotonic()
    with pytest.raises(OSError):
        read_progress("127.0.0.1", port, deadline=1.0)
    assert time.monotonic() - t < 2.0, "a trickling pod held the poll past its deadline"
    mode["kind"] = "redirect"
    with pytest.raises(ValueError, match="HTTP 302"):
        read_progress("127.0.0.1", port)
    mode["kind"] = "huge"
    with pytest.raises(ValueError, match="larger than"):
        read_progress("127.0.0.1", port)


def _pushing(name, image, created, *, job=None, deleting=False, ns="default"):
    meta = {"name": name, "namespace": ns, "uid": f"uid-{name}", "creationTimestamp": created, "generation": 3,
            "labels": {"a": "b"}, "annotations": {"big": "x" * 1000}}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:09Z"
    return {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": meta,
            "resource": {"instanceType": "Standard_NC6s_v3"},
            "tuning": {"preset": {"name": "phi-3-mini-128k-instruct"}, "method": "lora",
                       "output": {"image": image, "imagePushSecret": "s"}},
            "status": {"tuning": {"jobName": job}} if job else {}}


def test_the_output_image_index_decides_as_the_full_list_does():
    """The operator keeps an index of output_image_claim(...) from its watch instead of listing every workspace
    on each reconcile: the owner found from the claims must be the one found from the whole objects."""
    img = "reg.example.com/team/adapter:1"
    me = _pushing("late", "REG.example.com/team/adapter:1", "2026-12-01T00:00:05Z")
    others = [_pushing("first", img, "2026-12-01T00:00:01Z", deleting=True),
              _pushing("second", img, "2026-12-01T00:00:03Z"),
              _pushing("same-second", img, "2026-12-01T00:00:03Z", job="same-second"),
              _pushing("other-tag", "reg.example.com/team/adapter:2", "2026-12-01T00:00:00Z"),
              _pushing("later", img, "2026-12-01T00:00:07Z"), me]
    claims = [d.output_image_claim(o) for o in others]
    same = [c for k, c in claims if k == d.image_key(me["tuning"]["output"]["image"])]
    assert len(same) == 5 and all("annotations" not in c["metadata"] for c in same)
    assert d.output_image_owner(me, same) == d.output_image_owner(me, others) == "default/same-second"
    for o in others:  # every workspace's answer, from its image's claims alone
        key = d.image_key(o["tuning"]["output"]["image"])
        assert d.output_image_owner(o, [c for k, c in claims if k == key]) == d.output_image_owner(o, others)
    assert d.output_image_claim({"metadata": {"name": "x"}, "tuning": {"output": {"volumeSource": {}}}}) is None
