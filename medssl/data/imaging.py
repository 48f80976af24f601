"""Read medical images (DICOM, NIfTI, PNG/JPEG/TIFF) and normalise their intensities for pretraining.

The pipeline for one input is: read -> `ImageData` (float32 in physical units: CT in Hounsfield units
after the modality LUT, other modalities in stored/rescaled units, colour already converted to grey)
-> `normalise` (fixed CT windows, MR percentile clip of non-zero voxels, X-ray VOI window, MONOCHROME1
inversion; result in [0, 1]) -> `iter_slices` (2-D planes of volumes, square pixels along any axis)
-> `resize_square` -> `to_dtype` (uint8 / uint16).

Every reader raises `UnreadableImage(path, reason)` with a one-line reason for input it cannot use.

Example:
    >>> img = read_image("CT_small.dcm")  # doctest: +SKIP
    >>> x01 = normalise(img, window=Window("soft", 40 - 200, 40 + 200))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CT_MODALITIES = {"CT"}
XRAY_MODALITIES = {"CR", "DX", "MG", "RG", "XA", "RF", "PX", "IO"}
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}
NON_IMAGE_MODALITIES = {"SR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "KO", "REG",
                        "ECG", "HD", "AU", "DOC", "PLAN", "FID", "RWV"}
PERCENTILES = (0.5, 99.5)


class UnreadableImage(ValueError):
    """An input that cannot become a training image; `reason` is one line for the manifest.

    Args:
        path: the file (or series description) concerned.
        reason: short explanation, e.g. "needs codec for JPEG 2000", "no pixel data (SR)".
        skip: True when the input is valid but not an image we use (status "skipped" rather than
            "failed" in the manifest).
    """

    def __init__(self, path: str | Path, reason: str, skip: bool = False):
        self.path = str(path)
        self.reason = reason
        self.skip = skip
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Window:
    """An intensity window [low, high] mapped linearly to [0, 1]; `name` is recorded in the metadata."""

    name: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise ValueError(f"window {self.name!r}: need finite low < high, got [{self.low}, {self.high}]")

    @classmethod
    def from_level_width(cls, name: str, level: float, width: float) -> Window:
        """Window from a radiology level (centre) and width, e.g. soft tissue 40/400 -> [-160, 240]."""
        return cls(name, level - width / 2.0, level + width / 2.0)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "low": float(self.low), "high": float(self.high)}


@dataclass
class ImageData:
    """One decoded input in physical units.

    Attributes:
        pixels: float32 array, [H, W] for a single image or [N, H, W] for frames / slices.
        spacing: millimetres per axis of `pixels` (None where unknown).
        modality: DICOM modality code ("CT", "MR", "CR", ...), or a hint for NIfTI / raster files.
        is_volume: True when axis 0 of a 3-D `pixels` is a spatial axis (series, NIfTI, enhanced
            multi-frame CT / MR / PET with per-frame positions), so the volume may be sliced along any
            axis; False for independent frames (cine, other multi-frame files).
        photometric: DICOM photometric interpretation after colour conversion.
        voi: the file's own VOI window(s) (DICOM WindowCenter/Width), for X-ray style inputs.
        voi_lut: a VOI LUT already applied to `pixels` (values then in [0, 1]).
        body_part: BodyPartExamined or a hint.
        uids: clear-text study / series / instance UIDs (hash them before writing anything).
        source_format: "dicom", "nifti" or "raster".
        bits: stored bits for integer inputs (raster 8/16), else None.
        direction: for a volume, the unit vector (patient LPS, as DICOM) along which each array axis
            runs, one row per axis of `pixels`; None where unknown.
        positions: for a volume stacked from positioned planes, each plane's position along the slice
            normal (mm), in array order (descending); None where unknown. Gaps show here.
    """

    pixels: np.ndarray
    spacing: tuple[float | None, ...]
    modality: str
    is_volume: bool = False
    photometric: str = "MONOCHROME2"
    voi: list[Window] = field(default_factory=list)
    voi_lut: bool = False
    body_part: str | None = None
    uids: dict[str, Any] = field(default_factory=dict)
    source_format: str = "dicom"
    bits: int | None = None
    direction: list[list[float]] | None = None
    positions: list[float] | None = None


def check_pixels(path: str | Path, pixels: np.ndarray) -> None:
    """Raise `UnreadableImage` for zero-sized, non-finite or constant images."""
    if pixels.size == 0 or min(pixels.shape) == 0:
        raise UnreadableImage(path, f"zero-sized image {tuple(pixels.shape)}", skip=True)
    if not np.isfinite(pixels).all():
        raise UnreadableImage(path, "NaN/inf voxels")
    if float(pixels.max()) == float(pixels.min()):
        raise UnreadableImage(path, f"constant image (all {float(pixels.min()):g})", skip=True)


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an [..., 3] array (ultrasound and secondary captures are often RGB)."""
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # [..., H, W]


# ----------------------------------------------------------------------------------------- DICOM


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    return float(value)


def _functional_attr(ds: Any, group: str, name: str) -> Any:
    """An attribute from the top level, else the shared / first per-frame functional group (enhanced)."""
    if name in ds:
        return ds[name].value
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if seq and group in seq[0] and len(seq[0][group].value) and name in seq[0][group].value[0]:
            return seq[0][group].value[0][name].value
    return None


def _pixel_spacing(ds: Any) -> tuple[float | None, float | None]:
    sp = _functional_attr(ds, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        r, c = float(sp[0]), float(sp[1])
    except (TypeError, ValueError, IndexError):
        return None, None
    return (r if r > 0 else None), (c if c > 0 else None)


def _dicom_windows(ds: Any) -> list[Window]:
    centre = _functional_attr(ds, "FrameVOILUTSequence", "WindowCenter")
    width = _functional_attr(ds, "FrameVOILUTSequence", "WindowWidth")
    c, w = _first(centre), _first(width)
    if c is None or w is None or w <= 1:
        return []
    # DICOM linear window: c - 0.5 - (w - 1) / 2 maps to the bottom, c - 0.5 + (w - 1) / 2 to the top
    return [Window("voi", c - 0.5 - (w - 1) / 2.0, c - 0.5 + (w - 1) / 2.0)]


def _modality_lut(arr: np.ndarray, ds: Any, apply_modality_lut: Any) -> np.ndarray:
    """Stored values to modality units: top-level LUT / rescale, else the enhanced functional groups."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    slope = _first(_functional_attr(ds, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(_functional_attr(ds, "PixelValueTransformationSequence", "RescaleIntercept"))
    out = arr.astype(np.float32)
    return out * np.float32(1.0 if slope is None else slope) + np.float32(intercept or 0.0)


def _frame_order(ds: Any) -> tuple[list[int], float | None, list[float], list[float]] | None:
    """Spatial order of the frames of an enhanced multi-frame file (descending position along the
    slice normal), the median gap in mm, the sorted positions and the orientation, or None when the
    frames carry no distinct positions."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    ori = _functional_attr(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if not frames or ori is None or len(ori) != 6:
        return None
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    positions = []
    for frame in frames:
        seq = frame.get("PlanePositionSequence")
        if not seq or "ImagePositionPatient" not in seq[0] or len(seq[0].ImagePositionPatient) != 3:
            return None
        positions.append(float(np.dot(normal, np.asarray(seq[0].ImagePositionPatient, float))))
    if len(set(positions)) != len(positions):  # e.g. several echoes / time points per position
        return None
    order = sorted(range(len(positions)), key=lambda i: -positions[i])
    gaps = np.abs(np.diff(np.asarray(positions)[order]))
    return order, (float(np.median(gaps)) if len(gaps) else None), [positions[i] for i in order], list(ori)


def _decode_pixels(path: str | Path, ds: Any) -> np.ndarray:
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    try:
        return ds.pixel_array
    except NotImplementedError as exc:
        raise UnreadableImage(path, f"needs codec for {ts_name}") from exc
    except (RuntimeError, ValueError, AttributeError, EOFError, OSError, KeyError, IndexError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "decoder" in msg or "plugin" in msg or "codec" in msg:
            raise UnreadableImage(path, f"needs codec for {ts_name}") from exc
        if "less than expected" in msg:
            raise UnreadableImage(path, "truncated pixel data") from exc
        raise UnreadableImage(path, f"cannot decode pixel data ({ts_name}): {msg[:120]}") from exc


def read_dicom_header(path: str | Path) -> Any:
    """Read a DICOM dataset (pixel data included, decoded later); raises `UnreadableImage`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        try:  # files without a preamble / meta header are still readable when forced
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # noqa: BLE001 - anything here means "not DICOM"
            raise UnreadableImage(path, "not a DICOM file") from exc
        if "SOPClassUID" not in ds and "PixelData" not in ds:
            raise UnreadableImage(path, "not a DICOM file") from None
        if "TransferSyntaxUID" not in ds.file_meta:  # no meta header: use the encoding that was read
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                              pydicom.uid.ExplicitVRLittleEndian if little else
                                              pydicom.uid.ExplicitVRBigEndian)
        return ds
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UnreadableImage(path, f"truncated or corrupt DICOM ({type(exc).__name__})") from exc


def check_dicom_image(path: str | Path, ds: Any) -> None:
    """Raise `UnreadableImage` for a dataset that holds no image (DICOMDIR, SR / RT / SEG objects, no pixel
    data, zero size); reads the header only."""
    modality = str(ds.get("Modality", "OT") or "OT").upper()
    if "DirectoryRecordSequence" in ds:
        raise UnreadableImage(path, "DICOMDIR (a directory index, no image)", skip=True)
    if modality in NON_IMAGE_MODALITIES:
        raise UnreadableImage(path, f"not an image ({modality} object)", skip=True)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = str(getattr(ds.get("SOPClassUID"), "name", "") or "")
        hint = "; truncated file?" if "Image Storage" in sop else ""
        raise UnreadableImage(path, f"no pixel data ({modality}{hint})", skip=not hint)
    if not ds.get("Rows") or not ds.get("Columns"):
        raise UnreadableImage(path, "zero-sized image (Rows/Columns missing or 0)", skip=True)


def dicom_to_image(path: str | Path, ds: Any) -> ImageData:
    """Decode a read DICOM dataset: modality LUT, colour to grey, VOI LUT / window, spacing, UIDs."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    check_dicom_image(path, ds)
    modality = str(ds.get("Modality", "OT") or "OT").upper()
    arr = _decode_pixels(path, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    voi_lut = False
    if photometric == "PALETTE COLOR":
        arr = rgb_to_grey(apply_color_lut(arr, ds))  # [(N,) H, W]
        photometric = "MONOCHROME2"
    elif arr.ndim == (4 if frames > 1 else 3):  # RGB / YBR (pydicom converts YBR to RGB)
        arr = rgb_to_grey(arr)
        photometric = "MONOCHROME2"
    else:
        arr = _modality_lut(arr, ds, apply_modality_lut)
        if "VOILUTSequence" in ds:
            lut = ds.VOILUTSequence[0]
            bits = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
            arr = np.asarray(apply_voi_lut(arr, ds, prefer_lut=True), np.float32) / float(2**bits - 1)
            voi_lut = True
    arr = np.asarray(arr, dtype=np.float32)
    check_pixels(path, arr)
    row_sp, col_sp = _pixel_spacing(ds)
    spacing: tuple[float | None, ...] = (row_sp, col_sp) if arr.ndim == 2 else (None, row_sp, col_sp)
    is_volume, direction, positions = False, None, None
    order_dz = _frame_order(ds) if arr.ndim == 3 and modality in VOLUME_MODALITIES else None
    if order_dz is not None:  # enhanced CT / MR / PET: frames are planes of one volume
        order, dz, positions, ori = order_dz
        arr, spacing, is_volume = arr[order], (dz, row_sp, col_sp), True  # [Z, H, W]
        direction = series_direction([float(v) for v in ori])
    return ImageData(
        pixels=arr, spacing=spacing, modality=modality, is_volume=is_volume, photometric=photometric,
        voi=_dicom_windows(ds), voi_lut=voi_lut, body_part=str(ds.get("BodyPartExamined", "") or "") or None,
        uids={"study": str(ds.get("StudyInstanceUID", "")), "series": str(ds.get("SeriesInstanceUID", "")),
              "instance": str(ds.get("SOPInstanceUID", ""))},
        source_format="dicom", bits=int(ds.get("BitsStored", 0) or 0) or None, direction=direction,
        positions=positions,
    )


def read_dicom(path: str | Path) -> ImageData:
    """Read one DICOM file (single or multi-frame); frames come back as [N, H, W] (a volume only for
    enhanced CT / MR / PET files whose frames have distinct positions)."""
    return dicom_to_image(path, read_dicom_header(path))


def _slice_position(ds: Any) -> float | None:
    """Position of a slice along its normal (ImagePositionPatient . (row x col direction))."""
    pos, ori = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if pos is None or ori is None or len(pos) != 3 or len(ori) != 6:
        return None
    normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
    return float(np.dot(normal, np.asarray(pos, float)))


def order_series(datasets: Sequence[Any]) -> list[int]:
    """Indices of a series' slices in spatial order (descending position along the slice normal, so
    an axial CT runs head to feet); falls back to InstanceNumber when any position is missing."""
    positions = [_slice_position(ds) for ds in datasets]
    if all(p is not None for p in positions):
        return sorted(range(len(datasets)), key=lambda i: -positions[i])  # type: ignore[operator]
    numbers = [int(ds.get("InstanceNumber", 0) or 0) for ds in datasets]
    return sorted(range(len(datasets)), key=lambda i: numbers[i])


def read_dicom_series(paths: Sequence[str | Path], label: str | None = None) -> ImageData:
    """Read single-frame slices of one series into a volume [Z, H, W] ordered by position.

    Args:
        paths: the slice files (duplicates already removed).
        label: how the series is named in errors (default: the first path).
    """
    label = label or (str(paths[0]) if paths else "empty series")
    if not paths:
        raise UnreadableImage(label, "empty series")
    datasets = [read_dicom_header(p) for p in paths]
    sizes = sorted({(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for ds in datasets})
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sizes[:4])
        raise UnreadableImage(label, f"inconsistent slice sizes in series ({shown})")
    order = order_series(datasets)
    slices = [dicom_to_image(paths[i], datasets[i]) for i in order]
    if any(s.pixels.ndim != 2 for s in slices):
        raise UnreadableImage(label, "series mixes multi-frame and single-frame files")
    volume = np.stack([s.pixels for s in slices])  # [Z, H, W]
    check_pixels(label, volume)
    positions = [_slice_position(datasets[i]) for i in order]
    dz: float | None = None
    if all(p is not None for p in positions) and len(positions) > 1:
        gaps = np.abs(np.diff(np.asarray(positions, dtype=float)))
        dz = float(np.median(gaps)) if np.median(gaps) > 0 else None
    if dz is None:
        dz = _first(datasets[0].get("SpacingBetweenSlices")) or _first(datasets[0].get("SliceThickness"))
    first = slices[0]
    return ImageData(
        pixels=volume, spacing=(dz, *first.spacing), modality=first.modality, is_volume=True,
        photometric=first.photometric, voi=first.voi, voi_lut=first.voi_lut, body_part=first.body_part,
        uids={"study": first.uids["study"], "series": first.uids["series"],
              "instance": [s.uids["instance"] for s in slices]},
        source_format="dicom", bits=first.bits,
    )


# ----------------------------------------------------------------------------------------- NIfTI


def read_nifti(path: str | Path, modality: str | None = None, volume_index: int = 0) -> ImageData:
    """Read a 3-D / 4-D NIfTI (4-D: volume `volume_index`) as [S->I, A->P, R->L] with spacing.

    The data are reoriented to the closest canonical (RAS+) orientation and then arranged so that
    slices along each axis display the usual way (anterior / superior at the top, patient right on
    the left). `modality` defaults to "CT" when the volume holds values below -500 (HU), else "MR".
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        img = nib.as_closest_canonical(img)
        if len(img.shape) < 2:
            raise UnreadableImage(path, f"not an image volume (shape {img.shape})")
        if len(img.shape) > 3:
            if volume_index >= img.shape[3]:
                raise UnreadableImage(path, f"volume_index {volume_index} >= {img.shape[3]} volumes")
            data = np.asarray(img.dataobj[..., volume_index], dtype=np.float32)
        else:
            data = np.asarray(img.dataobj, dtype=np.float32)
    except UnreadableImage:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise UnreadableImage(path, f"unreadable NIfTI ({type(exc).__name__}: {str(exc)[:80]})") from exc
    while data.ndim > 3:  # e.g. [X, Y, Z, 1, 1]
        data = data[..., 0]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = zooms[:2] + [1.0]
    check_pixels(path, data)
    vol = np.ascontiguousarray(data.transpose(2, 1, 0)[::-1, ::-1, ::-1])  # [Z(S->I), Y(A->P), X(R->L)]
    spacing = tuple(z if z > 0 else None for z in zooms[::-1])
    if modality is None:
        modality = "CT" if float(vol.min()) < -500 else "MR"
    cols = np.asarray(img.affine, float)[:3, :3]  # RAS direction (times spacing) of the data axes i, j, k
    norms = np.linalg.norm(cols, axis=0)
    direction = None
    if np.all(norms > 0):
        ras_to_lps = np.array([-1.0, -1.0, 1.0])
        # the array axes run along -k, -j, -i (transposed and flipped above)
        direction = [((-cols[:, c] / norms[c] * ras_to_lps).round(6) + 0.0).tolist() for c in (2, 1, 0)]
    return ImageData(pixels=vol, spacing=spacing, modality=modality.upper(), is_volume=vol.shape[0] > 1,
                     source_format="nifti", direction=direction)


# ---------------------------------------------------------------------------------------- raster


def read_raster(path: str | Path, modality: str | None = None) -> ImageData:
    """Read PNG / JPEG / TIFF / BMP (8 or 16 bit, grey, palette or RGB) as a grey [H, W] image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "HSV", "1"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(path, f"unreadable image file ({str(exc).splitlines()[0][:80]})") from exc
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # I;16B TIFFs come big-endian
    bits = {(1, "u"): 8, (2, "u"): 16, (2, "i"): 16, (4, "i"): 16}.get((arr.dtype.itemsize, arr.dtype.kind))
    pixels = rgb_to_grey(arr) if arr.ndim == 3 else arr.astype(np.float32)
    check_pixels(path, pixels)
    if bits == 16 and float(pixels.max()) <= 255:  # PIL reads some 8-bit TIFFs as I;16
        bits = 8
    return ImageData(pixels=pixels, spacing=(None, None), modality=(modality or "OT").upper(),
                     source_format="raster", bits=bits)


def read_image(path: str | Path, modality: str | None = None) -> ImageData:
    """Read any supported single file by its suffix (DICOM otherwise); raises `UnreadableImage`."""
    name = str(path).lower()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path, modality)
    if name.endswith(RASTER_SUFFIXES):
        return read_raster(path, modality)
    return read_dicom(path)


# ------------------------------------------------------------------------------------ geometry


def series_direction(orientation: Sequence[float]) -> list[list[float]]:
    """Axis directions (patient LPS) of a [Z, H, W] volume built from slices with ImageOrientationPatient
    `orientation`, stacked by descending position along the slice normal (as `order_series`).

    Axis 0 runs against the normal (row x column cosines), axis 1 (rows) along the column cosines
    `orientation[3:]`, axis 2 (columns) along the row cosines `orientation[:3]`.

    Example:
        >>> series_direction([1, 0, 0, 0, 1, 0])  # axial: head to feet, anterior to posterior, right to left
        [[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """
    if len(orientation) != 6:
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {list(orientation)}")
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    return [(v.round(6) + 0.0).tolist() for v in (-normal, col, row)]  # + 0.0: no -0.0


def orientation_code(direction: Sequence[Sequence[float]] | None) -> str | None:
    """Letters of the patient direction each array axis runs towards (its largest LPS component), e.g.
    "IPL" for an axial volume stored head to feet, front to back, right to left; None when unknown."""
    if direction is None:
        return None
    letters = (("R", "L"), ("A", "P"), ("I", "S"))  # negative, positive along x, y, z of LPS
    out = ""
    for vec in direction:
        v = np.asarray(vec, float)
        k = int(np.argmax(np.abs(v)))
        out += letters[k][int(v[k] > 0)]
    return out


def resample_volume(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                    mode: str = "trilinear") -> np.ndarray:
    """Trilinear (or nearest) resampling of a [D, H, W] volume from `spacing` to exactly `target` mm per axis.

    An axis of n voxels becomes floor(n * spacing / target) voxels; output voxel i lies at
    (i + 0.5) * target mm from the outer edge of the first input voxel (the field of view keeps its
    origin; nothing is extrapolated). Values are interpolated inside the volume only, so the input
    must be one contiguous, evenly spaced volume (a series with a gap is split before).
    No antialiasing filter is applied when shrinking. `mode="nearest"` (label maps) gives each output voxel
    the value of the input voxel whose centre is nearest, on the same grid.
    """
    import torch
    import torch.nn.functional as F

    if mode not in ("trilinear", "nearest"):
        raise ValueError(f"mode must be trilinear or nearest, got {mode!r}")
    if volume.ndim != 3 or len(spacing) != 3 or len(target) != 3:
        raise ValueError(f"need a 3-D volume and 3 spacings, got shape {volume.shape}, {spacing} -> {target}")
    if any(s is None or not s > 0 for s in spacing) or any(not t > 0 for t in target):
        raise ValueError(f"spacings must be positive, got {list(spacing)} -> {list(target)}")
    scale = [float(s) / float(t) for s, t in zip(spacing, target)]
    size = [math.floor(n * f + 1e-6) for n, f in zip(volume.shape, scale)]
    if min(size) < 1:
        raise ValueError(f"volume {volume.shape} at {list(spacing)} mm is thinner than one {list(target)} mm voxel")
    if all(math.isclose(f, 1.0, rel_tol=1e-9) for f in scale):
        return volume.astype(np.float32, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]  # [1, 1, D, H, W]
    # the given scale (not the rounded sizes) maps the coordinates, so the spacing is exactly `target` (up to the
    # < 1e-6 relative nudge that keeps torch's floor(n * scale) from losing a voxel to float rounding)
    scale = [max(f, m / n) for f, m, n in zip(scale, size, volume.shape)]
    kw: dict = {"mode": "nearest-exact"} if mode == "nearest" else {"mode": "trilinear", "align_corners": False}
    out = F.interpolate(x, scale_factor=scale, recompute_scale_factor=False, **kw)
    return out[0, 0].numpy()  # [D', H', W']


# ------------------------------------------------------------------------------------ intensities


def apply_window(pixels: np.ndarray, window: Window) -> np.ndarray:
    """Map [window.low, window.high] linearly to [0, 1], clipping outside."""
    out = (pixels.astype(np.float32) - window.low) / (window.high - window.low)
    return np.clip(out, 0.0, 1.0)


def percentile_window(pixels: np.ndarray, nonzero: bool, q: tuple[float, float] = PERCENTILES,
                      name: str = "percentile") -> Window:
    """A window between the q[0] and q[1] percentiles (of the non-zero voxels when `nonzero`)."""
    values = pixels[pixels != 0] if nonzero else pixels.reshape(-1)
    if values.size == 0:
        values = pixels.reshape(-1)
    lo, hi = (float(v) for v in np.percentile(values, q))
    if hi <= lo:  # almost constant: fall back to the full range
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    return Window(name, lo, hi)


def normalise(img: ImageData, window: Window | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Intensities to [0, 1] float32 by modality; returns the array and a record of what was done.

    - CT: the fixed HU `window` (required; never per-image min-max).
    - MR / PT / NM / unknown volumes: 0.5-99.5 percentile clip of the non-zero voxels; zeros stay 0.
    - X-ray (CR, DX, MG, ...): an applied VOI LUT, else the file's VOI window, else percentile clip.
    - Other (US, OT): 8-bit data as is (/255), the VOI window if present, else percentile clip.
    - PNG / JPEG / TIFF: 8-bit as is, else percentile clip (the HU scale of a CT is lost in them).
    MONOCHROME1 images are inverted last, so bone is bright.
    """
    px = img.pixels
    if img.source_format == "raster" and window is None:  # already display-mapped pictures
        if img.bits == 8 and float(px.min()) >= 0 and float(px.max()) <= 255:
            return (px / 255.0).astype(np.float32), {"kind": "identity8", "name": "8bit", "low": 0.0,
                                                     "high": 255.0}
        w = percentile_window(px, nonzero=False)
        return apply_window(px, w), {"kind": "percentile", **w.as_dict()}
    if img.modality in CT_MODALITIES:
        if window is None:
            raise ValueError("CT needs an explicit HU window (e.g. Window('wide', -1000, 1000))")
        out, record = apply_window(px, window), {"kind": "hu", **window.as_dict()}
    elif window is not None:
        out, record = apply_window(px, window), {"kind": "fixed", **window.as_dict()}
    elif img.voi_lut:
        out, record = np.clip(px, 0.0, 1.0), {"kind": "voi_lut"}
    elif img.modality in XRAY_MODALITIES or (img.voi and img.modality not in VOLUME_MODALITIES):
        if img.voi:
            out, record = apply_window(px, img.voi[0]), {"kind": "voi", **img.voi[0].as_dict()}
        else:
            w = percentile_window(px, nonzero=False)
            out, record = apply_window(px, w), {"kind": "percentile", **w.as_dict()}
    elif img.modality in VOLUME_MODALITIES or img.source_format == "nifti":
        w = percentile_window(px, nonzero=True)
        out = np.where(px == 0, 0.0, apply_window(px, w)).astype(np.float32)
        record = {"kind": "percentile_nonzero", **w.as_dict()}
    elif img.bits == 8 and float(px.min()) >= 0 and float(px.max()) <= 255:
        out, record = px / 255.0, {"kind": "identity8", "name": "8bit", "low": 0.0, "high": 255.0}
    else:
        w = percentile_window(px, nonzero=False)
        out, record = apply_window(px, w), {"kind": "percentile", **w.as_dict()}
    if img.photometric == "MONOCHROME1":
        out = 1.0 - out
        record["inverted"] = True
    return out.astype(np.float32), record


# ------------------------------------------------------------------------------ slicing / resizing


def resize2d(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of a 2-D float array to [height, width]."""
    from PIL import Image

    if image.shape == (height, width):
        return image.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


@dataclass
class Slice:
    """One 2-D plane of a volume: `pixels` [H, W] with square pixels of `spacing` mm (or None)."""

    axis: int
    index: int
    pixels: np.ndarray
    spacing: float | None


def iter_slices(volume: np.ndarray, spacing: Sequence[float | None] | None = None, axis: int = 0,
                step: int = 1, min_foreground: float = 0.0, isotropic: bool = True,
                background: float | None = None) -> Iterator[Slice]:
    """Yield 2-D planes of a [D0, D1, D2] volume along `axis`, resampled to square pixels.

    Args:
        volume: 3-D array (any dtype; float32 [0, 1] after `normalise` is typical).
        spacing: mm per axis; planes whose two in-plane spacings differ are resampled so that a
            pixel is square (the finer spacing is kept). None or missing values: no resampling.
        axis: 0, 1 or 2, the axis the planes are perpendicular to.
        step: take every `step`-th plane.
        min_foreground: skip planes where less than this fraction of pixels is above `background`.
        isotropic: set False to keep the stored in-plane sampling.
        background: value regarded as empty; default the volume minimum + 1% of its range.

    Example:
        >>> vol = np.zeros((4, 8, 6), np.float32); vol[:, 2:6, 1:5] = 1
        >>> [s.pixels.shape for s in iter_slices(vol, (2.0, 1.0, 1.0), axis=1)][0]
        (8, 6)
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {tuple(volume.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    sp = list(spacing) if spacing is not None else [None, None, None]
    if len(sp) != 3:
        raise ValueError(f"spacing must have 3 values, got {spacing}")
    in_plane = [a for a in range(3) if a != axis]
    sr, sc = sp[in_plane[0]], sp[in_plane[1]]
    if background is None:
        vmin, vmax = float(volume.min()), float(volume.max())
        background = vmin + 0.01 * (vmax - vmin)
    for index in range(0, volume.shape[axis], step):
        plane = np.take(volume, index, axis=axis).astype(np.float32)  # [H, W]
        if min_foreground > 0 and float((plane > background).mean()) < min_foreground:
            continue
        if float(plane.max()) == float(plane.min()):
            continue
        out_sp = sr if sr == sc else None
        if isotropic and sr and sc and not math.isclose(sr, sc, rel_tol=1e-3):
            fine = min(sr, sc)
            h = max(1, round(plane.shape[0] * sr / fine))
            w = max(1, round(plane.shape[1] * sc / fine))
            plane, out_sp = resize2d(plane, h, w), fine  # [h, w] square pixels
        yield Slice(axis=axis, index=index, pixels=plane, spacing=out_sp)


def resize_square(image: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """Resize keeping the aspect ratio, then make it `size` x `size`.

    fit="crop": shorter side to `size`, centre crop of the longer side.
    fit="pad": longer side to `size`, centre pad with zeros.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    h, w = image.shape
    scale = size / (min(h, w) if fit == "crop" else max(h, w))
    if fit == "crop":
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        nh, nw = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
    out = resize2d(image, nh, nw)  # [nh, nw]
    if fit == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return out[top:top + size, left:left + size]
    canvas = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = out
    return canvas


def to_dtype(image01: np.ndarray, dtype: str = "uint8") -> np.ndarray:
    """[0, 1] float to uint8 (0..255) or uint16 (0..65535), rounding to nearest."""
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype must be 'uint8' or 'uint16', got {dtype!r}")
    top = 255.0 if dtype == "uint8" else 65535.0
    return np.rint(np.clip(image01, 0.0, 1.0) * top).astype(dtype)
