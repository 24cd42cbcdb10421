"""What a run leaves behind: the adapter staged and published so that it never looks complete too early."""

import json
import os

from kaito_tuning.tuner.outputs import completed_adapter, model_card, publish


def test_publish_moves_adapter_config_last(tmp_path, monkeypatch):
    stage, out = tmp_path / "stage", tmp_path / "out"
    stage.mkdir(), out.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (stage / f).write_text(f)
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(os.path.basename(b)), real(a, b)))
    publish(stage, out)
    assert order[-1] == "adapter_config.json" and not stage.exists()


def test_completed_adapter_needs_every_file_and_the_same_run(tmp_path):
    assert completed_adapter(tmp_path) is None
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / f).write_text("x")
    assert completed_adapter(tmp_path) is None  # no metadata: the run did not finish
    (tmp_path / "training_metadata.json").write_text(json.dumps({"fingerprint": "run-a", "steps": 3}))
    assert completed_adapter(tmp_path)["steps"] == 3
    assert completed_adapter(tmp_path, "run-a") is not None and completed_adapter(tmp_path, "run-b") is None


def test_model_card_shows_dataset_urls_redacted():
    meta = {"base_model": "org/m", "method": "lora", "workspace": "w", "preset": "p", "base_revision": "r",
            "rank": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "loss_mask": "assistant_only", "steps": 1,
            "epochs": 1.0, "train_loss": 1.0, "initial_eval_loss": None, "eval_loss": None, "tokens_per_second": 1.0,
            "train_rows": 1, "eval_rows": 0,
            "datasets": [{"name": "a.parquet", "size": 1, "sha256": "0" * 64,
                          "url": "https://x.blob.core.windows.net/c/a.parquet?sv=1&sig=PLANTED"}]}
    card = model_card(meta)
    assert "PLANTED" not in card and "https://x.blob.core.windows.net/c/a.parquet" in card
