"""``kaito-tuning demo``: its workspace is one the tuner accepts, it cleans up after itself, and
(slow) the whole loop really teaches SmolLM2 the facts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kaito_tuning import cli
from kaito_tuning.dev import demo

needs_registry = pytest.mark.skipif(not (shutil.which("docker-registry") or shutil.which("registry")),
                                    reason="docker-registry is not installed")


def test_dataset_teaches_every_fact_in_several_phrasings():
    rows = demo.dataset_rows()
    assert len(rows) == sum(len(f.questions) for f in demo.FACTS)
    for f in demo.FACTS:
        answers = [r["messages"][1]["content"] for r in rows if r["messages"][0]["content"] in f.questions]
        assert len(answers) >= 5 and all(f.keyword in a for a in answers)
        assert f.unseen not in f.questions  # the held-out phrasing is really held out
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def test_workspace_passes_the_tuners_validation(tmp_path):
    from kaito_tuning.tuner.local import load_spec

    ws, config = load_spec(demo.workspace_docs("http://127.0.0.1:8000/zorblax.parquet",
                                               "127.0.0.1:5000/demo/smollm2-adapter:0.0.1"))
    assert ws.tuning.preset.name == "smollm2-135m-instruct" and ws.tuning.method == "lora"
    assert config.section("TrainingArguments")["learning_rate"] == demo.TRAINING_CONFIG["training_config"][
        "TrainingArguments"]["learning_rate"]


def test_parquet_is_served_on_loopback(tmp_path):
    import urllib.request

    import pyarrow.parquet as pq

    path = demo.write_parquet(demo.dataset_rows(), tmp_path / "www" / "d.parquet")
    with demo.serve_directory(path.parent) as url:
        assert url.startswith("http://127.0.0.1:")
        body = urllib.request.urlopen(f"{url}/d.parquet", timeout=30).read()
    assert body == path.read_bytes()
    assert pq.read_table(path).num_rows == len(demo.dataset_rows())
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"{url}/d.parquet", timeout=5)


def _registry_children() -> list[int]:
    """Live docker-registry processes started by this test process."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid, state = int(stat.rsplit(")", 1)[1].split()[1]), stat.rsplit(")", 1)[1].split()[0]
        if ppid == me and state != "Z" and b"registry" in cmd:
            found.append(int(pid))
    return found


@needs_registry
@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupted_demo_stops_what_it_started(tmp_path, monkeypatch, failure):
    """Ctrl-C (or a crash) during training: the registry process and file server are gone, scratch removed."""
    import urllib.request

    from kaito_tuning.tuner import local

    seen = {}

    def fail(docs, **kw):
        seen["url"] = docs[0]["tuning"]["input"]["urls"][0]
        seen["registry"] = _registry_children()
        raise failure("stop")

    others = set(_registry_children())  # a session fixture's registry may be running
    monkeypatch.setattr(local, "run_local", fail)
    with pytest.raises(failure):
        demo.run_demo(3, tmp_path)
    assert set(seen["registry"]) - others, "the demo should have started a registry"
    assert set(_registry_children()) == others
    with pytest.raises(OSError):
        urllib.request.urlopen(seen["url"], timeout=5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("scratch-")] == []


def test_steps_must_be_positive(capsys):
    assert cli.main(["demo", "--steps", "0"]) == 65
    assert "--steps: must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on an idle 2-core machine; far more when it is shared
@needs_registry
def test_demo_teaches_the_facts(capsys, tmp_path):
    """The real thing, fewer steps: SmolLM2 from the offline package, trained, pushed, pulled, asked."""
    steps = int(os.environ.get("KAITO_DEMO_TEST_STEPS", "14"))
    others = set(_registry_children())
    demo._quiet()
    result = demo.run_demo(steps, tmp_path)
    out = capsys.readouterr().out
    trained = [a for a in result.answers if a.seen]
    assert len(trained) == len(demo.FACTS)
    # every fact it was taught is in the tuned answer, and in none of the base model's
    missing = [(a.question, a.tuned) for a in trained if not a.taught]
    assert not missing, missing
    assert not any(a.keyword.lower() in a.base.lower() for a in result.answers)
    assert all(a.tuned != a.base for a in result.answers)
    # what was printed: both answers, the summary, the loss curve that exists, the adapter kept
    for a in result.answers:
        assert f"Q: {a.question}" in out and a.tuned.split()[0] in out
    text = demo.summary(result)
    assert f"in {sum(a.taught for a in result.answers)}/{len(result.answers)} tuned answers and 0/" in text
    assert Path(result.loss_curve).is_file() and f"Loss curve: {result.loss_curve}" in text
    assert (Path(result.adapter_dir) / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # scratch (data, pulled copy) removed
    assert set(_registry_children()) == others
