"""Progress file, /progress and /metrics over HTTP, the trainer callback, the termination log."""

import json
import urllib.request
from types import SimpleNamespace

import pytest

from kaito_tuning.tuner.progress import Progress, make_callback, write_termination


def test_progress_file_http_and_metrics(tmp_path):
    p = Progress(tmp_path / "progress.json")
    port = p.serve(-1, host="127.0.0.1")
    try:
        cb = make_callback(p)
        state = SimpleNamespace(global_step=0, max_steps=10, epoch=0.0)
        cb.on_train_begin(None, state, None)
        state.global_step, state.epoch = 4, 0.4
        cb.on_step_end(None, state, None)
        cb.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 1e-4, "num_tokens": 100})
        cb.on_log(None, state, None, logs={"loss": 2.0, "num_tokens": 900})
        cb.on_evaluate(None, state, None, metrics={"eval_loss": 2.2})
        on_disk = json.loads((tmp_path / "progress.json").read_text())
        served = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5).read())
        for doc in (on_disk, served):
            assert doc["phase"] == "training" and doc["step"] == 4 and doc["total_steps"] == 10
            assert doc["loss"] == 2.0 and doc["eval_loss"] == 2.2 and doc["learning_rate"] == 1e-4
            assert doc["eta_seconds"] is not None and doc["tokens_per_second"] > 0 and doc["updated_at"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "kaito_tuning_step 4.0" in metrics and "kaito_tuning_eval_loss 2.2" in metrics
        assert 'kaito_tuning_phase{phase="training"} 1.0' in metrics
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        assert not list(tmp_path.glob(".progress.json.*"))  # written atomically
    finally:
        p.close()
    assert Progress().serve(0) is None  # port 0: no server


def test_termination_log(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KAITO_TERMINATION_LOG", str(log))
    write_termination("DatasetInvalid: a.parquet:\n row 3: bad")
    assert log.read_text() == "DatasetInvalid: a.parquet: row 3: bad\n"
    write_termination({"image": "r/x:1", "digest": "sha256:ab"})
    assert json.loads(log.read_text()) == {"image": "r/x:1", "digest": "sha256:ab"}
