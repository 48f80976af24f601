"""A build, or one part of a build split across machines, resumable after a kill.

An input's manifest line is written only once all its samples are in finished shards, so a killed
run restarted with the same arguments redoes exactly the inputs whose samples were not yet safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.shards_build.plan import Config, Unit, discover, part_of, plan_units, scan
from data_tools.shards_build.report import (
    CONFIG,
    MANIFEST,
    check_same_options,
    finish_stats,
    read_manifest,
    record_shard_stats,
    write_json,
)
from data_tools.shards_build.worker import results, unit_record
from medssl.data.holdout import write_pool_record
from medssl.data.shard_writer import (
    ShardWriter,
    finished_shards,
    next_shard_index,
    remove_partial_shards,
    shard_keys,
    write_info,
)

PART_DONE = "_part_done.json"


def part_dir(out: str | os.PathLike, index: int, parts: int) -> Path:
    """Folder of part `index` of `parts` inside the build folder `out` (its own shards, manifest, stats)."""
    return Path(out) / f"part-{index:04d}-of-{parts:04d}"


def plan(specs: Sequence[dict[str, Any]], cfg: Config, workers: int = 0,
         part: tuple[int, int] | None = None) -> tuple[list[dict[str, Any]], list[Unit], str]:
    """Files, the units to build (only those of `part` = (I, N) when given) and a fingerprint of the
    whole plan (every part of one build must plan the same units; it does not depend on where the
    sources are mounted)."""
    files = discover(specs)
    units = plan_units(files, scan(files, workers), cfg)
    keys = sorted(f"{u.kind}:{u.status}:{u.part_key}" for u in units)
    fingerprint = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    if part is not None:
        units = [u for u in units if part_of(u, part[1]) == part[0]]
    return files, units, fingerprint


def build(specs: Sequence[dict[str, Any]], out: str | os.PathLike, cfg: Config, *, workers: int = 0,
          samples_per_shard: int = 1000, dry_run: bool = False, progress: bool = True,
          max_units: int | None = None, part: tuple[int, int] | None = None) -> dict[str, Any]:
    """Build (or resume building) shards in `out` from source specs; returns the run summary.

    Args:
        specs: [{"name": ..., "path": ..., "modality": hint or None, "body_part": hint or None}].
        out: output folder.
        cfg: reading / normalisation / slicing options (use the same to resume).
        workers: worker processes (0: in this process).
        samples_per_shard: samples per tar shard.
        dry_run: only plan; write nothing.
        progress: show a tqdm progress bar.
        max_units: stop after this many units (a partial build; run again to continue).
        part: (I, N): build only part I of N into `part_dir(out, I, N)`; `merge.merge(out)` joins the parts.
    """
    files, units, fingerprint = plan(specs, cfg, workers, part)
    dest = Path(out) if part is None else part_dir(out, *part)
    done = {r["unit"] for r in read_manifest(dest)} if dest.exists() else set()
    todo = [u for u in units if u.uid not in done]
    summary: dict[str, Any] = {"files": len(files), "units": len(units), "already_done": len(units) - len(todo),
                               "todo": len(todo), "kinds": dict(Counter(u.kind for u in todo))}
    if part is not None:
        summary["part"] = f"{part[0]}/{part[1]}"
    if dry_run:
        summary["preset"] = dict(Counter(u.status for u in todo if u.status))
        return summary
    finished = max_units is None or max_units >= len(todo)
    todo = todo[:max_units] if max_units is not None else todo
    dest.mkdir(parents=True, exist_ok=True)
    (dest / PART_DONE).unlink(missing_ok=True)
    summary["removed_partial"] = [p.name for p in remove_partial_shards(dest)]
    _check_config(dest, cfg)
    summary["this_run"] = _write_units(dest, todo, cfg, workers, samples_per_shard, progress)
    summary["stats"] = finish_stats(dest)
    write_info(dest)
    if part is None:
        write_pool_record(dest)  # the pool by content: every source file whose samples the folder holds
    if part is not None and finished:
        write_json(dest / PART_DONE, {"part": part[0], "parts": part[1], "units": len(units),
                                      "samples": summary["stats"]["samples"], "plan": fingerprint})
    return summary


def _write_units(out: Path, todo: list[Unit], cfg: Config, workers: int, samples_per_shard: int,
                 progress: bool) -> dict[str, int]:
    """Decode `todo` (in worker processes) and write its samples; returns the counts of this run."""
    existing = {k for shard in finished_shards(out) for k in shard_keys(shard)}
    manifest = open(out / MANIFEST, "a", buffering=1)
    pending: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        for line in [rec, *rec.pop("left_out", [])]:  # a series' record, then its files left out
            manifest.write(json.dumps(line, sort_keys=True) + "\n")
        manifest.flush()

    def on_close(shard_record: dict[str, Any]) -> None:
        record_shard_stats(out, shard_record)
        for rec in pending:  # every sample of these inputs is now in finished shards
            emit(rec)
        pending.clear()

    writer = ShardWriter(out, samples_per_shard, start_index=next_shard_index(out), on_close=on_close)
    run: Counter[str] = Counter()
    for unit in (u for u in todo if u.status):
        emit({**unit_record(unit), "status": unit.status, "reason": unit.reason, **unit.extra, "ids": []})
        run[unit.status] += 1
    work = [u for u in todo if not u.status]
    bar = _progress(len(work), progress)
    written_ids = {i: r["input"] for r in read_manifest(out) if r["status"] == "written" for i in r.get("ids", [])}
    for unit, result in results(work, cfg, workers):
        samples = result.pop("samples")
        ids = result["ids"] = unit.extra.get("ids", [])
        first = next((written_ids[i] for i in ids if i in written_ids), None)
        if result["status"] == "written" and first is not None:
            result.update(status="duplicate", reason="same SOPInstanceUID or content as an earlier input",
                          duplicate_of=first)
            samples = []
        elif result["status"] == "written":
            written_ids.update((i, result["input"]) for i in ids)
        keys = []
        for key, arr, meta in samples:
            keys.append(key)
            if key not in existing:
                writer.write(key, arr, meta)
                existing.add(key)
        result["keys"], result["n_samples"] = keys, len(keys)
        run[result["status"]] += 1
        run["samples"] += len(keys)
        run["files_left_out"] += len(result.get("left_out", []))
        (pending.append if writer.pending_keys else emit)(result)
        bar.update(1)
        bar.set_postfix(samples=run["samples"], failed=run["failed"], skipped=run["skipped"], refresh=False)
    bar.close()
    writer.close()
    manifest.close()
    return dict(run)


def _check_config(out: Path, cfg: Config) -> None:
    """Refuse to resume into `out` with different options (the salt itself is never written)."""
    config = cfg.recorded()
    config["salt_sha256"] = hashlib.sha256(cfg.salt.encode()).hexdigest()
    config = json.loads(json.dumps(config))  # tuples -> lists, Windows -> dicts
    check_same_options(out / CONFIG, config, "built")


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="input", disable=not enabled, dynamic_ncols=True, mininterval=1.0)
