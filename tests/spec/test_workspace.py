"""The Workspace model: the quick start as written, defaults, and every bad input of issue 2."""

import copy
from pathlib import Path

import pytest
import yaml

from kaito_tuning.errors import ValidationError
from kaito_tuning.spec.rules import (
    load_workspace,
    url_problem,
    validate_update,
    validate_workspace,
)
from kaito_tuning.spec.workspace import parse_workspace

ROOT = Path(__file__).resolve().parents[2]
QUICK_START = ROOT / "examples/fine-tuning/kaito_workspace_tuning_phi_3.yaml"


def quick_start() -> dict:
    return yaml.safe_load(QUICK_START.read_text())


def problems_of(obj: dict, **kw) -> list[str]:
    ws, found = parse_workspace(obj)
    return [str(p) for p in found + validate_workspace(ws, **kw)]


def test_quick_start_is_exactly_the_developers_text():
    text = QUICK_START.read_text()
    assert 'image: "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1" # Tuning Output ACR Path' in text
    assert "imagePushSecret: ACR_REGISTRY_SECRET_HERE" in text


@pytest.mark.parametrize("version", ["v1alpha1", "v1beta1"])
def test_quick_start_accepted_in_both_versions(version):
    obj = quick_start()
    obj["apiVersion"] = f"kaito.sh/{version}"
    ws = load_workspace(obj)
    assert ws.tuning.method == "qlora"
    assert ws.tuning.preset.name == "phi-3-mini-128k-instruct"
    assert ws.resource.instance_type == "Standard_NC6s_v3"
    assert ws.resource.count == 1
    assert ws.name == "workspace-tuning-phi-3"


def test_defaults_method_case_and_v1alpha1_instance_type():
    obj = quick_start()
    obj["tuning"]["method"] = "QLoRA"
    del obj["resource"]["instanceType"]
    ws = load_workspace(obj)
    assert ws.tuning.method == "qlora"
    assert ws.resource.instance_type == "Standard_NC24ads_A100_v4"
    obj["apiVersion"] = "kaito.sh/v1beta1"  # v1beta1: no default (bring-your-own nodes)
    assert load_workspace(obj).resource.instance_type is None


def test_round_trip_to_dict():
    ws = load_workspace(quick_start())
    again = load_workspace(ws.to_dict())
    assert again.to_dict() == ws.to_dict()


def mutate(path: str, value=..., *, delete=False) -> dict:
    obj = quick_start()
    *parents, last = path.split(".")
    node = obj
    for k in parents:
        node = node[k]
    if delete:
        del node[last]
    else:
        node[last] = value
    return obj


BAD = [
    # (what, object, expected field path, words in the message)
    ("missing input", mutate("tuning.input", delete=True), "tuning.input", "is required"),
    ("urls and image", mutate("tuning.input.image", "myreg.io/data:1"), "tuning.input",
     "exactly one of urls, image or volumeSource"),
    ("method full", mutate("tuning.method", "full"), "tuning.method", "'full' is not supported: use lora or qlora"),
    ("unknown preset", mutate("tuning.preset.name", "phi-3-mini-128k-instruc"), "tuning.preset.name",
     "did you mean phi-3-mini-128k-instruct"),
    ("preset without tuning", mutate("tuning.preset.name", "deepseek-r1-distill-llama-8b"), "tuning.preset.name",
     "does not support tuning"),
    ("no GPU", mutate("resource.instanceType", "Standard_D2s_v3"), "resource.instanceType", "has no GPU"),
    ("unknown instance", mutate("resource.instanceType", "Standard_NC6s_v9"), "resource.instanceType",
     "unknown instance type"),
    ("ftp url", mutate("tuning.input.urls", ["ftp://x"]), "tuning.input.urls[0]", "only http and https"),
    ("credentials in url", mutate("tuning.input.urls", ["http://user:pw@host/x"]), "tuning.input.urls[0]",
     "must not carry credentials"),
    ("not a url", mutate("tuning.input.urls", ["not a url"]), "tuning.input.urls[0]", "is not a URL"),
    ("space in url", mutate("tuning.input.urls", ["https://h/a b.parquet"]), "tuning.input.urls[0]", "white space"),
    ("no scheme", mutate("tuning.input.urls", ["example.com/data.parquet"]), "tuning.input.urls[0]", "is not a URL"),
    ("image without push secret", mutate("tuning.output.imagePushSecret", delete=True),
     "tuning.output.imagePushSecret", "is required with image"),
    ("bad image", mutate("tuning.output.image", "UPPER/Case::bad"), "tuning.output.image", "is invalid"),
    ("image without tag", mutate("tuning.output.image", "myreg.azurecr.io/adapter"), "tuning.output.image",
     "has no tag"),
    ("count 65", mutate("resource.count", 65), "resource.count", "tuning runs on 1 to 64 nodes"),
    ("no labelSelector", mutate("resource.labelSelector", delete=True), "resource.labelSelector", "is required"),
    ("bad name", mutate("metadata.name", "Tuning_Phi3"), "metadata.name", "not a valid name"),
    ("typo field", mutate("tuning.methd", "lora"), "tuning.methd", "unknown field"),
    ("wrong type", mutate("tuning.input.urls", "https://x/y.parquet"), "tuning.input.urls", "must be a list"),
    ("both tuning and inference", mutate("inference", {"preset": {"name": "phi-3-mini-128k-instruct"}}), "",
     "either tuning or inference, not both"),
]


@pytest.mark.parametrize("what,obj,path,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_field_and_fix(what, obj, path, words):
    found = problems_of(obj)
    matching = [p for p in found if (p.startswith(f"{path}: ") if path else True) and words in p]
    assert matching, f"expected '{path}: ...{words}...' among {found}"


def test_push_secret_next_to_output_volume_is_accepted_as_kaito_does():
    obj = quick_start()
    obj["tuning"]["output"] = {"volumeSource": {"persistentVolumeClaim": {"claimName": "out"}},
                               "imagePushSecret": "s"}
    assert problems_of(obj) == []


def test_phi3_medium_qlora_does_not_fit_16gb_and_says_what_would():
    obj = mutate("tuning.preset.name", "phi-3-medium-128k-instruct")
    (p,) = [p for p in problems_of(obj) if p.startswith("resource.instanceType")]
    assert "needs about 18 GiB" in p and "Standard_NC6s_v3 has 16 GiB" in p
    assert "Standard_NV36ads_A10_v5" in p  # the smallest type that fits is named


def test_lora_too_big_suggests_qlora():
    obj = mutate("tuning.method", "lora")
    obj["resource"]["instanceType"] = "Standard_NV18ads_A10_v5"  # 12 GiB
    (p,) = [p for p in problems_of(obj) if p.startswith("resource.instanceType")]
    assert "use method qlora" in p


def test_every_problem_is_reported_at_once():
    obj = quick_start()
    obj["tuning"]["method"] = "full"
    obj["tuning"]["input"]["urls"] = ["ftp://a"]
    obj["resource"]["instanceType"] = "Standard_D2s_v3"
    with pytest.raises(ValidationError) as e:
        load_workspace(obj)
    assert {p.path for p in e.value.problems} >= {"tuning.method", "tuning.input.urls[0]", "resource.instanceType"}


def test_private_urls_refused_only_when_asked():
    for url in ("http://127.0.0.1:8000/x.parquet", "http://169.254.169.254/latest", "http://10.1.2.3/x",
                "http://localhost/x", "http://metadata.google.internal/x", "http://[::1]/x"):
        assert url_problem(url) is None, url
        assert "refuses private" in url_problem(url, allow_private=False), url
    assert url_problem("https://93.184.216.34/data.parquet", allow_private=False) is None


def test_a_name_resolving_to_a_private_address_is_refused_and_lookups_are_reused(monkeypatch):
    """Names are resolved (a public-looking name of an internal service is refused), once per host and TTL: the
    operator validates every workspace on every reconcile, and one slow lookup each held 300 of them back."""
    from kaito_tuning.spec import rules

    calls = []

    def fake_getaddrinfo(host, port, *a, **k):
        calls.append(host)
        if host == "gone.example.com":
            raise OSError("Name or service not known")
        ip = "10.0.0.7" if host == "internal.example.com" else "93.184.216.34"
        return [(2, 1, 6, "", (ip, 0))]

    clock = [1000.0]
    monkeypatch.setattr(rules.socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(rules.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(rules, "_RESOLVED", {})
    assert "'internal.example.com', which resolves to 10.0.0.7, which is a private address" in url_problem(
        "https://internal.example.com/x.parquet", allow_private=False)
    for _ in range(3):
        assert url_problem("https://data.example.com/x.parquet", allow_private=False) is None
        assert url_problem("https://gone.example.com/x.parquet", allow_private=False) is None  # the downloader checks
    assert sorted(calls) == ["data.example.com", "gone.example.com", "internal.example.com"]
    clock[0] += rules.RESOLVE_TTL_SECONDS + 1
    url_problem("https://data.example.com/x.parquet", allow_private=False)
    assert calls.count("data.example.com") == 2


def test_inference_adapters_rules():
    obj = yaml.safe_load((ROOT / "examples/inference/kaito_workspace_phi_3_with_adapters.yaml").read_text())
    assert problems_of(obj) == []
    adapter = obj["inference"]["adapters"][0]
    bad = copy.deepcopy(obj)
    bad["inference"]["adapters"] = [dict(copy.deepcopy(adapter), strength=s) for s in ("1.5", "abc")]
    bad["inference"]["adapters"][1]["source"]["name"] = "other"
    found = problems_of(bad)
    assert any("adapters[0].strength" in p and "out of range" in p for p in found)
    assert any("adapters[1].strength" in p and "not a number" in p for p in found)
    many = copy.deepcopy(obj)
    many["inference"]["adapters"] = [copy.deepcopy(adapter) for _ in range(11)]
    for i, a in enumerate(many["inference"]["adapters"]):
        a["source"]["name"] = f"a{i}"
    assert any("at most 10" in p for p in problems_of(many))
    dup = copy.deepcopy(obj)
    dup["inference"]["adapters"] = [copy.deepcopy(adapter), copy.deepcopy(adapter)]
    assert any("names must be unique" in p for p in problems_of(dup))


def test_update_rules():
    old = load_workspace(quick_start())
    new_obj = quick_start()
    new_obj["tuning"]["input"]["urls"] = ["https://example.com/other.parquet"]
    new_obj["tuning"]["output"]["image"] = "myreg.azurecr.io/adapter:0.0.2"
    assert validate_update(old, load_workspace(new_obj)) == []  # input/output may change: a new run
    for path, value in (("tuning.method", "lora"), ("tuning.preset.name", "phi-3-mini-4k-instruct"),
                        ("resource.instanceType", "Standard_NC24ads_A100_v4"),
                        ("resource.labelSelector", {"matchLabels": {"app": "other"}})):
        changed = load_workspace(mutate(path, value))
        assert [p.path for p in validate_update(old, changed)] == [path], path
    obj = quick_start()
    obj["tuning"]["method"] = "QLORA"  # same method in another case: not a change
    assert validate_update(old, load_workspace(obj)) == []
    swapped = quick_start()
    del swapped["tuning"]
    swapped["inference"] = {"preset": {"name": "phi-3-mini-128k-instruct"}}
    assert {p.path for p in validate_update(old, parse_workspace(swapped)[0])} == {"tuning", "inference"}
