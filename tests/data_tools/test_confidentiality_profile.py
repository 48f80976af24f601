"""Metadata against the standard: every attribute of the DICOM PS3.15 Basic Application Level Confidentiality
Profile (Table E.1-1, as tabulated by the `dicom-anonymizer` package), plus private tags, nested sequences and
an overlay, filled with marker values; none of the markers may reach any output that leaves the machine
(shards, `_info.json`, `stats.json`, the build config, cached statistics, contact sheets, the printed log).
The manifest holds source paths and stays private (docs/privacy.md)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
databases = pytest.importorskip("dicomanonymizer.dicom_anonymization_databases")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataelem import DataElement  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from data_tools import build_shards as bs  # noqa: E402
from data_tools.shards_build import burned_in  # noqa: E402
from medssl.data.shard_writer import finished_shards  # noqa: E402

TEXT = "ZQX"  # every text marker starts with it: ZQX0001, ZQX0002, ...
DATE, TIME, UID_ROOT = "18770412", "031337.424242", "1.2.826.0.1.3680043.8.498.7301"
NUMBER = "73019"  # IS / DS values (their decimal text is searched too)
MARKERS = (TEXT, TEXT.lower(), DATE, TIME, "031337", UID_ROOT, NUMBER, "091W")
ARGS = ["--size", "32", "--workers", "0", "--salt", "s", "--no-progress", "--ct-windows", "wide=-1000:1000"]


def profile_tags() -> list[int]:
    """The tags of the newest Basic Profile table the package ships (repeating-group masks left out: the
    overlay is added by hand; command-set group 0000 too: it never occurs in a file)."""
    names = sorted(m.name for m in pkgutil.iter_modules(databases.__path__) if m.name.startswith("dicomfields_"))
    table = importlib.import_module(f"{databases.__name__}.{names[-1]}")
    return sorted({(t[0] << 16) | t[1] for t in table.ALL_TAGS if len(t) == 2 and t[0] != 0})


def marker(vr: str, i: int) -> object:
    """A marker value of value representation `vr` (the i-th attribute)."""
    text = f"{TEXT}{i:04d}"
    return {"DA": DATE, "TM": TIME, "DT": DATE + TIME, "UI": f"{UID_ROOT}.{i}", "AS": "091W", "IS": NUMBER,
            "DS": f"{NUMBER}.5", "US": 7301, "SS": 7301, "UL": 7301, "SL": 7301, "FL": 73.019, "FD": 73.019,
            "AT": 0x00100010, "OB": text.encode(), "OW": text.encode(), "UN": text.encode(),
            "SQ": Sequence([nested(i)])}.get(vr, text)


def nested(i: int) -> Dataset:
    """A sequence item holding text, a UID, a date and a sequence of its own."""
    item = Dataset()
    item.PatientName, item.ReferencedSOPInstanceUID = f"{TEXT}{i:04d}^N", f"{UID_ROOT}.9{i}"
    item.ContentDate, item.CodeMeaning = DATE, f"{TEXT}{i:04d}M"
    inner = Dataset()
    inner.PersonName, inner.InstitutionName = f"{TEXT}{i:04d}^INNER", f"{TEXT}{i:04d}I"
    item.ContentSequence = Sequence([inner])
    return item


def overlay(ds: Dataset) -> None:
    """Overlay plane 6000 over the whole image with a marker rendered in it, and marker label / description."""
    from PIL import Image, ImageDraw

    rows, cols = int(ds.Rows), int(ds.Columns)
    picture = Image.new("1", (cols, rows))
    ImageDraw.Draw(picture).text((4, 4), f"{TEXT}9999 DOE", fill=1)
    bits = np.asarray(picture, np.uint8).ravel()  # [rows * cols]
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60000022, "LO", f"{TEXT}9998 overlay description")
    ds.add_new(0x60001500, "LO", f"{TEXT}9997 overlay label")
    ds.add_new(0x60004000, "LT", f"{TEXT}9996 overlay comments")
    ds.add_new(0x60003000, "OW", np.packbits(bits, bitorder="little").tobytes())


def marked_file(path: Path) -> int:
    """pydicom's real CT_small.dcm with every profile attribute, private tags and an overlay set to markers;
    returns the number of profile attributes filled."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    tags = profile_tags()
    for i, tag in enumerate(tags):
        try:
            vr = pydicom.datadict.dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            vr = "LO"  # newer than pydicom's dictionary
        if tag >> 16 == 0x0002:
            ds.file_meta[tag] = DataElement(tag, vr, marker(vr, i))
        else:
            ds[tag] = DataElement(tag, vr, marker(vr, i))
    block = ds.private_block(0x0009, f"{TEXT} PRIVATE CREATOR", create=True)
    block.add_new(0x01, "LO", f"{TEXT}8001 private text")
    block.add_new(0x02, "SQ", Sequence([nested(8002)]))
    block.add_new(0x03, "UN", f"{TEXT}8003 private bytes".encode())
    overlay(ds)
    ds.BurnedInAnnotation = "NO"  # the profile holds DateOfSecondaryCapture: without NO the policy drops it
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return len(tags)


def npy_arrays(out: Path) -> dict[str, bytes]:
    arrays = {}
    for shard in finished_shards(out):
        with tarfile.open(shard) as tar:
            arrays.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".npy")})
    return arrays


def test_no_profile_marker_leaves_the_machine(tmp_path, capsys):
    src = tmp_path / "profile"
    src.mkdir()
    filled = marked_file(src / "marked.dcm")
    assert filled > 600  # the 2020s tables hold ~650 attributes
    reread = pydicom.dcmread(src / "marked.dcm")
    assert str(reread.PatientName).startswith(TEXT) and str(reread.StudyInstanceUID).startswith(UID_ROOT)
    out = tmp_path / "out"
    assert bs.main([str(src), "--out", str(out), *ARGS]) == 0
    log = capsys.readouterr()
    rec = json.loads((out / "manifest.jsonl").read_text())
    assert rec["status"] == "written" and rec["n_samples"] == 1  # the sample exists: its JSON is searched
    public = [p for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.jsonl", ".salt")]
    assert {p.name for p in public} >= {"lumid-000000.tar", "_info.json", "stats.json", "build_config.json",
                                        "contact_CT.png"}
    blobs = {str(p.relative_to(out)): p.read_bytes() for p in public}
    blobs["stdout+stderr"] = (log.out + log.err).encode()
    for shard in finished_shards(out):  # the members themselves, uncompressed as they are in the tar
        with tarfile.open(shard) as tar:
            blobs.update({f"{shard.name}/{m.name}": tar.extractfile(m).read() for m in tar.getmembers()})
    for name, blob in blobs.items():
        found = [m for m in MARKERS if m.encode() in blob]
        assert not found, (name, found)
    # the overlay is not drawn into the pixels: the sample equals that of the unmarked file
    plain = tmp_path / "plain"
    assert bs.main([get_testdata_file("CT_small.dcm"), "--out", str(plain), *ARGS]) == 0
    assert list(npy_arrays(out).values()) == list(npy_arrays(plain).values())
    try:
        burned_in.check_engine()
    except ValueError:
        return  # no OCR engine: the contact sheet was searched as bytes only
    from PIL import Image

    sheet = np.asarray(Image.open(out / "contact_CT.png").convert("L"), np.float32)
    read = " ".join(w[-1] for w in burned_in.find_text(sheet))
    assert "wide" in read and TEXT not in read.upper()  # the title reads; no marker in it
