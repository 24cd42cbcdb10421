"""Validation for runs past one GPU and one node: resource.count for tuning, the per-GPU memory check."""

from __future__ import annotations

import yaml

from kaito_tuning.spec.rules import MAX_TUNING_NODES, validate_workspace
from kaito_tuning.spec.workspace import parse_workspace

QUICK = "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"


def problems(mutate) -> list[str]:
    obj = yaml.safe_load(open(QUICK))
    mutate(obj)
    ws, found = parse_workspace(obj)
    return [str(p) for p in found + validate_workspace(ws)]


def test_two_nodes_are_allowed_for_tuning():
    assert problems(lambda o: o["resource"].update(count=2)) == []


def test_node_count_bounds():
    assert any("1 to" in p for p in problems(lambda o: o["resource"].update(count=MAX_TUNING_NODES + 1)))


def test_several_nodes_do_not_share_an_output_volume():
    def m(o):
        o["resource"]["count"] = 2
        o["tuning"]["output"] = {"volumeSource": {"persistentVolumeClaim": {"claimName": "out"}}}
    (p,) = problems(m)
    assert p.startswith("resource.count:") and "tuning.output.image" in p


def test_pod_hostnames_fit_a_dns_label():
    def m(o):
        o["metadata"]["name"] = "x" * 62
        o["resource"]["count"] = 12
    (p,) = problems(m)
    assert p.startswith("metadata.name:") and "at most 60 characters" in p


def test_memory_is_checked_per_gpu_and_fsdp_makes_a_big_model_fit_a_node():
    def on(instance, method="lora", count=1):
        def m(o):
            o["resource"].update(instanceType=instance, count=count)
            o["tuning"].update(method=method, preset={"name": "qwen2.5-coder-32b-instruct"})
        return [p for p in problems(m) if p.startswith("resource.instanceType")]

    assert on("Standard_ND96asr_A100_v4") == []  # 8 x 40 GiB: sharded
    assert on("Standard_NC24ads_A100_v4") == []  # one 80 GiB GPU holds 76
    (p,) = on("g5.12xlarge")  # 4 x 24 GiB: about 28 GiB per GPU even sharded
    assert "needs about 76 GiB" in p and "24 GiB per GPU" in p and "sharded over all 4 GPUs" in p
    assert "instance types that fit:" in p and "use method qlora" in p
    assert on("g5.12xlarge", count=2) == []  # two such nodes: 8 GPUs
