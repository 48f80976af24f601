"""Merge the parts of a split build (`--part I/N`) into one folder the loader reads like any other.

    python -m data_tools.build_shards merge DIR

The parts' shards are hard-linked (copied where links are impossible) into DIR as
`lumid-NNNNNN.tar`, numbered part after part; manifests are concatenated; `_info.json`, `stats.json`
and the contact sheets are made from the parts' per-shard records. The part folders stay as they
are, so merging again (say after re-running a part) gives the same result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from data_tools.shards_build.build import CONFIG, PART_DONE, part_dir
from data_tools.shards_build.report import MANIFEST, STATS_DIR, finish_stats, read_manifest, shard_stats, write_json
from medssl.data.holdout import write_pool_record
from medssl.data.shard_writer import INFO_NAME, SHARD_PATTERN, finished_shards, write_info

MERGED = "_merged.json"


class MergeError(ValueError):
    """The parts cannot be merged (yet); `problems` lists every reason, one line each."""

    def __init__(self, out: Path, problems: list[str]):
        self.problems = problems
        super().__init__(f"cannot merge {out}:\n  " + "\n  ".join(problems))


def check_parts(out: str | os.PathLike) -> tuple[int, list[str]]:
    """Number of parts of the build in `out` and every problem that stops a merge (none: ready)."""
    out = Path(out)
    found = [re.fullmatch(r"part-(\d{4})-of-(\d{4})", p.name) for p in out.glob("part-*-of-*") if p.is_dir()]
    splits = sorted({int(m[2]) for m in found if m})
    if not splits:
        return 0, [f"no part folders (part-IIII-of-NNNN) in {out}: build with --part I/N first"]
    if len(splits) > 1:
        return 0, [f"parts of different splits in {out}: N = {', '.join(map(str, splits))}; keep one"]
    parts, problems = splits[0], []
    if (out / MANIFEST).exists() and not (out / MERGED).exists():
        problems.append(f"{out} holds a whole (unsplit) build: merge into the folder given to --out of the parts")
    plans, configs = set(), set()
    for i in range(parts):
        folder = part_dir(out, i, parts)
        done = folder / PART_DONE
        if not folder.is_dir():
            problems.append(f"part {i}/{parts}: missing (never run)")
        elif not done.exists():
            n = len(read_manifest(folder))
            problems.append(f"part {i}/{parts}: not finished ({n} inputs in its manifest; killed, still running "
                            "or stopped by --max-units): run it again with the same arguments")
        else:
            plans.add(json.loads(done.read_text())["plan"])
            configs.add((folder / CONFIG).read_text())
    if len(plans) > 1:
        problems.append("the parts planned different inputs (files added or removed between part runs?): "
                        "re-run the parts on the same inputs")
    if len(configs) > 1:
        problems.append("the parts were built with different options or salts")
    return parts, problems


def merge(out: str | os.PathLike) -> dict[str, Any]:
    """Merge the finished parts in `out` into `out` itself; raises `MergeError` listing what is missing."""
    out = Path(out)
    parts, problems = check_parts(out)
    if problems:
        raise MergeError(out, problems)
    write_json(out / MERGED, {"parts": parts, "state": "merging"})
    for old in finished_shards(out):  # a previous merge
        old.unlink()
    shutil.rmtree(out / STATS_DIR, ignore_errors=True)
    (out / STATS_DIR).mkdir()
    counts: dict[str, int] = {}
    owner: dict[str, int] = {}
    lines: list[str] = []
    for i in range(parts):
        folder = part_dir(out, i, parts)
        info = {s["url"]: s["num_samples"] for s in json.loads((folder / INFO_NAME).read_text())["shards"]}
        for shard in finished_shards(folder):
            name = SHARD_PATTERN.format(index=len(counts))
            _link(shard, out / name)
            counts[name] = info[shard.name]
            _copy_stats(folder, shard, out, name, owner, i)
        lines += (folder / MANIFEST).read_text().splitlines(keepends=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text("".join(lines))
    os.replace(tmp, out / MANIFEST)
    shutil.copyfile(part_dir(out, 0, parts) / CONFIG, out / CONFIG)
    info = write_info(out, counts)
    stats = finish_stats(out)
    summary = {"parts": parts, "shards": len(counts), "samples": info["splits"]["train"]["num_samples"],
               "inputs": stats["inputs"], "burned_in": stats["burned_in"],
               "images_in_two_parts": _shared_images(read_manifest(out))}
    write_pool_record(out)  # what the merged pool holds, by content (checked against test sets by run_all)
    write_json(out / MERGED, {**summary, "state": "done"})
    return summary


def _link(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (a copy, written atomically, across file systems)."""
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _copy_stats(folder: Path, shard: Path, out: Path, name: str, owner: dict[str, int], part: int) -> None:
    """The part's cached statistics of `shard` under its merged `name`; checks keys are unique across parts."""
    cache = folder / STATS_DIR / f"{shard.name}.json"
    stats = json.loads(cache.read_text()) if cache.exists() else shard_stats(shard)
    for key in (k for keys in stats["keys"].values() for k in keys):
        if owner.setdefault(key, part) != part:
            raise MergeError(out, [f"sample {key} is in parts {owner[key]} and {part}: "
                                   "were the parts built from the same inputs and salt?"])
    write_json(out / STATS_DIR / f"{name}.json", {**stats, "shard": name})


def _shared_images(records: list[dict[str, Any]]) -> int:
    """Images (SOPInstanceUID / content ids) written by more than one input: a copy of an image that went
    to another part than the original (only possible between a series and a single file)."""
    seen: dict[str, str] = {}
    shared = 0
    for rec in (r for r in records if r["status"] == "written"):
        for i in rec.get("ids", []):
            shared += seen.setdefault(i, rec["unit"]) != rec["unit"]
    return shared
