"""Convert public mammography releases (CBIS-DDSM, INbreast, VinDr-Mammo) to the MedMask seed COCO layout.

    python -m data_tools.coco_tools from-cbis-ddsm CBIS-DDSM/ --out DATA_ROOT/ddsm
    python -m data_tools.coco_tools from-inbreast "INbreast Release 1.0/" --out DATA_ROOT/inbreast
    python -m data_tools.coco_tools from-vindr vindr-mammo/1.0.0/ --out DATA_ROOT/vindr

Each release is first read into :class:`Case` records (one per mammogram: patient, release split, DICOM,
findings); :func:`convert` then does the rest the same way for all three: splits by patient, DICOM ->
16-bit PNG through ``medssl.data.imaging`` (modality LUT, VOI LUT / window, MONOCHROME1), boxes from
the release's annotations (CBIS-DDSM: connected components of the ROI masks), an optional maximum size
with boxes scaled alike, ``manifest.jsonl`` (one line per case: converted / skipped + why), resume after
a kill, ``annotations/instances_{train,val,test}.json`` and ``coco_layout.validate`` at the end.
Modules: ``cases`` (records, options, splits by patient), ``cbis_ddsm`` / ``inbreast`` / ``vindr`` (one
reader per release), ``write`` (one case to PNG + manifest record, COCO files, resume helpers).

Defaults follow MedMask's malignant-lesion sets: masses only; a mass is a positive (a box) when it is
MALIGNANT (CBIS-DDSM pathology) or its BI-RADS is 4, 4a, 4b, 4c, 5 or 6 (INbreast image BI-RADS,
VinDr-Mammo finding BI-RADS); images whose masses are all benign are kept without boxes; images with no
mass at all ("normals") are left out unless ``--include-normals``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from data_tools.coco_layout import validate
from data_tools.mammo_releases.cases import KINDS, Case, Finding, Options, Skip, assign_splits
from data_tools.mammo_releases.cbis_ddsm import cbis_ddsm_cases, roi_boxes
from data_tools.mammo_releases.inbreast import inbreast_cases, inbreast_rois
from data_tools.mammo_releases.vindr import vindr_cases
from data_tools.mammo_releases.write import check_options, convert_case, trim_partial_line, write_coco, write_registry
from data_tools.shards_build.report import MANIFEST, read_manifest

__all__ = ["RELEASES", "Case", "Finding", "Options", "Skip", "add_arguments", "assign_splits", "cbis_ddsm_cases",
           "convert", "inbreast_cases", "inbreast_rois", "roi_boxes", "run", "vindr_cases"]

RELEASES = ("cbis-ddsm", "inbreast", "vindr")
BIRADS_SUSPICIOUS = ("4", "4a", "4b", "4c", "5", "6")
DEFAULT_POSITIVE = {"cbis-ddsm": ("MALIGNANT",), "inbreast": BIRADS_SUSPICIOUS, "vindr": BIRADS_SUSPICIOUS}
READERS = {"cbis-ddsm": cbis_ddsm_cases, "inbreast": inbreast_cases, "vindr": vindr_cases}


def convert(release: str, src: str | Path, out: str | Path, opts: Options, *, progress: bool = True
            ) -> dict[str, Any]:
    """Convert a downloaded release to ``out`` (DATA_ROOT/NAME); resumable; returns a summary.

    Cases already in ``out/manifest.jsonl`` are not redone (delete a line to retry that case). Bad or
    missing files skip their case with the reason in the manifest. Ends with ``coco_layout.validate``.
    """
    from tqdm import tqdm

    if release not in READERS:
        raise ValueError(f"release must be one of {RELEASES}, got {release!r}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"release folder not found: {src}")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("images/*/.*.tmp"):  # a PNG being written when a run was killed
        stale.unlink()
    if opts.positive is None:
        opts = replace(opts, positive=DEFAULT_POSITIVE[release])
    check_options(out, json.loads(json.dumps({"release": release, **asdict(opts)})))
    cases = READERS[release](src, opts)
    splits = assign_splits(cases, opts)
    trim_partial_line(out / MANIFEST)
    done = {r["case"] for r in read_manifest(out)}
    todo = [c for c in cases if c.key not in done]
    with open(out / MANIFEST, "a", buffering=1) as manifest, \
            tqdm(total=len(cases), initial=len(cases) - len(todo), unit="image", disable=not progress,
                 dynamic_ncols=True, mininterval=1.0, desc=release) as bar:
        for case in todo:
            split, split_note = splits[case.key]
            head = {"case": case.key, "patient": case.patient, "split": split, "source": case.image}
            try:
                rec = {**head, **convert_case(case, split, out, opts)}
                if split_note:
                    rec["notes"].append(split_note)
            except Skip as e:
                rec = {**head, "status": "skipped", "reason": str(e)}
            except (OSError, ValueError, MemoryError) as e:  # an unexpected bad file: record it and go on
                rec = {**head, "status": "skipped", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
            manifest.write(json.dumps(rec, sort_keys=True) + "\n")
            bar.update(1)
    records = [r for r in read_manifest(out) if r["case"] in splits]
    counts = write_coco(out, records, opts, release)
    write_registry(out)
    report = validate(out)
    return {"counts": counts, "converted": sum(r["status"] == "converted" for r in records),
            "skipped": Counter(r["reason"] for r in records if r["status"] == "skipped"),
            "validate": report}


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser, release: str) -> None:
    """Options of one ``from-<release>`` subcommand."""
    p.add_argument("src", help="the downloaded release folder")
    p.add_argument("--out", required=True, help="DATA_ROOT/NAME folder to write (e.g. DATA_ROOT/ddsm)")
    p.add_argument("--kinds", choices=("mass", "calcification", "both"), default="mass",
                   help="findings that become boxes (default mass)")
    p.add_argument("--positive", default=",".join(DEFAULT_POSITIVE[release]),
                   help="comma-separated labels that make a finding a box: CBIS-DDSM pathology "
                        "(MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK), else BI-RADS (1..6, 4a..4c); "
                        f"default {','.join(DEFAULT_POSITIVE[release])} (MedMask's malignant lesions)")
    p.add_argument("--drop-negatives", action="store_true",
                   help="leave out images whose findings are all non-positive (default: kept without boxes)")
    p.add_argument("--include-normals", action="store_true",
                   help="keep images without any finding of the chosen kinds (as images without boxes)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training patients moved to val")
    if release == "inbreast":
        p.add_argument("--test-fraction", type=float, default=0.2, help="patients for test (INbreast has no split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient draws")
    p.add_argument("--max-size", type=int, default=None, help="longest side in pixels (boxes scaled alike)")
    p.add_argument("--min-box", type=float, default=8.0, help="smallest box side in source pixels (point ROIs)")
    p.add_argument("--no-progress", action="store_true")


def run(release: str, args: argparse.Namespace) -> int:
    """Run one converter from parsed arguments; prints the counts and the validation; 0 when valid."""
    kinds = KINDS if args.kinds == "both" else (args.kinds,)
    positive = tuple(s for s in args.positive.split(",") if s.strip())
    try:
        opts = Options(kinds=kinds, positive=positive, keep_negatives=not args.drop_negatives,
                       include_normals=args.include_normals, val_fraction=args.val_fraction,
                       test_fraction=getattr(args, "test_fraction", 0.0), seed=args.seed, max_size=args.max_size,
                       min_box=args.min_box)
        summary = convert(release, args.src, args.out, opts, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, n in summary["counts"].items():
        print(f"instances_{split}.json: {n['images']} images, {n['annotations']} boxes")
    print(f"{summary['converted']} converted, {sum(summary['skipped'].values())} skipped "
          f"(reasons in {Path(args.out) / MANIFEST})")
    kinds: Counter[str] = Counter()
    for reason, n in summary["skipped"].items():  # grouped with names, numbers and references blanked
        kinds[re.sub(r"\d+", "N", re.sub(r"'[^']*'|\([^)]*\)|/\S+", "...", reason))] += n
    for reason, n in kinds.most_common(10):
        print(f"  {n:5d}  {reason}")
    report = summary["validate"]
    for e in report.errors:
        print(f"error: {e}")
    print(f"validate: {'OK' if report.ok else 'FAILED'} ({len(report.errors)} errors, {len(report.warnings)} warnings)")
    if report.ok:
        from medssl.data.coco import registered_datasets

        out = Path(args.out)
        extra = "" if out.name in registered_datasets() else f" --set data.registry={out / 'registry.yaml'}"
        print(f"train: python recipes/medmask_detect.py --dataset {out.name} --data-root {out.parent}{extra}")
    return 0 if report.ok else 1
