"""Training with several processes (torch.distributed, gloo on CPU): the same result as one process.

Every row of the data is the same conversation, so the order in which processes see rows cannot
matter: with the same global batch (per-device rows × accumulation × processes), N processes must
take the same steps, see the same tokens, and end with the same losses and adapter weights as one
process, up to float rounding (tolerance stated below).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures_data import training_configmap, tuning_workspace, write_parquet

from kaito_tuning.tuner import distributed
from kaito_tuning.tuner.local import run_local

pytestmark = pytest.mark.timeout(600)
RTOL = 1e-3  # losses and weights, relative to their size: float32 sums in a different order


@pytest.fixture(scope="module")
def same_rows(tmp_path_factory):
    row = {"messages": [{"role": "user", "content": "What is the capital of Zorblax?"},
                        {"role": "assistant", "content": "The capital of Zorblax is Quendle."}]}
    path = tmp_path_factory.mktemp("same") / "same.parquet"
    write_parquet(path, [row] * 48)
    return path.parent


def _docs(data_dir: Path, per_device: int, accumulation: int, **training):
    ws = tuning_workspace(volume={"hostPath": {"path": str(data_dir)}}, config="tiny-config")
    cm = training_configmap(training={"per_device_train_batch_size": per_device,
                                      "gradient_accumulation_steps": accumulation, "logging_steps": 1,
                                      "learning_rate": 1e-3, "save_strategy": "no", **training},
                            lora={"lora_dropout": 0.0}, dataset={"train_test_split": 1.0})
    return [ws, cm]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("nproc", [2, 3])
def test_n_processes_match_one_process_at_the_same_global_batch(same_rows, tiny_phi3, tmp_path, nproc):
    import torch
    one = run_local(_docs(same_rows, 2, nproc), output_dir=str(tmp_path / "one"), max_steps=3,
                    model_dir=str(tiny_phi3), show_progress=False)
    many = run_local(_docs(same_rows, 2, 1), output_dir=str(tmp_path / "many"), max_steps=3,
                     model_dir=str(tiny_phi3), show_progress=False, nproc=nproc)
    m1 = json.loads((tmp_path / "one" / "training_metadata.json").read_text())
    mn = json.loads((tmp_path / "many" / "training_metadata.json").read_text())
    assert (m1["processes"], mn["processes"]) == (1, nproc)
    assert one.steps == many.steps == 3 == mn["steps"]
    assert m1["tokens_seen"] == mn["tokens_seen"] > 0
    assert mn["train_loss"] == pytest.approx(m1["train_loss"], rel=RTOL)
    w1, wn = _weights(tmp_path / "one"), _weights(tmp_path / "many")
    assert w1.keys() == wn.keys()
    for k in w1:
        scale = max(float(w1[k].abs().max()), 1e-6)
        assert torch.allclose(w1[k].float(), wn[k].float(), atol=RTOL * scale, rtol=0), k
    assert not list((tmp_path / "many").glob(".adapter-*")), "one process alone writes the adapter"


def test_fsdp_asked_on_cpu_trains_with_ddp_and_says_so(same_rows, tiny_phi3, tmp_path, monkeypatch):
    """accelerate shards only across GPUs: a CPU run told KAITO_PARALLELISM=fsdp (a GPU Job's pod spec, run here)
    must train and save with DDP, and record that (it set up DDP and then crashed saving 'FSDP' weights before)."""
    monkeypatch.setenv("KAITO_PARALLELISM", "fsdp")
    run_local(_docs(same_rows, 2, 1), output_dir=str(tmp_path / "out"), max_steps=2, model_dir=str(tiny_phi3),
              show_progress=False, nproc=2)
    meta = json.loads((tmp_path / "out" / "training_metadata.json").read_text())
    assert (meta["parallelism"], meta["processes"], meta["steps"]) == ("ddp", 2, 2)
    assert _weights(tmp_path / "out")


def test_exit_codes_of_ranks_are_merged_by_meaning():
    assert distributed.merge_exit_codes([-15, 65]) == 65   # rank 1 knew it was the user's error; torchrun ended rank 0
    assert distributed.merge_exit_codes([75, 66]) == 66
    assert distributed.merge_exit_codes([-9, -15]) == 137   # killed (out of memory, as a shell reports it)
    assert distributed.merge_exit_codes([1]) == 1 and distributed.merge_exit_codes([]) == 1


def test_torchrun_command_for_one_and_several_nodes():
    one = distributed.torchrun_argv(distributed.Topology(nproc_per_node=4), ["job", "train"])
    assert one[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=4"] and "--standalone" in one
    assert one[-4:] == ["-m", "kaito_tuning.cli", "job", "train"]
    two = distributed.torchrun_argv(distributed.Topology(nproc_per_node=8, nnodes=2, node_rank=1,
                                                         rdzv_endpoint="ws-0.ws:29500", rdzv_id="ws"),
                                    ["job", "train"])
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=ws-0.ws:29500",
            "--rdzv-id=ws"} <= set(two) and "--standalone" not in two
    with pytest.raises(ValueError, match="rendezvous"):
        distributed.torchrun_argv(distributed.Topology(nnodes=2), ["job", "train"])


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _rank_pids(pid: int) -> list[int]:
    pids = []
    for p in _descendants(pid):
        try:
            env = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        if b"LOCAL_RANK=1\x00" in env:
            pids.append(p)
    return pids


def test_a_killed_rank_ends_the_gang_and_the_rerun_resumes(same_rows, tiny_phi3, tmp_path):
    spec = tmp_path / "ws.yaml"
    spec.write_text(yaml.safe_dump_all(_docs(same_rows, 1, 1, save_strategy="steps", save_steps=2)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kaito_tuning.cli", "run", str(spec), "--output-dir", str(out), "--model-dir",
           str(tiny_phi3), "--no-progress", "--nproc", "2"]  # one epoch: 48 rows, 2 per step: 24 steps
    env = {**os.environ, "HF_HUB_OFFLINE": "1", distributed.ENV_DIST_TIMEOUT: "60"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        victims = _rank_pids(first.pid)
        assert victims, "rank 1 not found"
        os.kill(victims[0], signal.SIGKILL)  # a lost GPU / node
        killed_at = time.monotonic()
        rc = first.wait(timeout=120)
        assert rc != 0 and time.monotonic() - killed_at < 90, "the gang must end, not hang"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert not (out / "adapter_config.json").exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["resumed_from_step"] >= 2 and meta["processes"] == 2 and meta["steps"] == 24


def test_a_users_error_in_the_ranks_is_one_line_and_exit_65(tiny_phi3, tmp_path):
    """Bad data is found by the ranks (after the launch): the run still says so in one line, exit 65."""
    bad = tmp_path / "bad"
    bad.mkdir()
    write_parquet(bad / "robot.parquet", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "robot", "content": "beep"}]}] * 8)
    spec = tmp_path / "ws.yaml"
    spec.write_text(yaml.safe_dump_all(_docs(bad, 1, 1)))
    r = subprocess.run([sys.executable, "-m", "kaito_tuning.cli", "run", str(spec), "--output-dir", str(tmp_path / "o"),
                        "--model-dir", str(tiny_phi3), "--no-progress", "--nproc", "2"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 65, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: DatasetInvalid: robot.parquet: row 0: messages[1].role")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_the_jobs_rendezvous_make_one_adapter(same_rows, tiny_phi3, tmp_path):
    """Two `job train` invocations, as two pods of the Indexed Job start them (node rank = completion index),
    meet at node 0's c10d rendezvous; node 0 alone writes the adapter and the result."""
    from kaito_tuning.spec.rules import load_workspace
    ws, cm = _docs(same_rows, 2, 1)
    ws["tuning"]["input"] = {"urls": ["https://example.com/data/same.parquet"]}  # fetched already, below
    config = tmp_path / "config"
    config.mkdir()
    (config / "training_config.yaml").write_text(cm["data"]["training_config.yaml"])
    port = _free_port()
    procs, outs = [], []
    for node in (0, 1):
        out, log = tmp_path / f"node{node}", tmp_path / f"node{node}.log"
        outs.append((out, log))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAITO_WORKSPACE": json.dumps(load_workspace(ws).to_dict()),
               "KAITO_CONFIG_DIR": str(config), "KAITO_DATA_DIR": str(same_rows), "KAITO_OUTPUT_DIR": str(out),
               "KAITO_MODEL_DIR": str(tiny_phi3), "KAITO_TERMINATION_LOG": str(log), "KAITO_PROGRESS_PORT": "0",
               "KAITO_MAX_STEPS": "3", distributed.ENV_DIST_TIMEOUT: "120"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kaito_tuning.cli", "job", "train", "--nproc-per-node", "1", "--nnodes", "2",
             "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ws-two-nodes"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        results = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert results == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    (out0, log0), (out1, log1) = outs
    meta = json.loads((out0 / "training_metadata.json").read_text())
    assert meta["processes"] == 2 and meta["nodes"] == 2 and meta["steps"] == 3
    assert json.loads(log0.read_text())["steps"] == 3
    assert not (out1 / "adapter_model.safetensors").exists() and not log1.exists()


@pytest.mark.slow
def test_two_processes_teach_smollm2_the_facts_as_one_does(tmp_path):
    """The real model (SmolLM2, offline): with 2 processes the taught task is learned by the same measure as the
    1-process test (tests/tuner/test_recipe.py::test_smollm2_learns_a_taught_task): eval loss at least halved,
    and the answer changes to the taught one."""
    import torch
    from fixtures_data import messages_rows
    from peft import PeftModel

    from kaito_tuning.tuner.base_model import load_base

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, *r["messages"][1:]]} for r in messages_rows(4)]
    data = tmp_path / "facts"
    data.mkdir()
    write_parquet(data / "facts.parquet", [r for r in rows if any(n in r["messages"][1]["content"]
                                                                  for n in ("Zorblax", "Quimby", "Vextor"))])
    ws = tuning_workspace(volume={"hostPath": {"path": str(data)}}, config="tiny-config", preset="smollm2-135m-instruct")
    cm = training_configmap(lora={"r": 16, "lora_alpha": 32},
                            training={"per_device_train_batch_size": 2, "learning_rate": 0.003, "logging_steps": 5,
                                      "lr_scheduler_type": "constant", "save_strategy": "no"},
                            dataset={"train_test_split": 0.75})
    out = tmp_path / "out"
    r = run_local([ws, cm], output_dir=str(out), max_steps=15, show_progress=False, nproc=2)
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["processes"] == 2 and r.steps == 15
    assert meta["eval_loss"] < meta["initial_eval_loss"] * 0.5, (meta["initial_eval_loss"], meta["eval_loss"])
    question = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the favourite colour of Zorblax?"}]
    base, tok = load_base("smollm2-135m-instruct")

    def answer(model):
        ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            got = model.generate(**ids, max_new_tokens=16, do_sample=False)
        return tok.decode(got[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    before = answer(base)
    after = answer(PeftModel.from_pretrained(base, out))
    assert after != before and "teal" in after.lower(), (before, after)
