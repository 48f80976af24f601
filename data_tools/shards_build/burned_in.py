"""The burned-in text policy: images whose pixels may carry identifiers never reach a shard or a picture.

Attribute de-identification does not reach text drawn into the pixels (patient name, birth date, MRN,
accession number, hospital): ultrasound, secondary captures (screenshots, scanned documents, 3-D
renderings, digitised film), endoscopy, photographs. `--burned-in` chooses what the builder does with
an image at risk:

- `exclude` (default): left out, recorded in the manifest as status "burned-in" with the rule that
  caught it.
- `ocr`: an offline text detector (tesseract through pytesseract) finds words, their boxes are
  blanked with a margin, the cleaned image is read again (blanking what now reads, up to
  `BLANK_PASSES` rounds), and an image that still reads as text after that is left out. The blanked
  regions are recorded in the manifest.
- `keep`: the archive was cleaned upstream; images at risk are written and counted as unchecked.

An image is at risk when `BurnedInAnnotation` (0028,0301) is YES, or, where the flag is absent or not
NO, when its SOP class, modality, image type or equipment is of a kind that routinely carries burned-in
text. A flag NO is trusted. Sources for the kinds (read, not copied):

- DICOM PS3.15 E.3.1 (Clean Pixel Data Option): CT images do not normally carry burned-in annotation,
  ultrasound images routinely do; a cleaned image gets Burned In Annotation "NO". PS3.15 E.3.3 (Clean
  Graphics Option): overlays and annotations may hold identifiers too (the reader never draws
  overlays into the pixels).
- DICOM PS3.3 C.7.6.1.1 (General Image Module): Burned In Annotation YES / NO, Type 3 in most IODs,
  so absence means "unknown", not "clean".
- Karnak (OsiriX foundation) "clean.pixel.data" profile: applies to Ultrasound (single / multi-frame),
  the multi-frame Secondary Capture classes and VL Endoscopic images, or BurnedInAnnotation YES.
- pydicom/deid `deid.dicom` recipe (blacklist, after RSNA CTP's BurnedInPixelsFilter script): ImageType
  SECONDARY with modality OT (scanned documents, secondary saves), ImageType SAVE / SCREEN SAVE,
  REPORTDATA, DEMOGRAPHICDATA, and the secondary capture device attributes; its graylist and CTP's
  DicomPixelAnonymizer script hold pixel regions for ultrasound of every major vendor, CT dose
  screens and NM / PET secondary captures.
- SIIM "Secondary Capture SOP Class": digitised film, screen captures, scanned documents, usually
  modality OT.
- The VL photographic / microscopic / endoscopic and ophthalmic photography classes (PS3.4 B.5) hold
  camera pictures, where labels, wristbands and faces show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data import imaging as im

POLICIES = ("exclude", "ocr", "keep")
INSTALL_OCR = ("--burned-in ocr needs the tesseract OCR engine and pytesseract: "
               "apt-get install -y tesseract-ocr && pip install 'medssl[ocr]' (pytesseract)")

RISKY_SOP_CLASSES = {  # PS3.4 B.5 storage SOP classes whose pixels routinely carry text
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL Endoscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL Microscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "Video Microscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.3": "VL Slide-Coordinates Microscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image Storage",
}
RISKY_MODALITIES = {  # PS3.3 C.7.3.1.1.1 codes of the same kinds, for files of other (or private) classes
    "US": "ultrasound", "IVUS": "intravascular ultrasound", "OT": "other (secondary captures, scanned "
    "documents)", "XC": "external-camera photography", "ES": "endoscopy", "GM": "general microscopy",
    "SM": "slide microscopy", "OP": "ophthalmic photography", "DOC": "document",
}
RISKY_IMAGE_TYPES = ("SAVE", "SCREEN SAVE", "REPORTDATA", "DEMOGRAPHICDATA")  # deid / CTP blacklist values
SC_EQUIPMENT = ("ConversionType", "DateOfSecondaryCapture", "SecondaryCaptureDeviceManufacturer")

OCR_MIN_CONFIDENCE = 70.0  # tesseract word confidence (0-100) for a word to count as text: rendered text
# reads at 84-96, ultrasound speckle at up to ~65 (measured on test images)
OCR_MIN_CHARS = 2  # letters / digits a word needs to count (single specks are not text)
OCR_MIN_SIDE = 1000  # smaller frames are upscaled x2 for the detector (it wants text >= ~20 px high)
BLANK_PASSES = 2  # rounds of read + blank before the last read decides
BLANK_MARGIN = 0.3  # blanked box grows by this fraction of its height on every side (at least 3 px)


class BurnedInText(im.UnreadableImage):
    """An image left out by the burned-in policy; `details` is its manifest record (rule, flag, ...)."""

    status = "burned-in"

    def __init__(self, path: str | Path, reason: str, details: dict[str, Any]):
        super().__init__(path, reason)
        self.details = details


def risk(ds: Any) -> dict[str, Any] | None:
    """Why the DICOM dataset `ds` may carry burned-in text (None: it is not of a risky kind, or flagged NO).

    The record names the rule ("flag", "sop-class", "modality", "image-type", "sc-equipment"), the flag as
    found (None when absent), the SOP class and the modality.
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() or None
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper() or None
    found = {"flag": flag, "sop_class": RISKY_SOP_CLASSES.get(sop, sop or None), "modality": modality}
    if flag == "YES":
        return {"rule": "flag", **found, "why": "BurnedInAnnotation YES"}
    if flag == "NO":
        return None
    unflagged = "BurnedInAnnotation absent" if flag is None else "BurnedInAnnotation neither YES nor NO"
    if sop in RISKY_SOP_CLASSES:
        return {"rule": "sop-class", **found, "why": f"SOP class {RISKY_SOP_CLASSES[sop]}, {unflagged}"}
    if modality in RISKY_MODALITIES:
        return {"rule": "modality", **found, "why": f"modality {modality} ({RISKY_MODALITIES[modality]}), "
                f"{unflagged}"}
    value = ds.get("ImageType") or []
    image_type = [str(v).upper() for v in ([value] if isinstance(value, str) else value)]  # one value: a str
    hit = next((t for t in RISKY_IMAGE_TYPES if t in image_type), None)
    if hit:
        return {"rule": "image-type", **found, "why": f"ImageType {hit}, {unflagged}"}
    sc = next((k for k in SC_EQUIPMENT if ds.get(k) not in (None, "")), None)
    if sc:
        return {"rule": "sc-equipment", **found, "why": f"secondary capture equipment ({sc}), {unflagged}"}
    return None


def hint_risk(modality: str | None) -> dict[str, Any] | None:
    """Risk of a picture file (PNG / JPEG / TIFF), which has no flag: only the modality hint given for it."""
    modality = (modality or "").upper()
    if modality not in RISKY_MODALITIES or modality == "OT":  # OT is the default hint of every picture
        return None
    return {"rule": "modality", "flag": None, "sop_class": None, "modality": modality,
            "why": f"modality hint {modality} ({RISKY_MODALITIES[modality]}) for a picture file"}


def screen(path: str | Path, found: dict[str, Any] | None, policy: str,
           decode: Callable[[], im.ImageData]) -> tuple[im.ImageData, dict[str, Any] | None]:
    """Apply the policy to one image at `path` (`found`: its `risk`); returns the image to use and its
    manifest record (None when not at risk). Raises `BurnedInText` when the image is left out.

    `decode` is called only when the pixels are needed (never for an image `exclude` leaves out).
    """
    if found is None:
        return decode(), None
    record = {k: v for k, v in found.items() if k != "why"}
    if policy == "keep":
        return decode(), {**record, "action": "kept unchecked"}
    if policy == "exclude":
        raise BurnedInText(path, f"burned-in risk: {found['why']}", {**record, "action": "left out"})
    image = decode()
    cleaned, regions, left = clean(image)
    if left:
        raise BurnedInText(path, f"burned-in text still reads after blanking ({found['why']})",
                           {**record, "action": "left out", "regions": regions, "still_reads": left})
    return cleaned, {**record, "action": "blanked" if regions else "no text found", "regions": regions}


def screen_dicom(path: str | Path, ds: Any, policy: str) -> tuple[im.ImageData, dict[str, Any] | None]:
    """`screen` of a read DICOM dataset; one that holds no image (an SR, a file without pixel data) raises
    its own `UnreadableImage` first, so that it is recorded as such rather than as burned-in."""
    im.check_dicom_image(path, ds)
    return screen(path, risk(ds), policy, lambda: im.dicom_to_image(path, ds))


def check_engine() -> None:
    """Raise `ValueError` with the install line when the OCR engine cannot run here."""
    try:
        import pytesseract

        pytesseract.get_tesseract_version()
    except ImportError as exc:
        raise ValueError(f"{INSTALL_OCR}; pytesseract is not installed") from exc
    except Exception as exc:  # noqa: BLE001 - TesseractNotFoundError and a broken binary alike
        raise ValueError(f"{INSTALL_OCR}; the tesseract program does not run ({type(exc).__name__})") from exc


def find_text(frame: np.ndarray) -> list[tuple[int, int, int, int, str]]:
    """Words the OCR engine reads in a 2-D image: (x0, y0, x1, y1, text) in the frame's pixels.

    The frame is scaled to 8 bits on its own range and turned to dark text on a light ground (burned-in
    text is mostly light on a dark image); frames under `OCR_MIN_SIDE` are upscaled x2.
    """
    import pytesseract
    from PIL import Image

    x = frame.astype(np.float32)  # [H, W]
    lo, hi = float(x.min()), float(x.max())
    x01 = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if float(np.median(x01)) < 0.5:
        x01 = 1.0 - x01
    scale = 2 if min(x.shape) < OCR_MIN_SIDE else 1
    picture = Image.fromarray(np.round(x01 * 255).astype(np.uint8))
    if scale > 1:
        picture = picture.resize((x.shape[1] * scale, x.shape[0] * scale), Image.Resampling.BICUBIC)
    data = pytesseract.image_to_data(picture, config="--psm 11", output_type=pytesseract.Output.DICT)
    words = []
    for text, conf, left, top, width, height in zip(data["text"], data["conf"], data["left"], data["top"],
                                                    data["width"], data["height"]):
        text = str(text).strip()
        if float(conf) >= OCR_MIN_CONFIDENCE and sum(c.isalnum() for c in text) >= OCR_MIN_CHARS:
            words.append((int(left) // scale, int(top) // scale, -(-int(left + width) // scale),
                          -(-int(top + height) // scale), text))
    return words


CT_OCR_WINDOWS = (im.Window("soft", -160.0, 240.0), im.Window("wide", -1000.0, 1000.0))  # as samples show CT


def renderings(image: im.ImageData, frame: np.ndarray) -> list[np.ndarray]:
    """One frame of `image` as OCR must read it: on its own range, and as a sample will show it (the modality's
    window: VOI, percentiles, or for CT the usual HU windows). Text a few grey levels above a dark ground is
    invisible on the raw range of a 16-bit frame with one saturated pixel, yet plain in the written sample."""
    one = replace(image, pixels=frame, is_volume=False)  # [H, W]
    out = [frame]
    for window in CT_OCR_WINDOWS if image.modality in im.CT_MODALITIES else (None,):
        try:
            out.append(im.normalise(one, window)[0])
        except Exception:  # noqa: BLE001 - a frame that cannot be windowed is still read on its own range
            pass
    return out


def _words(image: im.ImageData, frame: np.ndarray) -> list[tuple[int, int, int, int, str]]:
    """Every word `find_text` reads in any rendering of the frame, once per box."""
    found: dict[tuple[int, int, int, int], str] = {}
    for picture in renderings(image, frame):
        for x0, y0, x1, y1, text in find_text(picture):
            found.setdefault((x0, y0, x1, y1), text)
    return [(*box, text) for box, text in found.items()]


def clean(image: im.ImageData) -> tuple[im.ImageData, list[list[int]], int]:
    """Blank every word the OCR engine finds (box + margin, in any of the frame's `renderings`) in every frame /
    slice, read the frame again and blank what now reads (up to `BLANK_PASSES` times: a word next to a stronger
    one is often found only once that one is gone), then read it a last time.

    Returns the cleaned image, the blanked regions [[frame, x0, y0, x1, y1], ...] and the number of words
    that still read in the cleaned frames (the image must then be left out).
    """
    pixels = image.pixels.copy()
    frames = pixels if pixels.ndim == 3 else pixels[None]  # [N, H, W], a view on `pixels`
    regions: list[list[int]] = []
    left = 0
    for i, frame in enumerate(frames):
        dark = frame.max() if image.photometric == "MONOCHROME1" else frame.min()
        h, w = frame.shape
        for _ in range(BLANK_PASSES):
            words = _words(image, frame)
            if not words:
                break
            for x0, y0, x1, y1, _ in words:
                m = max(3, int(round(BLANK_MARGIN * (y1 - y0))))
                box = [max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)]
                frame[box[1]:box[3], box[0]:box[2]] = dark
                regions.append([i, *box])
        else:
            left += len(_words(image, frame))
    return replace(image, pixels=pixels), regions, left
