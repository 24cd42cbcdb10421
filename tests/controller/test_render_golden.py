"""`kaito-tuning render` of every example, compared with the reviewed output in tests/controller/golden/.

A change to what the operator creates must be a decision: when one is intended, regenerate with
``KAITO_UPDATE_GOLDEN=1 pytest tests/controller/test_render_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kaito_tuning.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_render_matches_the_reviewed_output(example, capsys):
    assert main(["render", str(example)]) == 0
    out = capsys.readouterr().out
    golden = GOLDEN / f"{example.parent.name}-{example.stem}.yaml"
    if os.environ.get("KAITO_UPDATE_GOLDEN"):
        golden.write_text(out)
    assert golden.exists(), f"no reviewed output for {example.name}: run with KAITO_UPDATE_GOLDEN=1"
    assert out == golden.read_text(), f"render of {example.name} changed; if intended, regenerate (see module doc)"
