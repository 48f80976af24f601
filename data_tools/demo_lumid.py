"""LUMID-mini: pretraining shards built from the real images that installed packages ship.

    python -m data_tools.make_demo lumid --out demo_data/lumid [--size 128] [--holdout holdout.json]

Sources (nothing is downloaded): pydicom's test files and the `pydicom-data` package (CR chest
X-rays incl. MONOCHROME1, CT, MR, US, NM, compressed syntaxes, multi-frame; many deliberately broken
files, which end up in the manifest as skipped / failed), nibabel's example NIfTI volumes (MR / fMRI)
and nilearn's MNI152 T1 and tissue templates. Volumes are cut in all three planes. The build runs
through `data_tools.build_shards` itself, so the demo exercises the real tool.

`--holdout FILE` (written by `python -m benchmarks.holdout`, {task: [test files]}) leaves out every source file
that shares a content key (bytes, decoded pixels, SOP instance or series UID; `medssl.data.holdout`) with a
task's test files. `OUT/pool.json` records every source file used with its content keys and every file held
out with the reason, so that a table can check a backbone's pool against its test sets by content.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from data_tools import build_shards

NIBABEL_FILES = ("anatomical.nii", "example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz",
                 "reoriented_anat_moved.nii")
NILEARN_FILES = ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                 "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                 "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")


def demo_sources() -> list[dict[str, Any]]:
    """Source specs for the shipped data that is installed; raises if none of it is."""
    specs: list[dict[str, Any]] = []
    try:
        import pydicom.data

        test_files = Path(pydicom.data.__file__).parent / "test_files"
        if test_files.is_dir():
            specs.append({"name": "pydicom-testdata", "path": str(test_files)})
    except ImportError:
        pass
    try:
        import data_store  # the `pydicom-data` package

        store = Path(data_store.__file__).parent / "data"
        if store.is_dir():
            specs.append({"name": "pydicom-data", "path": str(store)})
    except ImportError:
        pass
    try:
        from nibabel.testing import data_path

        specs += [{"name": "nibabel-testdata", "path": str(Path(data_path) / f), "modality": "MR",
                   "body_part": "BRAIN"} for f in NIBABEL_FILES if (Path(data_path) / f).is_file()]
    except ImportError:
        pass
    try:
        import nilearn.datasets

        folder = Path(nilearn.datasets.__file__).parent / "data"
        specs += [{"name": "nilearn-mni152", "path": str(folder / f), "modality": "MR", "body_part": "BRAIN"}
                  for f in NILEARN_FILES if (folder / f).is_file()]
    except ImportError:
        pass
    if not specs:
        raise FileNotFoundError("no shipped images found: install medssl[dicom,demo] "
                                "(pydicom, pydicom-data, nibabel, nilearn)")
    for spec in specs:
        spec.setdefault("modality", None)
        spec.setdefault("body_part", None)
    return specs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `make_demo lumid`: the build options of `build_shards`, with demo defaults."""
    parser.add_argument("--out", default="demo_data/lumid", help="output folder (default demo_data/lumid)")
    parser.add_argument("--packages", nargs="+", default=[], metavar="NAME",
                        help="add the pool material of these fetched packages (python -m data_tools.package_data)")
    parser.add_argument("--packages-root", default="demo_data/packages", help="their folder (package_data --out)")
    parser.add_argument("--holdout", help="JSON {task: [test files]} (python -m benchmarks.holdout): files that "
                                          "share content with any of them stay out of the pool")
    build_shards.add_build_arguments(parser)
    parser.set_defaults(size=128, axes="all", ct_windows="wide=-1000:1000,soft=40/400", salt="medssl-demo",
                        min_size=24, min_volume_slices=8, samples_per_shard=500, workers=2, func=run)


def pool_sources(specs: list[dict[str, Any]], holdout: dict[str, list[str]] | None
                 ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One source spec per file under `specs`, without the files that share content with a held-out test file.

    Returns:
        (file specs for `build_shards`, {path: reason} of the files held out).
    """
    from data_tools.shards_build.plan import discover
    from medssl.data.holdout import content_keys, held_out_sources

    files = [{"name": f["source"], "source": f["source"], "path": f["path"], "modality": f["modality"],
              "body_part": f["body_part"]} for f in discover(specs)]
    tests: dict[str, list[str]] = {}
    for task, paths in sorted((holdout or {}).items()):
        for path in paths:
            tests[f"{path} (test file of {task})"] = content_keys(path)
    return held_out_sources(files, tests)


def run(args: argparse.Namespace) -> int:
    """Build LUMID-mini and print the summary; returns the exit code."""
    from data_tools.package_data import pool_specs
    from medssl.data.holdout import write_pool_record

    holdout = json.loads(Path(args.holdout).read_text()) if args.holdout else None
    sources = demo_sources() + pool_specs(args.packages, args.packages_root)
    specs, dropped = pool_sources(sources, holdout)
    print("LUMID-mini sources: " + ", ".join(sorted({s["name"] for s in specs})))
    if holdout is not None:
        print(f"held out (test images of {', '.join(sorted(holdout))}): {len(dropped)} source files")
    code = build_shards.run_build(specs, args)
    if not args.part:  # the build wrote pool.json; add what was held out and why
        write_pool_record(args.out, dropped)
    return code
