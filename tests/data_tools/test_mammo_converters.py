"""mammo_releases: CBIS-DDSM, INbreast and VinDr-Mammo stand-ins in each release's own format (CSV columns,
TCIA folder names with mismatching UIDs, swapped ROI paths, odd-sized masks, OsiriX plist XML, VinDr CSV)
become the seed layout with hand-computed boxes, patient splits and 16-bit intensities; then the MedMask
recipe trains one short stage on the converted set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.coco_tools import main as coco_main

pydicom = pytest.importorskip("pydicom")

H, W = 48, 64  # every stand-in mammogram is 48 rows x 64 columns
WINDOW = (1000.5, 1001.0)  # DICOM linear window: stored 500 -> 0, 1500 -> 1


def _ramp(offset: int = 0) -> np.ndarray:
    r, c = np.mgrid[0:H, 0:W]
    return (300 + 25 * c + 3 * r + offset).astype(np.uint16)  # [H, W] values 300..1916 (+ offset)


def _windowed(v: np.ndarray, low: float = 500.0, high: float = 1500.0) -> np.ndarray:
    """The DICOM linear window written out, as 16-bit PNG values."""
    return np.rint(np.clip((v.astype(np.float64) - low) / (high - low), 0, 1) * 65535)


def _dcm(path: Path, px: np.ndarray, photometric: str = "MONOCHROME2", window=WINDOW, voi_lut=None,
         rescale=None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography, for presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, "MG"
    ds.Rows, ds.Columns = px.shape
    bits = 8 if px.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.PixelData = px.astype(f"<u{bits // 8}").tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        first, data, lut_bits = voi_lut
        item = Dataset()
        item.add_new(0x00283002, "US", [len(data), first, lut_bits])  # LUTDescriptor
        item.add_new(0x00283006, "US", list(data))  # LUTData
        ds.VOILUTSequence = [item]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _mask(shape, *rects) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for r0, r1, c0, c1 in rects:  # inclusive-exclusive rows / columns
        m[r0:r1, c0:c1] = 255
    return m


def _crop() -> np.ndarray:
    return (np.arange(12 * 14).reshape(12, 14) * 7 % 251 + 3).astype(np.uint8)  # many grey levels


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") or im.mode == "I", im.mode
        return np.asarray(im).astype(np.int64)


def _coco(out: Path, split: str) -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def _by_file(out: Path) -> dict[str, tuple[str, dict, list]]:
    """file stem -> (split, image record, [(category name, bbox)])."""
    res = {}
    for split in ("train", "val", "test"):
        c = _coco(out, split)
        names = {k["id"]: k["name"] for k in c["categories"]}
        for im in c["images"]:
            anns = [(names[a["category_id"]], a["bbox"]) for a in c["annotations"] if a["image_id"] == im["id"]]
            res[Path(im["file_name"]).stem] = (split, im, anns)
    return res


def _manifest(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


# ------------------------------------------------------------------------------------------ CBIS-DDSM
CBIS_MASS_COLS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                  "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                  "image file path", "cropped image file path", "ROI mask file path"]
CBIS_CALC_COLS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                  "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                  "image file path", "cropped image file path", "ROI mask file path"]


def _uid(n: int) -> str:
    return f"1.3.6.1.4.1.9590.100.1.2.{n}"


def _cbis_row(kind: str, pid: str, side: str, view: str, abn: int, pathology: str, folder: str, roi_paths=None):
    """One CSV row with paths as the CSV writes them: <case folder>/<UID>/<UID>/00000x.dcm."""
    img = f"{folder}/{_uid(11)}/{_uid(12)}/000000.dcm"
    crop, mask = roi_paths or (f"{folder}_{abn}/{_uid(21)}/{_uid(22)}/000000.dcm",
                               f"{folder}_{abn}/{_uid(21)}/{_uid(22)}/000001.dcm\n")  # stray newline as in the CSV
    shape = {"mass": ("OVAL", "CIRCUMSCRIBED"), "calcification": ("PLEOMORPHIC", "CLUSTERED")}[kind]
    return [pid, "2", side, view, str(abn), kind, *shape, "4", pathology, "3", img, crop, mask]


def _tcia(src: Path, folder: str, series: str, files: dict[str, np.ndarray], **kw) -> None:
    """A case folder as the NBIA retriever lays it out: <folder>/<date-DDSM-nnnn>/<n-series-nnnn>/1-k.dcm."""
    for name, px in files.items():
        _dcm(src / "CBIS-DDSM" / folder / "07-20-2016-DDSM-74994" / f"1.000000-{series}-24515" / name, px,
             window=WINDOW if px.dtype == np.uint16 else None, **kw)


@pytest.fixture(scope="module")
def cbis(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("cbis")
    rows = {("mass", "train"): [], ("mass", "test"): [], ("calcification", "train"): [],
            ("calcification", "test"): []}
    full = "full mammogram images"

    def case(kind, split, pid, side, view, findings, image_offset=0, masks=None, roi_paths=None):
        prefix = {"mass": "Mass", "calcification": "Calc"}[kind] + ("-Training" if split == "train" else "-Test")
        folder = f"{prefix}_{pid}_{side}_{view}"
        _tcia(src, folder, full, {"1-1.dcm": _ramp(image_offset)})
        for abn, pathology in findings:
            rows[(kind, split)].append(_cbis_row(kind, pid, side, view, abn, pathology, folder, roi_paths))
            if masks is not None and abn in masks:
                _tcia(src, f"{folder}_{abn}", "ROI mask images", {"1-1.dcm": masks[abn], "1-2.dcm": _crop()})

    # two abnormalities; the malignant one's mask has two blobs and a one-pixel speck
    case("mass", "train", "P_00001", "LEFT", "CC", [(1, "MALIGNANT"), (2, "BENIGN")], masks={
        1: _mask((H, W), (10, 20, 5, 25), (30, 38, 40, 50), (45, 46, 60, 61)), 2: _mask((H, W), (2, 6, 2, 6))})
    case("mass", "train", "P_00002", "RIGHT", "MLO", [(1, "BENIGN_WITHOUT_CALLBACK")], masks={
        1: _mask((H, W), (5, 9, 5, 9))})
    # a mask of half the mammogram's size: boxes scale by 2
    case("mass", "train", "P_00003", "LEFT", "MLO", [(1, "MALIGNANT")],
         masks={1: _mask((H // 2, W // 2), (5, 10, 4, 12))})
    # old-style tree where the CSV paths exist verbatim, but 'ROI mask file path' names the crop and vice versa
    folder4 = "Mass-Training_P_00004_RIGHT_CC"
    crop4, mask4 = f"{folder4}_1/{_uid(41)}/{_uid(42)}/000000.dcm", f"{folder4}_1/{_uid(41)}/{_uid(42)}/000001.dcm"
    _dcm(src / crop4, _mask((H, W), (20, 30, 30, 50)), window=None)  # the mask, under the crop's name
    _dcm(src / mask4, _crop(), window=None)  # the crop, under the mask's name
    case("mass", "train", "P_00004", "RIGHT", "CC", [(1, "MALIGNANT")], roi_paths=(crop4, mask4), image_offset=100)
    # a test patient; and P_00006, in the training table AND the test table: all of it must go to test
    case("mass", "test", "P_00005", "LEFT", "CC", [(1, "MALIGNANT")], masks={1: _mask((H, W), (1, 4, 1, 4))})
    case("mass", "train", "P_00006", "LEFT", "CC", [(1, "MALIGNANT")], masks={1: _mask((H, W), (8, 16, 8, 16))})
    case("mass", "test", "P_00006", "RIGHT", "CC", [(1, "BENIGN")], masks={1: _mask((H, W), (8, 16, 8, 16))})
    # missing mammogram folder; a broken mammogram; a malignant case whose ROI folder holds no mask
    rows[("mass", "train")].append(_cbis_row("mass", "P_00007", "LEFT", "CC", 1, "MALIGNANT",
                                             "Mass-Training_P_00007_LEFT_CC"))
    case("mass", "train", "P_00008", "LEFT", "CC", [(1, "MALIGNANT")], masks={1: _mask((H, W), (8, 16, 8, 16))})
    bad = next((src / "CBIS-DDSM" / "Mass-Training_P_00008_LEFT_CC").rglob("1-1.dcm"))
    bad.write_bytes(bad.read_bytes()[:400])  # truncated
    case("mass", "train", "P_00009", "LEFT", "CC", [(1, "MALIGNANT")])
    _tcia(src, "Mass-Training_P_00009_LEFT_CC_1", "cropped images", {"1-1.dcm": _crop()})
    # a mask of another shape than the mammogram (not a resampled copy): skipped, not stretched
    case("mass", "train", "P_00011", "LEFT", "CC", [(1, "MALIGNANT")], masks={1: _mask((H, 20), (8, 16, 8, 16))})
    # the same image as P_00001 LEFT CC in the calcification table (its own copy of the mammogram)
    case("calcification", "train", "P_00001", "LEFT", "CC", [(1, "MALIGNANT")], masks={
        1: _mask((H, W), (38, 46, 50, 60))})
    case("calcification", "test", "P_00010", "RIGHT", "MLO", [(1, "MALIGNANT")], masks={
        1: _mask((H, W), (3, 7, 3, 7))})
    for (kind, split), rs in rows.items():
        name = {"mass": "mass", "calcification": "calc"}[kind]
        with open(src / f"{name}_case_description_{split}_set.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CBIS_MASS_COLS if kind == "mass" else CBIS_CALC_COLS)
            w.writerows(rs)
    return src


def _convert(release: str, src: Path, out: Path, *extra: str) -> int:
    return coco_main([f"from-{release}", str(src), "--out", str(out), "--no-progress", *extra])


def test_cbis_ddsm_boxes_splits_intensities(cbis, tmp_path):
    out = tmp_path / "ddsm"
    assert _convert("cbis-ddsm", cbis, out, "--val-fraction", "0.25") == 0
    got, man = _by_file(out), _manifest(out)
    # P_00001: malignant mask -> two component boxes (the 1-pixel speck dropped); the benign one no box
    assert got["P_00001_LEFT_CC"][2] == [("mass", [5.0, 10.0, 20.0, 10.0]), ("mass", [40.0, 30.0, 10.0, 8.0])]
    assert any("speck" in n for n in man["P_00001_LEFT_CC"]["notes"])
    assert got["P_00002_RIGHT_MLO"][2] == []  # benign only: kept as a negative
    assert got["P_00003_LEFT_MLO"][2] == [("mass", [8.0, 10.0, 16.0, 10.0])]  # half-size mask, x2
    assert got["P_00004_RIGHT_CC"][2] == [("mass", [30.0, 20.0, 20.0, 10.0])]  # swapped paths: mask by content
    assert got["P_00005_LEFT_CC"][2] == [("mass", [0.0, 0.0, 8.0, 8.0])]  # 3x3 mask grown to --min-box 8, shifted in
    assert {k for k in got if k.startswith("P_00006")} == {"P_00006_LEFT_CC", "P_00006_RIGHT_CC"}
    assert {got[k][0] for k in got if k.startswith("P_00006")} == {"test"}
    assert "moved to test" in " ".join(man["P_00006_LEFT_CC"]["notes"])
    assert "P_00010_RIGHT_MLO" not in man  # calcification table not read for --kinds mass
    assert man["P_00007_LEFT_CC"]["status"] == "skipped" and "Mass-Training_P_00007_LEFT_CC" in man[
        "P_00007_LEFT_CC"]["reason"]
    assert man["P_00008_LEFT_CC"]["status"] == "skipped" and "truncated" in man["P_00008_LEFT_CC"]["reason"]
    assert man["P_00009_LEFT_CC"]["status"] == "skipped" and "no ROI mask" in man["P_00009_LEFT_CC"]["reason"]
    assert "another shape than the 48x64 image" in man["P_00011_LEFT_CC"]["reason"]
    # splits by patient: 8 training patients (P_00001-4, 7-9, 11) -> round(0.25 * 8) = 2 to val; 5, 6 in test
    split_of: dict[str, set] = {}
    for r in man.values():
        split_of.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert len([p for p, s in split_of.items() if s == {"val"}]) == 2
    assert {p for p, s in split_of.items() if s == {"test"}} == {"P_00005", "P_00006"}
    assert {got[k][0] for k in got} >= {"train", "test"}
    # intensities: the linear VOI window of the DICOM standard, 16 bit
    split, im, _ = got["P_00004_RIGHT_CC"]
    png = _png(out / "images" / split / im["file_name"])
    assert png.shape == (H, W) and (im["height"], im["width"]) == (H, W)
    np.testing.assert_allclose(png, _windowed(_ramp(100)), atol=1)
    assert png[0, 0] == 0 and png[0, 24] == 32768 and png[H - 1, W - 1] == 65535  # stored 400, 1000, 2116
    # same options, same seed: same splits (deterministic); other options refuse to resume
    again = tmp_path / "ddsm2"
    assert _convert("cbis-ddsm", cbis, again, "--val-fraction", "0.25") == 0
    assert {k: v[0] for k, v in _by_file(again).items()} == {k: v[0] for k, v in got.items()}
    assert _convert("cbis-ddsm", cbis, out, "--val-fraction", "0.5") == 2


def test_cbis_ddsm_both_kinds_merge_one_image(cbis, tmp_path):
    out = tmp_path / "ddsm"
    assert _convert("cbis-ddsm", cbis, out, "--kinds", "both", "--max-size", "32") == 0
    got = _by_file(out)
    split, im, anns = got["P_00001_LEFT_CC"]
    assert (im["height"], im["width"]) == (24, 32)  # 48x64 halved
    assert anns == [("mass", [2.5, 5.0, 10.0, 5.0]), ("mass", [20.0, 15.0, 5.0, 4.0]),
                    ("calcification", [25.0, 19.0, 5.0, 4.0])]
    assert _png(out / "images" / split / im["file_name"]).shape == (24, 32)
    assert got["P_00010_RIGHT_MLO"][0] == "test"
    assert [c["name"] for c in _coco(out, "train")["categories"]] == ["mass", "calcification"]


def test_resume_after_kill(cbis, tmp_path):
    out = tmp_path / "ddsm"
    assert _convert("cbis-ddsm", cbis, out) == 0
    first = {s: _coco(out, s) for s in ("train", "val", "test")}
    lines = (out / "manifest.jsonl").read_text().splitlines()
    kept = {json.loads(line)["case"] for line in lines[:3]}
    keep_png = next(p for p in (out / "images").rglob("*.png") if p.stem in kept)
    stamp = keep_png.stat().st_mtime_ns
    # a kill mid-run: the manifest stops after three cases with a half-written line; PNGs of later cases gone
    (out / "manifest.jsonl").write_text("\n".join(lines[:3]) + '\n{"case": "P_000')
    for p in (out / "images").rglob("*.png"):
        if p.stem not in kept:
            p.unlink()
    stale = out / "images" / "train" / ".P_00009_LEFT_CC.png.tmp"  # the PNG being written at the kill
    stale.write_bytes(b"half a png")
    assert _convert("cbis-ddsm", cbis, out) == 0
    assert not stale.exists()
    assert {s: _coco(out, s) for s in ("train", "val", "test")} == first
    assert keep_png.stat().st_mtime_ns == stamp  # not redone
    assert len(_manifest(out)) == len(lines)


# ------------------------------------------------------------------------------------------- INbreast
def _plist(rois) -> str:
    items = []
    for name, pts in rois:
        px = "".join(f"<string>({x}, {y})</string>" for x, y in pts)
        items.append(f"<dict><key>Name</key><string>{name}</string><key>NumberOfPoints</key>"
                     f"<integer>{len(pts)}</integer><key>Point_mm</key><array></array>"
                     f"<key>Point_px</key><array>{px}</array><key>Type</key><integer>15</integer></dict>")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC "-//Apple Computer//DTD PLIST 1.0//EN" '
            '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist version="1.0"><dict><key>Images</key><array>'
            f'<dict><key>ImageIndex</key><integer>0</integer><key>NumberOfROIs</key><integer>{len(rois)}</integer>'
            f'<key>ROIs</key><array>{"".join(items)}</array></dict></array></dict></plist>\n')


@pytest.fixture(scope="module")
def inbreast(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inb") / "INbreast Release 1.0"
    dcm, xml = root / "AllDICOMs", root / "AllXML"
    xml.mkdir(parents=True)
    table = ["Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads"]
    spec = [  # id, patient hash, side, view, BI-RADS, ROIs
        ("50000001", "aaaa1111", "L", "CC", "5", [("Mass", [(10.5, 12.25), (30, 12), (20, 40.75)]),
                                                    ("Calcification", [(5, 6)]), ("Spiculated Region", [(1, 1)])]),
        ("50000002", "aaaa1111", "L", "MLO", "2", [("Mass", [(3, 3), (9, 9)])]),
        ("50000003", "bbbb2222", "R", "CC", "1", None),
        ("50000004", "cccc3333", "R", "MLO", "4c", [("Mass", [(50, 40), (63.5, 47.5)])]),
        ("50000005", "dddd4444", "L", "CC", "4a", [("Mass", [(3, 3), (9, 9)])]),
        ("50000006", "eeee5555", "R", "CC", "3", None),
        ("50000007", "ffff6666", "L", "MLO", "6", [("Mass", [(3, 3), (9, 9)])]),
    ]
    for iid, pat, side, view, birads, rois in spec:
        path = dcm / f"{iid}_{pat}_MG_{side}_{view}_ANON.dcm"
        # stored = (value + 100) / 2 with RescaleSlope 2, intercept -100: the window applies to the rescaled value
        _dcm(path, ((_ramp() + 100) // 2).astype(np.uint16), rescale=(2, -100))
        table.append(f"removed;removed;{side};{view};201001;{iid};     ;{birads}")
        if rois is not None:
            (xml / f"{iid}.xml").write_text(_plist(rois))
    (dcm / "50000005_dddd4444_MG_L_CC_ANON.dcm").write_bytes(b"not a dicom at all" * 20)
    (xml / "50000007.xml").write_text("<plist><dict><key>Images</key>")  # broken XML
    (root / "INbreast.csv").write_text("\n".join(table) + "\n")
    return root


def test_inbreast_plist_birads_patients(inbreast, tmp_path):
    out = tmp_path / "inbreast"
    assert _convert("inbreast", inbreast, out, "--kinds", "both", "--test-fraction", "0.25",
                    "--val-fraction", "0.5") == 0
    got, man = _by_file(out), _manifest(out)
    assert got["50000001"][2] == [("mass", [10.5, 12.0, 19.5, 28.75]), ("calcification", [1.0, 2.0, 8.0, 8.0])]
    assert "Spiculated Region" in man["50000001"]["notes"][0]
    assert got["50000002"][2] == []  # BI-RADS 2: a negative
    assert got["50000004"][2] == [("mass", [50.0, 39.75, 13.5, 8.0])]  # BI-RADS 4c; 7.5 rows grown to 8
    assert man["50000003"]["status"] == "skipped" and "normal" in man["50000003"]["reason"]
    assert man["50000005"]["reason"] == "not a DICOM file"
    assert "unreadable ROI XML" in man["50000007"]["reason"]
    assert got["50000001"][0] == got["50000002"][0]  # one patient, one split
    counts = {s: len({man[k]["patient"] for k in man if man[k].get("split") == s}) for s in ("train", "val", "test")}
    assert counts == {"train": 2, "val": 2, "test": 2}  # 6 patients: 25% test -> 2 (rounded), half of 4 -> val
    # modality LUT before the window: stored s -> 2 s - 100
    split, im, _ = got["50000004"]
    stored = ((_ramp() + 100) // 2).astype(np.float64)
    np.testing.assert_allclose(_png(out / "images" / split / im["file_name"]), _windowed(2 * stored - 100), atol=1)


def test_inbreast_normals_kept_on_request(inbreast, tmp_path):
    out = tmp_path / "inbreast"
    assert _convert("inbreast", inbreast, out, "--include-normals", "--drop-negatives") == 0
    man = _manifest(out)
    assert man["50000003"]["status"] == "converted" and man["50000003"]["boxes"] == []
    assert man["50000002"]["status"] == "skipped" and "--drop-negatives" in man["50000002"]["reason"]


# ---------------------------------------------------------------------------------------- VinDr-Mammo
VINDR_COLS = ["image_id", "study_id", "series_id", "laterality", "view_position", "height", "width",
              "breast_birads", "breast_density", "finding_categories", "finding_birads", "xmin", "ymin", "xmax",
              "ymax", "split"]
LUT = (500, [min(4095, 4 * i) for i in range(1024)], 12)  # first mapped 500, 1024 entries, 12-bit output


@pytest.fixture(scope="module")
def vindr(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("vindr") / "vindr-mammo"
    img = src / "images"
    _dcm(img / "s1" / "i1.dicom", _ramp(), photometric="MONOCHROME1")
    _dcm(img / "s1" / "i2.dicom", _ramp())
    _dcm(img / "s2" / "i3.dicom", _ramp(), window=None, voi_lut=LUT)
    _dcm(img / "s3" / "i4.dicom", _ramp())
    _dcm(img / "s5" / "i6.dicom", _ramp())

    def row(iid, study, cats, birads, box, split="training", hw=(H, W)):
        b = [str(v) for v in box] if box else ["", "", "", ""]
        return [iid, study, "ser", "L", "CC", str(hw[0]), str(hw[1]), "BI-RADS 4", "DENSITY C", cats, birads, *b, split]

    rows = [row("i1", "s1", "['Mass']", "BI-RADS 4", (10.5, 5.0, 30.25, 25.0)),
            row("i1", "s1", "['Suspicious Calcification']", "BI-RADS 4", (40, 30, 44, 33)),
            row("i2", "s1", "['No Finding']", "", None),
            row("i3", "s2", "['Mass', 'Suspicious Calcification']", "BI-RADS 5", (0, 0, 64, 48)),
            row("i3", "s2", "['Mass']", "BI-RADS 3", (1, 1, 5, 5)),
            row("i4", "s3", "['Mass']", "BI-RADS 3", (1, 1, 5, 5), split="test"),
            row("i5", "s4", "['Mass']", "BI-RADS 5", (1, 1, 5, 5)),
            row("i6", "s5", "['Mass']", "BI-RADS 5", (1, 1, 5, 5), hw=(50, 64))]
    with open(src / "finding_annotations.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(VINDR_COLS)
        w.writerows(rows)
    return src


def test_vindr_boxes_birads_monochrome1_voi_lut(vindr, tmp_path):
    out = tmp_path / "vindr"
    assert _convert("vindr", vindr, out, "--val-fraction", "0.0") == 0
    got, man = _by_file(out), _manifest(out)
    assert got["i1"][2] == [("mass", [10.5, 5.0, 19.75, 20.0])]  # the calcification is not a --kinds mass box
    assert got["i3"][2] == [("mass", [0.0, 0.0, 64.0, 48.0])]  # only the BI-RADS 5 mass
    assert got["i4"][0] == "test" and got["i4"][2] == []
    assert "normal" in man["i2"]["reason"]
    assert man["i5"]["reason"].startswith("DICOM not found")
    assert man["i6"]["reason"] == "annotations are for 50x64, the DICOM is 48x64"
    # a name the registry does not know: the written registry.yaml makes it a dataset for the recipe
    from medssl.data.coco import dataset_paths, load_registry

    assert load_registry(out / "registry.yaml") == ["vindr"]
    assert dataset_paths("vindr", "test", tmp_path) == (out / "annotations/instances_test.json", out / "images/test")
    # MONOCHROME1: the window, then inverted
    split, im, _ = got["i1"]
    np.testing.assert_allclose(_png(out / "images" / split / im["file_name"]), 65535 - _windowed(_ramp()), atol=1)
    # VOI LUT sequence: v -> LUTData[clip(v - 500, 0, 1023)] / 4095
    split, im, _ = got["i3"]
    idx = np.clip(_ramp().astype(np.int64) - 500, 0, 1023)
    expected = np.rint(np.minimum(4095, 4 * idx) / 4095 * 65535)
    np.testing.assert_allclose(_png(out / "images" / split / im["file_name"]), expected, atol=1)


def test_vindr_max_size_scales_boxes(vindr, tmp_path):
    out = tmp_path / "vindr"
    assert _convert("vindr", vindr, out, "--max-size", "32", "--kinds", "both", "--val-fraction", "0.0") == 0
    got = _by_file(out)
    assert (got["i1"][1]["height"], got["i1"][1]["width"]) == (24, 32)
    # the 4x3 calcification box is grown to 8x8 source pixels first, then halved
    assert got["i1"][2] == [("mass", [5.25, 2.5, 9.875, 10.0]), ("calcification", [19.0, 13.75, 4.0, 4.0])]
    assert got["i3"][2] == [("mass", [0.0, 0.0, 32.0, 24.0]), ("calcification", [0.0, 0.0, 32.0, 24.0])]


def test_positive_set_through_the_python_api(vindr, tmp_path):
    from data_tools.mammo_releases import Options, convert

    out = tmp_path / "v3"
    summary = convert("vindr", vindr, out, Options(positive=("BI-RADS 3",), val_fraction=0.0), progress=False)
    got = _by_file(out)
    assert summary["validate"].ok and summary["converted"] == 3  # i1, i3, i4
    assert got["i3"][2] == got["i4"][2] == [("mass", [0.0, 0.0, 8.0, 8.0])]  # the BI-RADS 3 masses (1,1)-(5,5), grown
    assert got["i1"][2] == []  # BI-RADS 4 is not in this positive set
    default = tmp_path / "vd"
    convert("vindr", vindr, default, Options(), progress=False)
    assert json.loads((default / "convert_options.json").read_text())["positive"] == ["4", "4a", "4b", "4c", "5", "6"]


# ------------------------------------------------------------------------------------ recipe end to end
def test_medmask_recipe_trains_on_converted_cbis(cbis, tmp_path):
    import importlib.util

    root = tmp_path / "data"
    assert _convert("cbis-ddsm", cbis, root / "ddsm", "--val-fraction", "0.25") == 0
    spec = importlib.util.spec_from_file_location("medmask_detect", "recipes/medmask_detect.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    # 96 px: a last batch of one 48x64 image at 64 px gives 1x1 maps, where the backbone's BatchNorm fails
    sets = ["model.backbone_name=resnet10t", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
            "model.dec_layers=1", "model.dim_feedforward=32", "model.num_queries=4", "model.two_stage=false",
            "data.max_size=128", "data.sizes=[96]", "data.batch_size=2", "data.target_split=train",
            "source_only.epochs=1"]
    rc = recipe.main(["--dataset", "ddsm", "--data-root", str(root), "--stage", "source_only",
                      "--config", "recipes/configs/medmask_demo.yaml", "--out", str(tmp_path / "run"),
                      *(a for s in sets for a in ("--set", s))])
    assert rc == 0
    # the recipe scored exactly the converted val and test sets (images, lesions)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for split, scores in (("val", summary["source_only"]), ("test", summary["test"]["source_only"])):
        coco = _coco(root / "ddsm", split)
        assert (scores["num_images"], scores["num_lesions"]) == (len(coco["images"]), len(coco["annotations"]))
    assert (tmp_path / "run" / "source_only" / "best.pt").is_file()
