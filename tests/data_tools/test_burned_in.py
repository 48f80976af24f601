"""The burned-in text policy of build_shards on format-exact stand-ins made here: an ultrasound with a name,
an MRN and a hospital rendered into its pixels and no BurnedInAnnotation, a CT screenshot flagged YES, a
secondary capture, a DX flagged NO (kept), a clean ultrasound (kept by the OCR mode)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from data_tools import build_shards as bs  # noqa: E402
from data_tools.shards_build import burned_in  # noqa: E402
from medssl.data import imaging as im  # noqa: E402
from medssl.data.shard_writer import finished_shards  # noqa: E402

US = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
LINES = [((6, 4), "DOE^JANE MRN 4471823"), ((200, 4), "ST MARY HOSP")]  # (x, y), text
MARKERS = ("DOE", "JANE", "4471823", "MARY", "HOSP")
ARGS = ["--workers", "0", "--salt", "s", "--no-progress", "--min-foreground", "0.01"]

try:
    burned_in.check_engine()
    OCR_MISSING = None
except ValueError as exc:
    OCR_MISSING = str(exc)
needs_ocr = pytest.mark.skipif(OCR_MISSING is not None, reason=f"no OCR engine here: {OCR_MISSING}")


def ultrasound(text: bool, seed: int = 0) -> np.ndarray:
    """A 240 x 320 RGB sector scan of speckle, with the identifying LINES burned in when `text`."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:240, :320]
    fan = ((xx - 160) ** 2 + (yy + 40) ** 2 < 260 ** 2) & (np.abs(xx - 160) < (yy + 40) * 0.8) & (yy > 30)
    grey = np.clip(rng.gamma(2.0, 30.0, (240, 320)) * fan, 0, 230).astype(np.uint8)  # [H, W]
    picture = Image.fromarray(np.stack([grey] * 3, -1))
    if text:
        draw = ImageDraw.Draw(picture)
        for xy, line in LINES:
            draw.text(xy, line, fill=(255, 255, 200), font=ImageFont.load_default(size=14))
    return np.asarray(picture)  # [H, W, 3]


def write_dicom(path: Path, sop_class: str, modality: str, pixels: np.ndarray, flag: str | None = None,
                **attrs) -> Path:
    """A DICOM Part 10 file (explicit VR little endian, 8-bit grey or RGB) with patient and study attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = modality, "Doe^Jane", "4471823"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if flag is not None:
        ds.BurnedInAnnotation = flag
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dx_image() -> np.ndarray:
    yy, xx = np.mgrid[:96, :96]
    return (60 + 120 * np.exp(-((xx - 48) ** 2 + (yy - 48) ** 2) / 900)).astype(np.uint8)  # [H, W]


def make_archive(root: Path) -> Path:
    """The stand-ins, one per case."""
    write_dicom(root / "us_text.dcm", US, "US", ultrasound(text=True))
    write_dicom(root / "us_clean.dcm", US, "US", ultrasound(text=False, seed=1))
    shot = ultrasound(text=True)[..., 0]  # a CT screen capture with the same text
    write_dicom(root / "ct_flag_yes.dcm", CT, "CT", shot, flag="YES", RescaleSlope=1, RescaleIntercept=0)
    write_dicom(root / "sc.dcm", SC, "OT", shot, ConversionType="WSD")
    write_dicom(root / "dx_flag_no.dcm", DX, "DX", dx_image(), flag="NO")
    return root


def manifest(out: Path) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def samples(out: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for shard in finished_shards(out):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".npy"):
                    arrays[m.name[:-4]] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return arrays


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive"))


def test_risk_rules_on_headers():
    from pydicom.dataset import Dataset

    def ds(**attrs) -> Dataset:
        d = Dataset()
        for key, value in attrs.items():
            setattr(d, key, value)
        return d

    cases = [  # attributes -> rule (None: not at risk)
        ({"SOPClassUID": CT, "Modality": "CT", "BurnedInAnnotation": "YES"}, "flag"),
        ({"SOPClassUID": US, "Modality": "US"}, "sop-class"),
        ({"SOPClassUID": US, "Modality": "US", "BurnedInAnnotation": "NO"}, None),  # the flag is trusted
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4", "Modality": "OT"}, "sop-class"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.1", "Modality": "ES"}, "sop-class"),  # endoscopy
        ({"SOPClassUID": "1.3.6.1.4.1.9590.100.1", "Modality": "US"}, "modality"),  # a private class
        ({"SOPClassUID": CT, "Modality": "CT", "ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]},
         "image-type"),
        ({"SOPClassUID": CT, "Modality": "CT", "ImageType": "SCREEN SAVE"}, "image-type"),  # one value: a str
        ({"SOPClassUID": CT, "Modality": "CT", "ConversionType": "WSD"}, "sc-equipment"),
        ({"SOPClassUID": US, "Modality": "US", "BurnedInAnnotation": "MAYBE"}, "sop-class"),
        ({"SOPClassUID": CT, "Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, None),
        ({"SOPClassUID": DX, "Modality": "DX"}, None),
    ]
    for attrs, rule in cases:
        found = burned_in.risk(ds(**attrs))
        assert (found and found["rule"]) == rule, (attrs, found)
    assert burned_in.risk(ds(SOPClassUID=US, Modality="US"))["sop_class"] == "Ultrasound Image Storage"
    odd = burned_in.risk(ds(SOPClassUID=US, Modality="US", BurnedInAnnotation="DOE^JANE"))["why"]
    assert "DOE" not in odd and "neither YES nor NO" in odd  # a flag's text never reaches a published reason
    assert burned_in.hint_risk("us")["rule"] == "modality" and burned_in.hint_risk(None) is None
    assert burned_in.hint_risk("OT") is None  # the default hint of every picture file


def test_default_build_leaves_out_every_image_at_risk(archive, tmp_path, capsys):
    out = tmp_path / "out"
    assert bs.main([str(archive), "--out", str(out), "--size", "64", *ARGS]) == 0
    recs = manifest(out)
    expected = {"us_text.dcm": "sop-class", "us_clean.dcm": "sop-class", "ct_flag_yes.dcm": "flag",
                "sc.dcm": "sop-class"}
    for name, rule in expected.items():
        rec = recs[name]
        assert rec["status"] == "burned-in" and not rec.get("keys"), rec
        assert rec["burned_in"][0]["rule"] == rule and rec["burned_in"][0]["action"] == "left out"
        assert rec["reason"].startswith("burned-in risk: ")
    assert recs["ct_flag_yes.dcm"]["burned_in"][0]["flag"] == "YES"
    assert recs["us_text.dcm"]["burned_in"][0] | {"input": None} == {
        "input": None, "rule": "sop-class", "flag": None, "sop_class": "Ultrasound Image Storage",
        "modality": "US", "action": "left out"}
    dx = recs["dx_flag_no.dcm"]
    assert dx["status"] == "written" and dx["n_samples"] == 1 and "burned_in" not in dx
    assert list(samples(out)) == dx["keys"]  # nothing else reached a shard
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"]["burned-in"] == 4 and stats["by_modality"] == {"DX": 1}
    assert stats["burned_in"]["left_out"] == 4 and stats["burned_in"]["policy"] == "exclude"
    assert stats["burned_in"]["left_out_by_rule"] == {"sop-class": 3, "flag": 1}
    assert sorted(p.name for p in out.glob("contact_*.png")) == ["contact_DX.png"]  # drawn after the policy
    assert "burned-in policy exclude: 4 images left out (1 by flag, 3 by sop-class)" in capsys.readouterr().out


def test_keep_writes_them_and_says_so(archive, tmp_path, capsys):
    out = tmp_path / "out"
    assert bs.main([str(archive), "--out", str(out), "--size", "64", *ARGS, "--burned-in", "keep"]) == 0
    recs = manifest(out)
    assert all(r["status"] == "written" for r in recs.values())
    assert recs["us_text.dcm"]["burned_in"][0]["action"] == "kept unchecked"
    assert json.loads((out / "stats.json").read_text())["burned_in"]["kept_unchecked"] == 4
    assert "images were NOT checked for burned-in text" in capsys.readouterr().out


def test_a_series_slice_flagged_yes_is_left_out_of_its_volume(tmp_path):
    from bad_inputs import write_series

    from data_tools.shards_build.series import read_series

    paths = write_series(tmp_path / "series", 10)
    flagged = pydicom.dcmread(paths[3])
    flagged.BurnedInAnnotation = "YES"
    flagged.save_as(paths[3])
    parts = read_series([str(p) for p in paths], 8, "exclude")
    assert [r["input"] for r in parts.left_out] == [str(paths[3])]
    assert parts.left_out[0]["status"] == "burned-in" and parts.left_out[0]["burned_in"][0]["rule"] == "flag"
    assert sum(v.pixels.shape[0] for v in parts.volumes) == 9


def test_unknown_policy_is_refused_at_construction():
    with pytest.raises(ValueError, match="--burned-in: expected one of exclude, ocr, keep"):
        bs.Config(burned_in="blur")


def test_ocr_missing_fails_at_the_start_with_the_install_line(archive, tmp_path, monkeypatch, capsys):
    def no_engine() -> None:
        raise ValueError(burned_in.INSTALL_OCR + "; the tesseract program does not run")

    monkeypatch.setattr(burned_in, "check_engine", no_engine)
    with pytest.raises(SystemExit):
        bs.main([str(archive), "--out", str(tmp_path / "o"), *ARGS, "--burned-in", "ocr"])
    assert "apt-get install -y tesseract-ocr" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no work done, not even the salt


def test_check_engine_names_the_install_line_when_tesseract_is_absent(monkeypatch):
    pytesseract = pytest.importorskip("pytesseract")
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    with pytest.raises(ValueError, match="apt-get install -y tesseract-ocr"):
        burned_in.check_engine()


def test_text_that_still_reads_after_blanking_is_left_out(monkeypatch):
    img = im.ImageData(pixels=np.arange(64 * 64, dtype=np.float32).reshape(64, 64), spacing=(None, None),
                       modality="US")
    monkeypatch.setattr(burned_in, "find_text", lambda frame: [(10, 10, 30, 20, "DOE")])  # never goes away
    cleaned, regions, left = burned_in.clean(img)
    assert regions == [[0, 7, 7, 33, 23]] * burned_in.BLANK_PASSES and left == 1  # margin max(3, 0.3 * 10)
    assert float(cleaned.pixels[7:23, 7:33].max()) == 0.0 and float(img.pixels[7:23, 7:33].max()) > 0  # a copy
    with pytest.raises(burned_in.BurnedInText, match="still reads"):
        burned_in.screen("x.dcm", {"rule": "flag", "why": "BurnedInAnnotation YES"}, "ocr", lambda: img)


@needs_ocr
def test_ocr_blanks_the_text_and_keeps_clean_images(archive, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--size", "224", "--fit", "pad", *ARGS, "--burned-in", "ocr"]  # pad: the corners stay in
    assert bs.main([str(archive), "--out", str(out), *args]) == 0
    recs = manifest(out)
    text, clean = recs["us_text.dcm"], recs["us_clean.dcm"]
    assert text["status"] == "written" and text["burned_in"][0]["action"] == "blanked"
    regions = text["burned_in"][0]["regions"]
    assert all(frame == 0 and y1 <= 40 for frame, _, _, _, y1 in regions)  # only the text band was touched
    covered = {x for _, x0, _, x1, _ in regions for x in range(x0, x1)}
    assert set(range(10, 170)) <= covered and set(range(205, 290)) <= covered  # both lines
    assert clean["status"] == "written" and clean["burned_in"][0] | {"input": None} == {
        "input": None, "rule": "sop-class", "flag": None, "sop_class": "Ultrasound Image Storage",
        "modality": "US", "action": "no text found", "regions": []}
    assert recs["dx_flag_no.dcm"]["status"] == "written" and "burned_in" not in recs["dx_flag_no.dcm"]
    arrays = samples(out)
    for name in ("us_text.dcm", "ct_flag_yes.dcm", "sc.dcm"):  # read the cleaned samples back
        assert recs[name]["status"] == "written", recs[name]
        read = " ".join(w[-1] for w in burned_in.find_text(arrays[recs[name]["keys"][0]]))
        assert not [m for m in MARKERS if m in read], (name, read)
    kept = tmp_path / "kept"  # control: the same read-back finds the markers in a sample written unchecked
    assert bs.main([str(archive / "us_text.dcm"), "--out", str(kept), *args, "--burned-in", "keep"]) == 0
    read = " ".join(w[-1] for w in burned_in.find_text(next(iter(samples(kept).values()))))
    assert {"4471823", "HOSP"} <= set(read.split())
    stats = json.loads((out / "stats.json").read_text())["burned_in"]
    assert stats["blanked"] == 3 and stats["no_text_found"] == 1 and stats["left_out"] == 0
    assert "burned-in policy ocr: 0 images left out (none); 3 cleaned" in capsys.readouterr().out


@needs_ocr
def test_ocr_cleans_each_frame_of_a_multi_frame_file_on_its_own():
    frames = np.stack([ultrasound(text=False, seed=2), ultrasound(text=True, seed=3)])[..., 0]  # [2, H, W]
    img = im.ImageData(pixels=frames.astype(np.float32), spacing=(None, None, None), modality="US")
    cleaned, regions, left = burned_in.clean(img)
    assert left == 0 and regions and {r[0] for r in regions} == {1}  # only the frame with text is touched
    assert np.array_equal(cleaned.pixels[0], img.pixels[0]) and not burned_in.find_text(cleaned.pixels[1])


@needs_ocr
def test_ocr_reads_the_frame_as_the_sample_will_show_it():
    """16-bit frame, text 150 grey levels above the ground, one saturated pixel: invisible on the raw range, plain
    in the VOI window the written sample uses. The text is found and blanked, not kept as 'no text found'."""
    from PIL import Image, ImageDraw, ImageFont

    mask = Image.new("L", (400, 120), 0)
    ImageDraw.Draw(mask).text((20, 30), "DOE JANE 4471823", fill=255, font=ImageFont.load_default(size=22))
    rng = np.random.default_rng(0)
    frame = 1000.0 + rng.normal(0, 5, (120, 400)) + 150.0 * (np.asarray(mask) > 127)
    frame[0, 0] = 65535.0
    img = im.ImageData(pixels=frame.astype(np.float32), spacing=(None, None), modality="US",
                       voi=[im.Window.from_level_width("voi", 1100, 300)])
    assert not burned_in.find_text(img.pixels)  # the raw range hides it
    cleaned, regions, left = burned_in.clean(img)
    assert regions and left == 0
    shown = im.normalise(cleaned)[0]  # the sample's rendering reads nothing any more
    assert not [w for w in burned_in.find_text(shown) if any(m in w[-1] for m in ("DOE", "JANE", "4471823"))]
