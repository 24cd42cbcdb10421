"""Training faults through ``kaito-tuning job train``: the pod killed (SIGKILL) in the middle of a checkpoint
save, and the output volume full while the adapter is saved. Each rerun must finish from what is complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess

import pytest
from fixtures_data import training_configmap, tuning_workspace

from kaito_tuning.contract import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE, PROGRESS_FILE
from kaito_tuning.tuner.checkpoints import CHECKPOINTS, newest_checkpoint
from kaito_tuning.tuner.outputs import completed_adapter

PVC_INPUT = {"persistentVolumeClaim": {"claimName": "data"}}

#: run in the child before the CLI: the save of checkpoint-4 writes half its trainer_state.json, then the
#: process is killed with SIGKILL (a node lost, an eviction past its grace period) before it can finish
KILL_DURING_SAVE = """
import os, signal
from transformers.trainer_callback import TrainerState
_save = TrainerState.save_to_json
def save_to_json(self, json_path):
    _save(self, json_path)
    if os.path.basename(os.path.dirname(json_path)) == "checkpoint-4":
        with open(json_path, "r+") as f:
            f.truncate(len(f.read()) // 2)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
TrainerState.save_to_json = save_to_json
"""


def _volume_job(pod, datasets_dir, **training) -> None:
    shutil.copy(datasets_dir["messages"], pod.data / "chat.parquet")
    pod.set(tuning_workspace(volume=PVC_INPUT, config="tiny-config"),
            training_configmap(training={"per_device_train_batch_size": 2, "logging_steps": 1, **training},
                               dataset={"train_test_split": 1.0}))


def test_killed_during_a_checkpoint_save_resumes_from_the_previous_complete_one(pod, datasets_dir):
    _volume_job(pod, datasets_dir, max_steps=6, save_steps=2)
    killed = pod.spawn(["job", "train"], pre=KILL_DURING_SAVE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = pod.results / CHECKPOINTS
    state = (ckpts / "checkpoint-4" / "trainer_state.json").read_text()
    with pytest.raises(ValueError):
        json.loads(state)  # half written
    assert (ckpts / "checkpoint-2" / "trainer_state.json").is_file()
    assert completed_adapter(pod.results) is None and not (pod.results / ADAPTER_CONFIG).exists()
    # and a checkpoint whose save was cut before its trainer_state.json was written at all
    shutil.copytree(ckpts / "checkpoint-4", ckpts / "checkpoint-5", ignore=shutil.ignore_patterns("trainer_state.json"))
    assert newest_checkpoint(ckpts).name == "checkpoint-2"

    assert pod.step("train") == 0  # the Job's next pod: same volumes, same step
    meta = json.loads((pod.results / METADATA_FILE).read_text())
    assert meta["resumed_from_step"] == 2 and meta["steps"] == 6
    assert json.loads(pod.termination())["steps"] == 6
    assert json.loads((pod.results / PROGRESS_FILE).read_text())["phase"] == "succeeded"
    assert completed_adapter(pod.results, meta["fingerprint"]) is not None


class _Tmpfs:
    """A tmpfs of ``size`` bytes mounted on ``path`` (root only); ``fill(leave)`` leaves ``leave`` bytes free."""

    def __init__(self, path, size: int):
        self.path, self.size = path, size

    def __enter__(self):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return self

    def __exit__(self, *exc):
        subprocess.run(["umount", "-l", str(self.path)], check=False)

    def fill(self, leave: int) -> None:
        filler = self.path / ".filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        st = os.statvfs(self.path)
        used = filler.stat().st_size
        os.truncate(filler, max(0, used - leave + st.f_bavail * st.f_frsize))

    def free_space(self) -> None:
        (self.path / ".filler").unlink()


def test_disk_full_while_saving_the_adapter(pod, datasets_dir, monkeypatch):
    """The output volume fills up as the adapter is being written: a real tmpfs with 12 KiB left (root), else
    ENOSPC raised in place of publishing (said in the test's output)."""
    import kaito_tuning.tuner.outputs as outputs
    import kaito_tuning.tuner.recipe as recipe
    from kaito_tuning.tuner.progress import Progress

    _volume_job(pod, datasets_dir, max_steps=2, save_steps=2)
    try:
        disk = _Tmpfs(pod.results, 16 << 20).__enter__()
    except OSError as e:
        disk = None
        print(f"tmpfs not available ({e}): ENOSPC simulated in recipe.publish")
    update, publish = Progress.update, outputs.publish

    def fill_when_saving(self, **kw):
        if kw.get("phase") == "saving":
            if disk:
                disk.fill(leave=12 << 10)
            else:
                monkeypatch.setattr(recipe, "publish", _enospc)
        return update(self, **kw)
    monkeypatch.setattr(Progress, "update", fill_when_saving)
    try:
        assert pod.step("train") == 75  # safetensors' own error or an OSError, said plainly, retried
        line = pod.termination()
        assert line.startswith("NoSpaceLeft: output: the output volume at ") and "is full" in line, line
        assert line.count("\n") <= 1
        assert completed_adapter(pod.results) is None
        assert not (pod.results / ADAPTER_CONFIG).exists() and not (pod.results / ADAPTER_WEIGHTS).exists()
        assert newest_checkpoint(pod.results / CHECKPOINTS).name == "checkpoint-2"  # the training is not lost

        monkeypatch.setattr(Progress, "update", update)
        monkeypatch.setattr(recipe, "publish", publish)
        if disk:
            disk.free_space()
        assert pod.step("train") == 0
        meta = completed_adapter(pod.results)
        assert meta is not None and meta["resumed_from_step"] == 2  # steps: see the next test
    finally:
        if disk:
            disk.__exit__()


class _Killed(BaseException):
    """Stands for SIGKILL in process: nothing after it runs, no handler catches it."""


def test_killed_after_the_last_checkpoint_the_rerun_trains_no_extra_step(pod, datasets_dir, monkeypatch):
    import kaito_tuning.tuner.recipe as recipe

    _volume_job(pod, datasets_dir, max_steps=2, save_steps=2)
    publish = recipe.publish

    def killed(*args, **kwargs):
        raise _Killed()
    monkeypatch.setattr(recipe, "publish", killed)  # the pod dies after checkpoint-2, before the adapter is placed
    with pytest.raises(_Killed):
        pod.step("train")
    assert newest_checkpoint(pod.results / CHECKPOINTS).name == "checkpoint-2"
    monkeypatch.setattr(recipe, "publish", publish)
    assert pod.step("train") == 0
    meta = completed_adapter(pod.results)
    assert meta["resumed_from_step"] == 2
    assert meta["steps"] == 2, f"max_steps is 2, the rerun trained to step {meta['steps']}"


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
