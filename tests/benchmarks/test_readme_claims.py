"""The transfer section (docs/transfer.md), its answer and every claim sentence, follows from the committed results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.render_readme import TARGETS, render_transfer
from benchmarks.stats import comparisons, verdict

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / TARGETS["transfer"]  # the page that holds the transfer markers


def _section() -> tuple[str, Path]:
    text = PAGE.read_text()
    m = re.search(r"<!-- transfer:begin -->\n(.*?)<!-- transfer:end -->", text, re.S)
    assert m, f"{PAGE} has no transfer section"
    source = re.match(r"`([^`]+results\.json)`", m.group(1))
    assert source, "the transfer section does not start with its results file"
    return m.group(1), ROOT / source.group(1)


def test_readme_transfer_section_is_rendered_from_its_results():
    body, path = _section()
    result = json.loads(path.read_text())
    if "cells" not in result or not result["cells"]:
        pytest.fail(f"{path} holds no cells")
    # Re-rendered from the cells, the section is the same text: a claim that no longer follows fails here.
    assert render_transfer(result, path.relative_to(ROOT).as_posix()).strip() == body.strip()


def test_stored_comparisons_follow_from_the_cells():
    _, path = _section()
    result = json.loads(path.read_text())
    if "comparisons" not in result:
        pytest.skip(f"{path} predates paired comparisons")
    comps = json.loads(json.dumps(comparisons(result["cells"]), default=float))
    assert comps == result["comparisons"]
    assert verdict(comps) == result["verdict"]
