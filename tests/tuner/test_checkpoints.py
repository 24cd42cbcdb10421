"""Checkpoints: which run they belong to, and which one a restarted run resumes from."""

import json

from kaito_tuning.spec.training_config import load_config
from kaito_tuning.tuner.checkpoints import fingerprint, newest_checkpoint, prepare_checkpoints


def test_newest_checkpoint_skips_incomplete(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        else:
            (d / "trainer_state.json").write_text('{"global_st')  # killed while writing
    assert newest_checkpoint(tmp_path).name == "checkpoint-10"


def test_checkpoints_of_another_run_are_removed_not_resumed(tmp_path):
    cfg = load_config(None, "lora")
    fp_a = fingerprint("p", "lora", cfg, ["aa"], None)
    assert fp_a == fingerprint("p", "lora", cfg, ["aa"], None)
    assert len({fp_a, fingerprint("p", "qlora", cfg, ["aa"], None), fingerprint("p", "lora", cfg, ["bb"], None),
                fingerprint("p", "lora", cfg, ["aa"], 10)}) == 4
    d = prepare_checkpoints(tmp_path / "checkpoints", fp_a)
    (d / "checkpoint-5").mkdir()
    assert (prepare_checkpoints(tmp_path / "checkpoints", fp_a) / "checkpoint-5").exists()
    assert not (prepare_checkpoints(tmp_path / "checkpoints", "other") / "checkpoint-5").exists()
