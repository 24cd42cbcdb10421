"""Download faults through ``kaito-tuning job download``: a transfer cut mid-file (with and without
Content-Length, chunked or not), a server failing then recovering, 429 with Retry-After. Each download
either ends with the server's exact bytes or fails; a truncated file is never accepted."""

from __future__ import annotations

import hashlib
import json

import pytest
from fixtures_data import tuning_workspace

from kaito_tuning.errors import EXIT_TRANSIENT
from kaito_tuning.tuner.inputs import MANIFEST


def _download(pod, url: str) -> int:
    pod.set(tuning_workspace([url]))
    return pod.step("download")


def _assert_exact(pod, name: str, data: bytes) -> None:
    assert (pod.data / name).read_bytes() == data
    entry = json.loads((pod.data / MANIFEST).read_text())["files"][0]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert sorted(p.name for p in pod.data.iterdir()) == sorted([MANIFEST, name])  # no .part left


@pytest.mark.parametrize("name, faults, waits_expected, resumed", [
    ("big.jsonl", [("cut", 100_000)], [1.0], True),                  # Content-Length says more: resumed with Range
    ("chat.parquet", [("cut", 1000)], [1.0], False),                  # cut inside the first chunk: nothing to resume
    ("chat.parquet", [("cut-close", 1000)], [1.0], False),           # no length: the parquet footer is missing
    ("big.jsonl", [("cut-chunked", 100_000)], [1.0], True),          # chunked: the last chunk never came
    ("chat.parquet", [("status", 500), ("status", 503)], [1.0, 2.0], False),
    ("alpaca.parquet", [("status", 429, {"Retry-After": "3"})], [3.0], False),
    ("big.jsonl", [("status", 503, {"Retry-After": "86400"}), ("cut", 70_000), ("cut", 140_000)], [30.0, 2.0, 4.0],
     True),
], ids=["cut-with-length", "cut-in-first-chunk", "cut-no-length-parquet", "cut-chunked", "500-503-then-ok",
        "429-retry-after", "503-retry-after-capped-then-cut-twice"])
def test_a_faulty_transfer_ends_with_the_exact_file(pod, scripted, waits, name, faults, waits_expected, resumed):
    scripted.script[f"/{name}"] = list(faults)
    assert _download(pod, f"{scripted.url}/{name}?sig=abc") == 0, pod.termination()
    _assert_exact(pod, name, scripted.files[f"/{name}"])
    assert waits == waits_expected
    ranges = [(rng, if_range) for path, rng, if_range in scripted.seen if path == f"/{name}" and rng]
    assert bool(ranges) == resumed, scripted.seen
    # a resume asks only for what is missing, and only if the file is still the same one (If-Range: its ETag)
    assert all(if_range and if_range.startswith('"') for _, if_range in ranges)


def test_a_file_that_changed_before_the_resume_is_fetched_whole(pod, scripted, monkeypatch):
    scripted.script["/chat.parquet"] = [("cut", 1000)]
    original, changed = scripted.files["/chat.parquet"], scripted.files["/alpaca.parquet"]

    def replace_the_file(seconds):  # between the cut and the resume: a new ETag, so If-Range does not match
        scripted.files["/chat.parquet"] = changed
    monkeypatch.setattr("kaito_tuning.retry.sleep", replace_the_file)
    assert _download(pod, f"{scripted.url}/chat.parquet") == 0
    assert changed != original
    _assert_exact(pod, "chat.parquet", changed)


def test_a_transfer_cut_every_time_is_never_accepted(pod, scripted, waits):
    scripted.script["/chat.parquet"] = [("cut-close", len(scripted.files["/chat.parquet"]) - 1)] * 4
    assert _download(pod, f"{scripted.url}/chat.parquet?sig=abc") == EXIT_TRANSIENT
    line = pod.termination()
    assert line.startswith("DownloadFailed: tuning.input.urls[0]: ") and "incomplete" in line and "sig" not in line
    assert waits == [1.0, 2.0, 4.0]
    assert list(pod.data.iterdir()) == []  # no file, no .part, no manifest


def test_a_jsonl_transfer_cut_without_content_length_is_not_accepted(pod, scripted, waits):
    data = scripted.files["/chat.jsonl"]
    cut = data.index(b"\n", len(data) // 2) + 1  # a whole number of lines: the file parses
    scripted.script["/chat.jsonl"] = [("cut-close", cut)]
    rc = _download(pod, f"{scripted.url}/chat.jsonl")
    assert rc == EXIT_TRANSIENT or (pod.data / "chat.jsonl").read_bytes() == data
