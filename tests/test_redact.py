"""Secrets never reach what people and registries read (kaito_tuning/redact.py)."""

from __future__ import annotations

import pytest

from kaito_tuning import redact

TOKEN = "sv=2024-01-01&se=2030&sp=r&sig=SECRETSIG%3D"


@pytest.mark.parametrize("raw, shown", [
    (f"https://acct.blob.core.windows.net/data/train.parquet?{TOKEN}", "https://acct.blob.core.windows.net/data/train.parquet"),
    ("https://bucket.s3.amazonaws.com/x.parquet?X-Amz-Signature=abc&X-Amz-Credential=AKIA", "https://bucket.s3.amazonaws.com/x.parquet"),
    ("https://user:hunter2@example.com:8443/p/q.parquet#frag", "https://example.com:8443/p/q.parquet"),
    ("http://[::1]:9000/a.parquet?download=true", "http://[::1]:9000/a.parquet"),
    ("not a url", "not a url"),
    ("user:hunter2@example.com/x.parquet?sig=SECRET", "example.com/x.parquet"),  # no "//": no host for urlsplit
    ("ftp://user:hunter2@/x", "ftp:///x"),
])
def test_url_keeps_scheme_host_and_path_only(raw, shown):
    assert redact.url(raw) == shown


def test_text_redacts_every_url_and_credential_pair():
    msg = (f"DownloadFailed: https://a.example/x.parquet?{TOKEN} failed; also http://u:p@b.example/y?token=T0K "
           "Authorization: Bearer abcdefghijklmnop password=hunter2")
    out = redact.text(msg)
    for secret in ("SECRETSIG", "T0K", "u:p@", "abcdefghijklmnop", "hunter2"):
        assert secret not in out
    assert "https://a.example/x.parquet" in out and "http://b.example/y" in out
