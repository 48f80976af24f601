"""Build LUMID WebDataset shards from DICOM files / series, NIfTI volumes and PNG/JPEG/TIFF folders.

    python -m data_tools.build_shards SRC [SRC ...] --out DIR [options]
    python -m data_tools.build_shards --sources data_tools/lumid_sources.yaml --out DIR
    python -m data_tools.build_shards SRC ... --out DIR --part I/N     (one of N parts, on any machine)
    python -m data_tools.build_shards merge DIR                        (after all N parts finished)

Writes `DIR/lumid-NNNNNN.tar` (per sample `KEY.npy` 2-D uint8/uint16 + `KEY.json`, de-identified),
`DIR/_info.json`, `DIR/manifest.jsonl` (one line per input file or series: written / skipped / failed /
duplicate / burned-in, with the reason; a series' slice files left out get lines of their own; it holds
the source paths: keep it private), `DIR/stats.json` and `DIR/contact_<MODALITY>.png`.

`--dims 3` writes whole volumes instead (`KEY.npy` [D, H, W], resampled to `--spacing` mm, isotropic 1.5 by
default; its `.json` records the spacing, the orientation and the source geometry); the same sources,
policies, manifest, resume and `--part`. The loader takes random 3-D crops of them (docs/volumes.md).

Images whose pixels may carry identifiers (BurnedInAnnotation YES; unflagged ultrasound, secondary
captures, photographs, endoscopy, ...) are left out by default; `--burned-in ocr` blanks the text an
offline OCR engine finds instead, `--burned-in keep` writes them unchecked (see
`data_tools.shards_build.burned_in`). The policy runs before anything is written or drawn.

A DICOM series is read slice by slice: an unreadable slice, a second copy of a slice or a slice of
another size is left out (and recorded); a series whose slices leave a gap or are unevenly spaced
is cut into contiguous sub-volumes (recorded as "split"), never resampled across the gap.

A killed run restarted with the same arguments finishes the job: finished shards are kept, the
temporary shard of the killed run is deleted, and inputs already in the manifest are not redone (an
input's manifest line is only written once all its samples are in finished shards). Each part of a
split build resumes the same way in its own folder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from data_tools.shards_build import burned_in, merge
from data_tools.shards_build.build import build, part_dir
from data_tools.shards_build.plan import (
    Config,
    Unit,
    discover,
    hash_id,
    parse_part,
    parse_spacing,
    parse_windows,
    plan_units,
)
from data_tools.shards_build.report import burned_in_line, print_summary
from data_tools.shards_build.worker import process_unit

__all__ = ["Config", "Unit", "build", "discover", "hash_id", "load_sources", "main", "parse_windows", "plan_units",
           "process_unit"]

SALT_FILE = ".salt"
DEFAULT_CT_WINDOWS = "wide=-1000:1000"


def load_sources(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Collections of a sources YAML whose path exists, and the names of those that do not."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--sources: {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("collections") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"--sources: {path} must hold a 'collections:' list")
    found, missing = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
            raise ValueError(f"--sources: {path} collection #{i} needs 'name' and 'path'")
        where = Path(str(entry["path"])).expanduser()
        where = where if where.is_absolute() else path.parent / where  # relative to the YAML file
        spec = {"name": str(entry["name"]), "path": str(where),
                "modality": entry.get("modality"), "body_part": entry.get("body_part")}
        (found if Path(spec["path"]).exists() else missing).append(spec if Path(spec["path"]).exists()
                                                                   else spec["name"])
    return found, missing


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The build options (shared with `data_tools.demo_lumid`)."""
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2,
                        help="2: 2-D planes of SIZE px (default); 3: whole volumes resampled to --spacing, cropped "
                        "at load time (--size, --fit, --axes, --every, --min-foreground then do not apply)")
    parser.add_argument("--spacing", default="1.5", help="--dims 3: voxel spacing in mm, one value (isotropic, "
                        "default 1.5) or D,H,W")
    parser.add_argument("--size", type=int, default=224, help="output side in pixels (default 224)")
    parser.add_argument("--fit", choices=("crop", "pad"), default="crop",
                        help="shorter side to SIZE + centre crop, or longer side + pad (default crop)")
    parser.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8")
    parser.add_argument("--axes", default="0", help="volume slice axes: 0 (acquisition plane), 1, 2, "
                        "comma list or 'all' (default 0)")
    parser.add_argument("--every", type=int, default=1, help="take every k-th slice / frame (default 1)")
    parser.add_argument("--min-foreground", type=float, default=0.05,
                        help="skip slices with less than this fraction of non-background pixels (0.05)")
    parser.add_argument("--ct-windows", default=DEFAULT_CT_WINDOWS,
                        help="CT HU windows, NAME=LOW:HIGH or NAME=LEVEL/WIDTH, comma separated; one "
                        f"sample per window (default {DEFAULT_CT_WINDOWS}; e.g. wide=-1000:1000,soft=40/400)")
    parser.add_argument("--min-volume-slices", type=int, default=8,
                        help="DICOM series / volumes with fewer slices are not resliced (default 8)")
    parser.add_argument("--min-size", type=int, default=32,
                        help="skip images / planes whose shorter side is below this (default 32 px)")
    parser.add_argument("--salt", default=None, help="salt for hashing UIDs (default: a random salt kept "
                        f"in OUT/{SALT_FILE}; keep it private)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker processes (0: none)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--dry-run", action="store_true", help="plan and print counts, write nothing")
    parser.add_argument("--max-units", type=int, default=None, help="stop after N inputs (resume later)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--burned-in", choices=burned_in.POLICIES, default="exclude",
                        help="images that may carry text in their pixels (BurnedInAnnotation YES, or unflagged "
                        "ultrasound, secondary captures, photographs, endoscopy...): exclude them (default), "
                        "ocr: blank the text an offline OCR engine finds and leave out what still reads, "
                        "keep: write them unchecked (archives cleaned upstream)")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="build only part I of N (0 <= I < N) into OUT/part-IIII-of-NNNN; run every part "
                        "(on any machines, same arguments), then `merge OUT`")


def config_from_args(args: argparse.Namespace, out: Path) -> Config:
    """Validate the options and make a `Config` (reads or creates the salt file)."""
    if args.size < 8:
        raise ValueError(f"--size must be >= 8, got {args.size}")
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    if not 0.0 <= args.min_foreground < 1.0:
        raise ValueError(f"--min-foreground must be in [0, 1), got {args.min_foreground}")
    if args.part:
        parse_part(args.part)
    if args.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if args.burned_in == "ocr":
        burned_in.check_engine()  # before any work
    text = str(args.axes).strip().lower()
    try:
        axes = (0, 1, 2) if text == "all" else tuple(sorted({int(a) for a in text.split(",")}))
    except ValueError as exc:
        raise ValueError(f"--axes: expected 0, 1, 2, a comma list or 'all', got {args.axes!r}") from exc
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"--axes: expected 0, 1, 2, a comma list or 'all', got {args.axes!r}")
    salt = args.salt if args.salt is not None else "" if args.dry_run else shared_salt(out)
    return Config(size=args.size, fit=args.fit, dtype=args.dtype, axes=axes, every=args.every,
                  min_foreground=args.min_foreground, ct_windows=parse_windows(args.ct_windows),
                  min_volume_slices=args.min_volume_slices, min_size=args.min_size, salt=salt,
                  burned_in=args.burned_in, dims=args.dims, spacing=parse_spacing(args.spacing))


def run_build(specs: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Run a build from parsed arguments and print the summary; returns the exit code."""
    out = Path(args.out)
    cfg = config_from_args(args, out)
    part = parse_part(args.part) if args.part else None
    summary = build(specs, out, cfg, workers=args.workers, samples_per_shard=args.samples_per_shard,
                    dry_run=args.dry_run, progress=not args.no_progress, max_units=args.max_units, part=part)
    print_summary(summary, out if part is None else part_dir(out, *part))
    return 0


def shared_salt(out: Path) -> str:
    """The build's salt in `out/.salt`, created on first use; parts started at once agree on one salt."""
    path = out / SALT_FILE
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".salt.{os.getpid()}.tmp"
        tmp.write_text(secrets.token_hex(16) + "\n")
        try:
            os.link(tmp, path)  # atomic: fails when another part made the salt first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def merge_main(argv: list[str]) -> int:
    """`merge DIR`: join the finished parts of a split build; exit code 1 and the list of what is missing if not."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.build_shards merge",
                                     description=merge.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder given as --out to every part")
    args = parser.parse_args(argv)
    try:
        summary = merge.merge(args.out)
    except merge.MergeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"merged {summary['parts']} parts into {args.out}: {summary['shards']} shards, "
          f"{summary['samples']} samples; inputs {summary['inputs']}")
    print(burned_in_line(summary["burned_in"]))
    if summary["images_in_two_parts"]:
        print(f"note: {summary['images_in_two_parts']} images were written by two parts (a copy of a series "
              "slice given as a separate file)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`merge DIR` as the first arguments merges the parts of a split build)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m data_tools.build_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="*", help="folders or files (DICOM, NIfTI, PNG/JPEG/TIFF)")
    parser.add_argument("--sources", help="YAML listing collections (name, modality, body_part, path)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--source-name", default=None, help="collection name for SRC (default: folder name)")
    parser.add_argument("--modality", default=None, help="modality hint for NIfTI / raster SRC (e.g. MR, DX)")
    parser.add_argument("--body-part", default=None, help="body part hint for SRC")
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    specs = []
    for src in args.src:
        p = Path(src)
        if not p.exists():
            parser.error(f"SRC {src}: no such file or folder")
        specs.append({"name": args.source_name or (p.name if p.is_dir() else p.parent.name) or "src",
                      "path": str(p), "modality": args.modality, "body_part": args.body_part})
    if args.sources:
        try:
            found, missing = load_sources(args.sources)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
        for name in missing:
            print(f"collection {name}: path not found, skipped", file=sys.stderr)
        specs.extend(found)
    if not specs:
        parser.error("nothing to read: give SRC folders/files or a --sources file with existing paths")
    try:
        return run_build(specs, args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
