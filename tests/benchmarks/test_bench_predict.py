"""The full-size predict benchmark's stand-ins: MG DICOM files in each transfer syntax that decode to the array
they were made from, through pydicom and through the reader predict uses; its table renders from a result file."""

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("scipy")  # the phantom's texture
pytest.importorskip("openjpeg")  # pylibjpeg-openjpeg: JPEG 2000 encoding (pip install -e ".[dicom]")

from benchmarks.bench_predict import SYNTAXES, phantom, write_mammogram  # noqa: E402
from benchmarks.render_readme import render_predict  # noqa: E402
from medssl.data.coco import read_image  # noqa: E402


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_stand_in_round_trips_in_every_transfer_syntax(syntax, tmp_path):
    pixels = phantom(96, 80, seed=1)
    assert pixels.dtype == np.uint16 and pixels.max() <= 4095 and pixels[48, 0] > 1000 and pixels[0, -1] < 100
    write_mammogram(tmp_path / "mg.dcm", pixels, syntax)
    ds = pydicom.dcmread(tmp_path / "mg.dcm")
    assert ds.file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax) and ds.Modality == "MG"
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    # predict's reader: the file's VOI window (centre 2048, width 4096) maps stored values linearly to [0, 1]
    got = read_image(tmp_path / "mg.dcm")
    np.testing.assert_allclose(got, pixels / 4095.0, atol=1.5 / 4095)


def test_table_renders_from_a_result_file():
    row = {"rows": 4096, "columns": 3328, "megapixels": 13.6, "syntax": "RLELossless", "file_mb": 9.5,
           "overlay": "2048 px", "decode_s": 0.5, "seconds": 3.25, "peak_mb": 2100, "peaks_mb": [2100, 2050],
           "small_peak_mb": 1700, "small_peaks_mb": [1700, 1690], "added_mb": 400}
    result = {"machine": {"date": "2026-12-07T00:00:00Z", "commit": "abc", "load_avg": [0.1, 0, 0], "cpus": 2},
              "threads": 2, "detector": "x", "rows": [row]}
    text = render_predict(result, "r.json")
    assert text.startswith("`r.json`: measured 2026-12-07T00:00:00Z, commit abc, load average 0.1 at the start.")
    assert ("| 4096 x 3328 (13.6 MP) | RLELossless | 9.5 | 2048 px | 0.50 | 3.25 | 2100 (2100, 2050) | "
            "1700 (1700, 1690) | 400 |") in text
