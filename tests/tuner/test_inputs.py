"""Downloading dataset URLs: every file, retries, resume, caps, content sniffing, clear errors."""

import json

import pytest

from kaito_tuning.errors import EXIT_TRANSIENT, EXIT_USER_ERROR
from kaito_tuning.tuner.inputs import (
    MANIFEST,
    DatasetInvalid,
    DownloadFailed,
    DownloadRefused,
    collect_dir,
    detect_kind,
    download_urls,
    local_names,
)


def test_every_url_is_downloaded_with_distinct_names_and_sha256(data_server, tmp_path):
    base, files = data_server
    urls = [f"{base}/chat.parquet", f"{base}/chat.parquet?copy=2", f"{base}/pc.parquet", f"{base}/chat.jsonl",
            f"{base}/pc.csv"]
    got = download_urls(urls, tmp_path)
    assert [f.name for f in got] == ["chat.parquet", "chat-2.parquet", "pc.parquet", "chat.jsonl", "pc.csv"]
    assert [f.kind for f in got] == ["parquet", "parquet", "parquet", "jsonl", "csv"]
    import hashlib
    assert got[0].sha256 == hashlib.sha256(files["messages"].read_bytes()).hexdigest() == got[1].sha256
    assert (tmp_path / "chat-2.parquet").read_bytes() == files["messages"].read_bytes()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [e["url"] for e in manifest["files"]] == urls
    assert not list(tmp_path.glob("*.part"))
    # the train step reads the same directory back with the recorded hashes
    again = collect_dir(tmp_path)
    assert sorted(f.sha256 for f in again) == sorted(f.sha256 for f in got)
    assert {f.url for f in again} == set(urls)


def test_local_names_are_distinct():
    names = local_names(["http://a/x/data.parquet", "http://b/y/data.parquet", "http://c/", "http://d/data.parquet"])
    assert len(set(names)) == 4 and names[0] == "data.parquet"


def test_404_is_a_user_error_without_retries(bad_server, tmp_path):
    with pytest.raises(DownloadRefused, match="HTTP 404") as e:
        download_urls([f"{bad_server.url}/404"], tmp_path, backoff_s=0)
    assert e.value.exit_code == EXIT_USER_ERROR and e.value.field == "tuning.input.urls[0]"
    assert bad_server.hits["/404"] == 1


def test_500_three_times_is_transient(bad_server, tmp_path):
    with pytest.raises(DownloadFailed, match="failed 3 times; last: HTTP 500") as e:
        download_urls([f"{bad_server.url}/500"], tmp_path, backoff_s=0.01)
    assert e.value.exit_code == EXIT_TRANSIENT
    assert bad_server.hits["/500"] == 3
    assert e.value.one_line().startswith("DownloadFailed: tuning.input.urls[0]:")


def test_500_then_success_is_retried(bad_server, tmp_path):
    (f,) = download_urls([f"{bad_server.url}/flaky"], tmp_path, backoff_s=0.01)
    assert bad_server.hits["/flaky"] == 3 and f.kind == "parquet"


def test_server_that_never_answers_times_out(bad_server, tmp_path):
    with pytest.raises(DownloadFailed, match="timed out"):
        download_urls([f"{bad_server.url}/hang"], tmp_path, attempts=2, backoff_s=0, read_timeout_s=0.5)
    assert bad_server.hits["/hang"] == 2


def test_size_cap(bad_server, data_server, tmp_path):
    with pytest.raises(DownloadRefused, match="size cap") as e:
        download_urls([f"{bad_server.url}/big"], tmp_path, max_bytes=100_000)
    assert e.value.reason == "DatasetTooLarge"
    assert not list(tmp_path.glob("big*"))
    base, _ = data_server  # with Content-Length it fails before reading the body
    with pytest.raises(DownloadRefused, match="larger than the size cap"):
        download_urls([f"{base}/chat.parquet"], tmp_path, max_bytes=10)


def test_html_instead_of_parquet(bad_server, data_server, tmp_path):
    with pytest.raises(DatasetInvalid, match="HTML page"):
        download_urls([f"{bad_server.url}/html"], tmp_path)
    base, _ = data_server
    with pytest.raises(DatasetInvalid, match=r"urls\[0\].*page.parquet.*HTML page"):
        download_urls([f"{base}/page.parquet"], tmp_path)


def test_dropped_connection_resumes_with_range(bad_server, tmp_path):
    (f,) = download_urls([f"{bad_server.url}/drop"], tmp_path, backoff_s=0)
    assert (tmp_path / "drop").read_bytes() == bad_server.drop_payload
    assert bad_server.ranges[0] is None
    start = int(bad_server.ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(bad_server.drop_payload) // 2
    assert f.size == len(bad_server.drop_payload)


def test_detect_kind(tmp_path, datasets_dir):
    assert detect_kind(datasets_dir["messages"]) == "parquet"
    assert detect_kind(datasets_dir["jsonl"]) == "jsonl"
    assert detect_kind(datasets_dir["csv"]) == "csv"
    p = tmp_path / "a.json"
    p.write_text('[\n {"text": "a"}\n]')
    assert detect_kind(p) == "json"
    p.write_bytes(b"\x00\x01binary")
    with pytest.raises(DatasetInvalid, match="binary but not parquet"):
        detect_kind(p)


def test_directory_input(datasets_dir, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.parquet").write_bytes(datasets_dir["messages"].read_bytes())
    (tmp_path / "data" / "b.jsonl").write_bytes(datasets_dir["jsonl"].read_bytes())
    (tmp_path / "data" / "NOTES").write_text("not data at all\n")
    (tmp_path / ".hidden").write_text("x")
    files = collect_dir(tmp_path)
    assert [f.name for f in files] == ["a.parquet", "b.jsonl"]
    assert [f.name for f in collect_dir(tmp_path, extension="jsonl")] == ["b.jsonl"]
    assert [f.name for f in collect_dir(tmp_path, dataset_path="/mnt/data/data/a.parquet")] == ["a.parquet"]
    with pytest.raises(Exception, match="does not exist in the input; files there: data/NOTES, data/a.parquet"):
        collect_dir(tmp_path, dataset_path="nope.parquet")
