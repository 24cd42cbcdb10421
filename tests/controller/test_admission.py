"""Admission: the validator refuses bad workspaces, directly and through kopf's webhook server."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest
import yaml
from fixtures_k8s import Emulator, running_operator

from kaito_tuning.controller.admission import review
from kaito_tuning.controller.settings import Settings

QUICK = "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"


def quick():
    return yaml.safe_load(open(QUICK))


def test_valid_workspace_is_admitted():
    assert review(quick(), None, "CREATE", deny_private_urls=True) == []


def test_method_change_is_refused_on_update():
    new = quick()
    new["tuning"]["method"] = "lora"
    problems = review(new, quick(), "UPDATE", deny_private_urls=False)
    assert [p.path for p in problems] == ["tuning.method"]
    assert "immutable" in problems[0].message


def test_bad_spec_gets_the_validator_messages():
    bad = quick()
    bad["tuning"]["method"] = "full"
    bad["resource"]["instanceType"] = "Standard_D4s_v3"
    paths = {p.path for p in review(bad, None, "CREATE", deny_private_urls=False)}
    assert {"tuning.method", "resource.instanceType"} <= paths


def test_private_urls_refused_only_when_the_setting_says_so():
    ws = quick()
    ws["tuning"]["input"]["urls"] = ["http://169.254.169.254/latest/meta-data"]
    assert review(ws, None, "CREATE", deny_private_urls=False) == []
    problems = review(ws, None, "CREATE", deny_private_urls=True)
    assert problems and problems[0].path == "tuning.input.urls[0]"


def test_named_configmap_is_validated_when_readable():
    ws = quick()
    ws["tuning"]["config"] = "mine"
    text = "training_config:\n  LoraConfig:\n    rank: 8\n"
    problems = review(ws, None, "CREATE", deny_private_urls=False, read_config=lambda ns, name: text)
    assert any("LoraConfig.rank" in p.path and "'r'" in p.message for p in problems)
    assert review(ws, None, "CREATE", deny_private_urls=False, read_config=lambda ns, name: None) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _review_request(obj, old, operation):
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "kaito.sh", "version": "v1beta1", "kind": "Workspace"},
                        "resource": {"group": "kaito.sh", "version": "v1beta1", "resource": "workspaces"},
                        "requestKind": {"group": "kaito.sh", "version": "v1beta1", "kind": "Workspace"},
                        "requestResource": {"group": "kaito.sh", "version": "v1beta1", "resource": "workspaces"},
                        "name": obj["metadata"]["name"], "namespace": "default", "operation": operation,
                        "userInfo": {"username": "u"}, "object": obj, "oldObject": old, "dryRun": False,
                        "options": None}}


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


async def _review_when_up(url, obj, old, operation, until=lambda answer: True) -> dict:
    """The webhook's answer once its server is up (it starts with the operator) and ``until`` holds, 10 s at most."""
    answer = None
    for _ in range(100):
        try:
            answer = await asyncio.to_thread(_post, url, _review_request(obj, old, operation))
            if until(answer):
                break
        except OSError:
            pass
        await asyncio.sleep(0.1)
    assert answer is not None, "the webhook server did not come up"
    return answer


@pytest.mark.kmock(cls=Emulator)
@pytest.mark.timeout(60)
async def test_through_kopfs_webhook_server(kmock, kubeconfig):
    port = _free_port()
    async with running_operator(Settings(webhook_port=port, webhook_insecure=True)):
        url = f"http://127.0.0.1:{port}/validate-v1beta1"
        ok = await _review_when_up(url, quick(), None, "CREATE")
        assert ok["response"]["allowed"] is True
        new = quick()
        new["tuning"]["method"] = "lora"
        res = await asyncio.to_thread(_post, url, _review_request(new, quick(), "UPDATE"))
        assert res["response"]["allowed"] is False
        assert "tuning.method" in res["response"]["status"]["message"]


@pytest.mark.kmock(cls=Emulator)
@pytest.mark.timeout(60)
async def test_the_webhook_refuses_an_output_image_another_workspace_pushes_to(kmock, kubeconfig):
    """Through kopf's webhook server: the other workspaces come from the operator's index of output images."""
    from fixtures_k8s import kubectl

    port = _free_port()
    async with running_operator(Settings(webhook_port=port, webhook_insecure=True)):
        url = f"http://127.0.0.1:{port}/validate-v1beta1"
        await kubectl("apply", "-f", "-", input=yaml.safe_dump(quick()))
        copycat = quick()
        copycat["metadata"]["name"] = "copycat"
        # the index fills from the watch: until the applied workspace is in it
        res = await _review_when_up(url, copycat, None, "CREATE", until=lambda a: a["response"]["allowed"] is False)
        assert res["response"]["allowed"] is False
        assert "tuning.output.image: is already the output of workspace default/workspace-tuning-phi-3" in \
            res["response"]["status"]["message"]
        copycat["tuning"]["output"]["image"] = "registry.example.com/team/other:1"
        res = await asyncio.to_thread(_post, url, _review_request(copycat, None, "CREATE"))
        assert res["response"]["allowed"] is True


@pytest.mark.kmock(cls=Emulator)
@pytest.mark.timeout(60)
async def test_managed_configuration_trusts_the_generated_certificate(kmock, kubeconfig):
    """No cert-manager: kopf serves TLS with a generated certificate for the Service's DNS name and writes a
    ValidatingWebhookConfiguration (Service reference + caBundle) that verifies it, as the API server will."""
    import base64
    import socket
    import ssl

    from fixtures_k8s import eventually, get_obj

    port = _free_port()
    settings = Settings(webhook_port=port, webhook_service="kaito-tuning/kaito-tuning-webhook",
                        webhook_configuration="kaito-tuning.kaito.sh")
    async with running_operator(settings):
        hooks = await eventually(lambda: (c := get_obj(
            kmock, "admissionregistration.k8s.io/v1/validatingwebhookconfigurations", None, "kaito-tuning.kaito.sh"))
            and c.get("webhooks"), timeout=30)
        by_path = {h["clientConfig"]["service"]["path"]: h for h in hooks}
        hook = by_path["/validate-v1beta1"]
        assert hook["clientConfig"]["service"] == {"name": "kaito-tuning-webhook", "namespace": "kaito-tuning",
                                                   "port": 443, "path": "/validate-v1beta1"}
        assert hook["failurePolicy"] == "Fail" and hook["rules"][0]["apiGroups"] == ["kaito.sh"]
        ctx = ssl.create_default_context(cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode())

        def review(obj):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            tls = ctx.wrap_socket(raw, server_hostname="kaito-tuning-webhook.kaito-tuning.svc")
            body = json.dumps(_review_request(obj, None, "CREATE")).encode()
            tls.sendall(b"POST /validate-v1beta1 HTTP/1.1\r\nHost: kaito-tuning-webhook.kaito-tuning.svc\r\n"
                        b"Content-Type: application/json\r\nConnection: close\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            tls.close()
            return json.loads(data.split(b"\r\n\r\n", 1)[1])

        res = await asyncio.to_thread(review, quick())
        assert res["response"]["allowed"] is True
        bad = quick()
        bad["tuning"]["method"] = "nope"
        res = await asyncio.to_thread(review, bad)
        assert res["response"]["allowed"] is False and "tuning.method" in res["response"]["status"]["message"]


def test_volume_types_follow_the_operator_setting():
    from kaito_tuning.controller.settings import from_env
    from kaito_tuning.errors import UserError

    ws = quick()
    ws["tuning"]["input"] = {"volumeSource": {"nfs": {"server": "nfs.example.com", "path": "/data"}}}
    assert review(ws, None, "CREATE", deny_private_urls=True, volume_types=Settings().volume_types) == []
    only_pvc = from_env({"KAITO_ALLOWED_VOLUME_TYPES": "persistentVolumeClaim, configMap"})
    assert only_pvc.volume_types == ("persistentVolumeClaim", "configMap")
    (p,) = review(ws, None, "CREATE", deny_private_urls=True, volume_types=only_pvc.volume_types)
    assert p.path == "tuning.input.volumeSource.nfs" and "allowed: persistentVolumeClaim, configMap" in p.message
    with pytest.raises(UserError, match="KAITO_ALLOWED_VOLUME_TYPES.*unknown: hostpath"):
        from_env({"KAITO_ALLOWED_VOLUME_TYPES": "hostpath"})


def test_an_output_image_already_pushed_to_by_another_workspace_is_refused():
    first = quick()
    first["metadata"].update(namespace="team-a", creationTimestamp="2025-01-01T00:00:00Z", uid="u1")
    second = quick()
    second["metadata"]["namespace"] = "team-b"
    problems = review(second, None, "CREATE", deny_private_urls=False, list_workspaces=lambda: [first])
    assert [p.path for p in problems] == ["tuning.output.image"]
    assert "team-a/workspace-tuning-phi-3" in problems[0].message
    # same repository:tag spelled differently is the same image; another tag is not
    second["tuning"]["output"]["image"] = first["tuning"]["output"]["image"].replace(":0.0.1", ":0.0.2")
    assert review(second, None, "CREATE", deny_private_urls=False, list_workspaces=lambda: [first]) == []
    # the workspace itself (an UPDATE) and an unreadable list are no conflict
    assert review(first, first, "UPDATE", deny_private_urls=False, list_workspaces=lambda: [first]) == []
    assert review(quick(), None, "CREATE", deny_private_urls=False, list_workspaces=lambda: None) == []


def test_image_identity():
    from kaito_tuning.controller.decisions import image_key

    assert image_key("Registry.Example.com/a/b") == image_key("registry.example.com/a/b:latest")
    assert image_key("ubuntu:22.04") == "docker.io/library/ubuntu:22.04"
