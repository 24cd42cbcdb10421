"""Downloading dataset URLs: every file, retries, resume, caps, content sniffing, the address policy, clear errors.

The test servers listen on loopback, which the policy refuses by default: tests that are not about
the policy pass ``allow_private=True``, as ``kaito-tuning run --allow-private-urls`` does.
"""

import functools
import json
import socket

import pytest

from kaito_tuning import addresses, retry
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

dl = functools.partial(download_urls, allow_private=True)


@pytest.fixture(autouse=True)
def slept(monkeypatch) -> list[float]:
    """Retries record their waits instead of waiting."""
    waits: list[float] = []
    monkeypatch.setattr(retry, "sleep", waits.append)
    return waits


def test_every_url_is_downloaded_with_distinct_names_and_sha256(data_server, tmp_path):
    base, files = data_server
    urls = [f"{base}/chat.parquet", f"{base}/chat.parquet?copy=2", f"{base}/pc.parquet", f"{base}/chat.jsonl",
            f"{base}/pc.csv"]
    got = dl(urls, tmp_path)
    assert [f.name for f in got] == ["chat.parquet", "chat-2.parquet", "pc.parquet", "chat.jsonl", "pc.csv"]
    assert [f.kind for f in got] == ["parquet", "parquet", "parquet", "jsonl", "csv"]
    import hashlib
    assert got[0].sha256 == hashlib.sha256(files["messages"].read_bytes()).hexdigest() == got[1].sha256
    assert (tmp_path / "chat-2.parquet").read_bytes() == files["messages"].read_bytes()
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [e["url"] for e in manifest["files"]] == [u.split("?")[0] for u in urls]  # recorded redacted
    assert not list(tmp_path.glob("*.part"))
    # the train step reads the same directory back with the recorded hashes
    again = collect_dir(tmp_path)
    assert sorted(f.sha256 for f in again) == sorted(f.sha256 for f in got)
    assert {f.url for f in again} == {u.split("?")[0] for u in urls}


def test_local_names_are_distinct():
    names = local_names(["http://a/x/data.parquet", "http://b/y/data.parquet", "http://c/", "http://d/data.parquet"])
    assert len(set(names)) == 4 and names[0] == "data.parquet"


def test_404_is_a_user_error_without_retries(bad_server, tmp_path, slept):
    with pytest.raises(DownloadRefused, match="HTTP 404") as e:
        dl([f"{bad_server.url}/404"], tmp_path)
    assert e.value.exit_code == EXIT_USER_ERROR and e.value.field == "tuning.input.urls[0]"
    assert bad_server.hits["/404"] == 1 and slept == []


def test_500_every_time_is_transient_after_the_retries(bad_server, tmp_path, slept):
    with pytest.raises(DownloadFailed, match="answered HTTP 500") as e:
        dl([f"{bad_server.url}/500"], tmp_path, attempts=3)
    assert e.value.exit_code == EXIT_TRANSIENT
    assert bad_server.hits["/500"] == 3 and slept == [1.0, 2.0]
    assert e.value.one_line().startswith("DownloadFailed: tuning.input.urls[0]:")


def test_500_then_success_is_retried(bad_server, tmp_path, slept):
    (f,) = dl([f"{bad_server.url}/flaky"], tmp_path)
    assert bad_server.hits["/flaky"] == 3 and f.kind == "parquet" and slept == [1.0, 2.0]


def test_server_that_never_answers_times_out(bad_server, tmp_path):
    with pytest.raises(DownloadFailed, match="timed out"):
        dl([f"{bad_server.url}/hang"], tmp_path, attempts=2, read_timeout_s=0.5)
    assert bad_server.hits["/hang"] == 2


def test_size_cap(bad_server, data_server, tmp_path):
    with pytest.raises(DownloadRefused, match="size cap") as e:
        dl([f"{bad_server.url}/big"], tmp_path, max_bytes=100_000)
    assert e.value.reason == "DatasetTooLarge"
    assert not list(tmp_path.glob("big*"))
    base, _ = data_server  # with Content-Length it fails before reading the body
    with pytest.raises(DownloadRefused, match="larger than the size cap"):
        dl([f"{base}/chat.parquet"], tmp_path, max_bytes=10)


def test_html_instead_of_parquet(bad_server, data_server, tmp_path):
    with pytest.raises(DatasetInvalid, match="HTML page"):
        dl([f"{bad_server.url}/html"], tmp_path)
    base, _ = data_server
    with pytest.raises(DatasetInvalid, match=r"urls\[0\].*page.parquet.*HTML page"):
        dl([f"{base}/page.parquet"], tmp_path)


def test_dropped_connection_resumes_with_range(bad_server, tmp_path):
    (f,) = dl([f"{bad_server.url}/drop"], tmp_path)
    assert (tmp_path / "drop").read_bytes() == bad_server.drop_payload
    assert bad_server.ranges[0] is None
    assert bad_server.if_ranges[1] == '"v1"', "a resume must say which version of the file it continues"
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
    # Kaito's meaning: relative to /mnt (the input is mounted at /mnt/data)
    for path in ("/mnt/data/data/a.parquet", "/data/data/a.parquet", "data/data/a.parquet"):
        assert [f.name for f in collect_dir(tmp_path, dataset_path=path)] == ["a.parquet"]
    assert [f.name for f in collect_dir(tmp_path, dataset_path="/data/data")] == ["a.parquet", "b.jsonl"]
    with pytest.raises(Exception, match="does not exist in the input; files there: data/NOTES, data/a.parquet"):
        collect_dir(tmp_path, dataset_path="/data/nope.parquet")
    for outside in ("nope.parquet", "/config/training_config.yaml", "/data/../etc/passwd"):
        with pytest.raises(Exception, match="is outside the input directory /mnt/data"):
            collect_dir(tmp_path, dataset_path=outside)


def test_a_cut_download_without_content_length_is_caught(bad_server, tmp_path):
    with pytest.raises(DownloadFailed, match="incomplete"):
        dl([f"{bad_server.url}/cut"], tmp_path, attempts=2)
    assert bad_server.hits["/cut"] == 2 and not list(tmp_path.glob("cut*"))


def test_fetched_content_is_never_echoed(bad_server, tmp_path):
    with pytest.raises(DatasetInvalid) as e:
        dl([f"{bad_server.url}/secret"], tmp_path)
    assert "TOPSECRET" not in e.value.one_line() and "aws_secret" not in e.value.one_line()


SIGNED = "?sv=2024&se=2030&sig=PLANTEDTOKEN%3D"


def test_urls_are_recorded_redacted(data_server, tmp_path):
    base, _ = data_server
    (f,) = dl([f"{base}/chat.parquet{SIGNED}"], tmp_path)
    assert f.url == f"{base}/chat.parquet"
    assert "PLANTEDTOKEN" not in (tmp_path / MANIFEST).read_text()


def test_failures_name_the_url_without_its_query(bad_server, tmp_path):
    with pytest.raises(DownloadRefused) as e:
        dl([f"{bad_server.url}/404{SIGNED}"], tmp_path)
    assert "PLANTEDTOKEN" not in e.value.one_line() and "/404" in e.value.one_line()


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:9/x.parquet", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://100.100.100.200/latest/meta-data", "carrier-grade NAT"),
    ("http://10.0.0.7/x.parquet", "private"),
    ("http://[::ffff:10.0.0.7]/x.parquet", "private"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://localhost:9/x.parquet", "local machine"),
    ("file:///etc/passwd", "not an http"),
])
def test_private_and_metadata_targets_are_refused_by_default(url, why, tmp_path):
    with pytest.raises(DownloadRefused, match=why) as e:
        download_urls([url], tmp_path, attempts=1)
    assert e.value.exit_code == EXIT_USER_ERROR


@pytest.fixture
def only_this_loopback(monkeypatch):
    """The policy, except that 127.0.0.1 itself counts as public: the test server stands in for a public host."""
    real = addresses.forbidden
    monkeypatch.setattr(addresses, "forbidden", lambda a: None if a == "127.0.0.1" else real(a))


def test_every_redirect_hop_is_checked(bad_server, tmp_path, only_this_loopback):
    (f,) = download_urls([f"{bad_server.url}/file"], tmp_path / "ok")  # the stand-in public host works
    assert f.kind == "parquet"
    with pytest.raises(DownloadRefused, match="169.254.169.254.*link-local"):
        download_urls([f"{bad_server.url}/to-metadata"], tmp_path / "a")


def test_the_address_actually_connected_to_is_checked(bad_server, tmp_path, monkeypatch):
    """Names pass the (patched-away) name check, as a public-looking name or a rebinding DNS answer would;
    the connection is refused by the address it really reached (this machine, by its host name)."""
    monkeypatch.setattr(addresses, "forbidden_host", lambda host: None)
    host = socket.gethostname()
    with pytest.raises(DownloadRefused, match=f"{host} resolved to an address that is a loopback") as e:
        download_urls([f"http://{host}:{bad_server.url.rsplit(':', 1)[1]}/file"], tmp_path)
    assert e.value.reason == "URLNotAllowed" and bad_server.hits == {}
    assert not list(tmp_path.glob("*.parquet"))


def test_the_local_cli_opts_in(bad_server, tmp_path):
    (f,) = download_urls([f"{bad_server.url}/file"], tmp_path, allow_private=True)
    assert f.kind == "parquet"
    with pytest.raises(DownloadRefused, match="loopback"):
        download_urls([f"{bad_server.url}/file"], tmp_path / "b", allow_private=False)
