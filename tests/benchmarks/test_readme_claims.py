"""The transfer sections' stored comparisons and verdict follow from their cells: the 2-D pretraining table
(docs/transfer.md) and the 3-D table (README.md). That each section's text (answer, tables, every claim sentence) is
what its results file renders is `tests/test_docs.py::test_rendered_sections_rerender_byte_for_byte`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.render_readme import TARGETS
from benchmarks.stats import comparisons, verdict

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["transfer", "volumes"]  # both rendered from a run_all.py results.json


def _section(name: str) -> tuple[str, Path]:
    page = ROOT / TARGETS[name]  # the page that holds the section's markers
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", page.read_text(), re.S)
    assert m, f"{page} has no {name} section"
    source = re.match(r"`([^`]+results\.json)`", m.group(1))
    assert source, f"the {name} section of {page} does not start with its results file"
    return m.group(1), ROOT / source.group(1)


@pytest.mark.parametrize("name", SECTIONS)
def test_stored_comparisons_follow_from_the_cells(name: str):
    _, path = _section(name)
    result = json.loads(path.read_text())
    if "comparisons" not in result:
        pytest.skip(f"{path} predates paired comparisons")
    comps = json.loads(json.dumps(comparisons(result["cells"]), default=float))
    assert comps == result["comparisons"]
    assert verdict(comps) == result["verdict"]
