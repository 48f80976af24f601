"""INbreast: ``AllDICOMs``, the OsiriX plist ROI files of ``AllXML`` and ``INbreast.csv`` (BI-RADS)."""

from __future__ import annotations

import plistlib
import re
from collections import Counter
from pathlib import Path

from data_tools.mammo_releases.cases import (
    Case,
    Finding,
    Options,
    Skip,
    find_one,
    norm_label,
    read_table,
    require_columns,
)

INBREAST_NAME = re.compile(r"(?i)^(\d+)_([0-9a-f]+)_MG_([LR])_([A-Z]+)_ANON\.dcm$")
INBREAST_KIND = {"mass": "mass", "calcification": "calcification", "calcifications": "calcification",
                 "cluster": "calcification"}


def inbreast_rois(xml_path: Path) -> list[tuple[str, list[tuple[float, float]]]]:
    """(name, [(x, y), ...]) of every ROI of an INbreast OsiriX plist XML (``Images[].ROIs[].Point_px``)."""
    try:
        with xml_path.open("rb") as fh:
            plist = plistlib.load(fh)
    except Exception as e:  # noqa: BLE001 - plistlib / expat raise several types for broken files
        raise Skip(f"unreadable ROI XML {xml_path.name} ({type(e).__name__}: {str(e)[:80]})") from e
    out = []
    for image in plist.get("Images", []) if isinstance(plist, dict) else []:
        for roi in image.get("ROIs", []):
            pts = []
            for s in roi.get("Point_px", []):
                nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(s))
                if len(nums) >= 2:
                    pts.append((float(nums[0]), float(nums[1])))
            out.append((str(roi.get("Name", "")).strip(), pts))
    return out


def inbreast_cases(src: str | Path, opts: Options) -> list[Case]:
    """Cases of an INbreast release: ``AllDICOMs/*.dcm``, ``AllXML/<id>.xml`` and ``INbreast.csv``.

    The patient is the hash in the file name (``<id>_<patient hash>_MG_<L|R>_<view>_ANON.dcm``; the CSV's
    patient column is blanked in the public release); every finding takes the image's BI-RADS.
    """
    src = Path(src)
    table = find_one(src, "INbreast.csv")
    rows = read_table(table, delimiter=";")
    require_columns(rows, ("File Name", "Bi-Rads"), table)
    birads = {r["File Name"]: norm_label(r["Bi-Rads"]) for r in rows if r["File Name"]}
    xmls = {p.stem: p for p in src.rglob("*.xml")}
    cases = []
    for dcm in sorted(src.rglob("*.dcm")):
        m = INBREAST_NAME.match(dcm.name)
        if m is None:
            cases.append(Case(dcm.stem, dcm.stem, str(dcm), None,
                              problem="name is not <id>_<hash>_MG_<L|R>_<view>_ANON.dcm"))
            continue
        image_id, patient = m.group(1), m.group(2)
        case = Case(image_id, patient, str(dcm), None)
        cases.append(case)
        if image_id not in birads:
            case.problem = f"no row for {image_id} in {table.name}"
            continue
        if image_id not in xmls:
            continue  # no ROI file: no findings
        try:
            rois = inbreast_rois(xmls[image_id])
        except Skip as e:
            case.problem = str(e)
            continue
        other = Counter()
        for name, pts in rois:
            kind = INBREAST_KIND.get(name.lower())
            if kind is None or not pts:
                other[name or "unnamed"] += 1
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            case.findings.append(Finding(kind, birads[image_id], opts.is_positive(birads[image_id]),
                                         box=(min(xs), min(ys), max(xs), max(ys)), ref=f"ROI {name!r}"))
        if other:
            case.notes.append(f"ROIs not used: {dict(other)}")
    return cases
