"""Image references as the distribution grammar parses them."""

import pytest

from kaito_tuning.artifacts.reference import ImageRef, InvalidReference, parse

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("ref, expected", [
    ("myregistry.azurecr.io/adapters/phi-3:0.0.1", ("myregistry.azurecr.io", "adapters/phi-3", "0.0.1", None)),
    ("127.0.0.1:5000/a/b:v1", ("127.0.0.1:5000", "a/b", "v1", None)),
    ("localhost/x:latest", ("localhost", "x", "latest", None)),
    ("busybox", ("docker.io", "library/busybox", None, None)),
    ("user/repo:1", ("docker.io", "user/repo", "1", None)),
    ("Registry.Example.COM/a:1", ("registry.example.com", "a", "1", None)),
    (f"ghcr.io/o/r:1@{DIGEST}", ("ghcr.io", "o/r", "1", DIGEST)),
    (f"ghcr.io/o/r@{DIGEST}", ("ghcr.io", "o/r", None, DIGEST)),
    ("[::1]:5000/a:1", ("[::1]:5000", "a", "1", None)),
    ("r.io/a__b/c-d.e_f:T_a.g-1", ("r.io", "a__b/c-d.e_f", "T_a.g-1", None)),
])
def test_valid_references(ref, expected):
    assert parse(ref) == ImageRef(*expected)


def test_str_and_manifest_reference():
    ref = parse(f"ghcr.io/o/r:1@{DIGEST}")
    assert str(ref) == f"ghcr.io/o/r:1@{DIGEST}" and ref.reference == DIGEST
    assert parse("ghcr.io/o/r").reference == "latest"


@pytest.mark.parametrize("ref, message", [
    ("", "empty"),
    (" r.io/a:1", "white space"),
    ("r.io/a:1\n", "white space"),
    ("https://r.io/a:1", "must not have a scheme"),
    ("r.io/a:tåg", "is invalid"),  # tags are ASCII only
    ("r.io/a:-x", "is invalid"),
    ("r.io/a:" + "x" * 129, "is invalid: its tag is 129 characters; at most 128"),
    ("r.io:99999/a:1", "port 99999 of registry 'r.io:99999' is not 1-65535"),
    ("r.io:0/a:1", "port 0 of registry"),
    ("r.io//a:1", "is invalid"),
    ("r.io/a-:1", "is invalid"),
    ("r.io/a:1@sha256:abc", "is invalid"),
    ("r.io/" + "a" * 256 + ":1", "longer than 255"),
])
def test_invalid_references(ref, message):
    with pytest.raises(InvalidReference, match=message):
        parse(ref)


def test_require_tag_suggests_one():
    with pytest.raises(InvalidReference, match=r"has no tag; add one, e.g. r.io/a:0.0.1"):
        parse("r.io/a", require_tag=True)
    with pytest.raises(InvalidReference, match=r"e.g. r.io/a:0.0.1$"):
        parse(f"r.io/a@{DIGEST}", require_tag=True)
    assert parse("r.io/a:1", require_tag=True).tag == "1"


def test_credentials_in_a_reference_are_refused_and_never_shown():
    with pytest.raises(InvalidReference, match="must not carry credentials") as e:
        parse("robot:S3CRET-PASS@r.io/team/adapter:1")
    assert "S3CRET" not in str(e.value)


def test_a_huge_reference_is_shown_cut():
    with pytest.raises(InvalidReference) as e:
        parse("r.io/" + "a/" * 50_000 + ":1")
    assert len(str(e.value)) < 300


def test_a_huge_reference_without_a_tag_gets_a_short_hint():
    with pytest.raises(InvalidReference, match="has no tag; add one, e.g. :0.0.1 at its end") as e:
        parse("r" + "e" * 5_000 + ".io/b", require_tag=True)  # a long registry name: nothing else limits it
    assert len(str(e.value)) < 300
