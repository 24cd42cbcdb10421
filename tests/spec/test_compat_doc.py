"""docs/kaito-compatibility.md: every row names a test, and every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs/kaito-compatibility.md"


def _rows():
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] not in ("field", "item") and not set(cells[0]) <= {"-"}:
            yield cells


def test_every_row_has_a_verdict_a_reason_and_a_test():
    rows = list(_rows())
    assert len(rows) >= 30
    for item, verdict, notes, tests in rows:
        assert verdict in ("same", "wider", "stricter", "differs", "—"), item
        assert re.search(r"\w+\.py::test_\w+", tests), item
        if verdict in ("differs", "stricter"):
            assert notes, f"{item}: a difference must say why"


def test_every_named_test_exists():
    missing = []
    for *_, tests in _rows():
        for path, name in re.findall(r"([\w/]+\.py)::(test_\w+)", tests):
            source = (ROOT / "tests" / path)
            if not source.exists() or not re.search(rf"^(async )?def {name}\(", source.read_text(), re.M):
                missing.append(f"{path}::{name}")
    assert missing == []
