"""The manifest, per-shard and total statistics, contact sheets and the end-of-run summary."""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.shards_build.plan import slug
from medssl.data.shard_writer import finished_shards, read_sample

MANIFEST = "manifest.jsonl"
CONFIG = "build_config.json"
STATS = "stats.json"
STATS_DIR = ".stats"
HIST_BINS = 64
SHEET_SAMPLES = 16


def shard_stats(path: Path) -> dict[str, Any]:
    """Counts per modality / source, per-modality intensity histograms and sample keys of one shard."""
    import tarfile

    by_mod: Counter[str] = Counter()
    by_src: Counter[str] = Counter()
    hists: dict[str, np.ndarray] = {}
    keys: dict[str, list[str]] = {}
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            fh_meta, fh_npy = tar.extractfile(members[name]), tar.extractfile(members[f"{key}.npy"])
            assert fh_meta is not None and fh_npy is not None
            meta = json.loads(fh_meta.read())
            arr = np.load(io.BytesIO(fh_npy.read()), allow_pickle=False)
            mod = meta.get("modality", "?")
            by_mod[mod] += 1
            by_src[meta.get("source", "?")] += 1
            top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
            counts, _ = np.histogram(arr / top, bins=HIST_BINS, range=(0.0, 1.0))
            hists[mod] = hists.get(mod, np.zeros(HIST_BINS, np.int64)) + counts
            keys.setdefault(mod, []).append(key)
    return {"shard": path.name, "by_modality": dict(by_mod), "by_source": dict(by_src),
            "histograms": {m: h.tolist() for m, h in hists.items()}, "keys": keys}


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def check_same_options(path: Path, options: dict[str, Any], done: str) -> None:
    """Record `options` in `path` on a first run; on a resumed run refuse options that differ from them.

    Args:
        path: the options file inside the output folder.
        options: JSON-ready options of this run.
        done: what the earlier run did, for the message ("built", "converted").
    """
    if not path.exists():
        write_json(path, options)
        return
    before = json.loads(path.read_text())
    diff = sorted(k for k in set(before) | set(options) if before.get(k) != options.get(k))
    if diff:
        raise ValueError(f"{path.parent} was {done} with other options ({', '.join(diff)} differ): "
                         "use the same options to resume, or a new --out")


def record_shard_stats(out: Path, record: dict[str, Any]) -> None:
    """Cache the statistics of a shard just finished (`ShardWriter` on_close hook)."""
    (out / STATS_DIR).mkdir(exist_ok=True)
    write_json(out / STATS_DIR / f"{record['name']}.json", shard_stats(out / record["name"]))


def read_manifest(out: Path) -> list[dict[str, Any]]:
    """Manifest records; a half-written last line of a killed run is ignored."""
    path = out / MANIFEST
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def finish_stats(out: Path, seed: int = 0) -> dict[str, Any]:
    """Merge per-shard stats and the manifest into `stats.json`; draw contact sheets per modality."""
    by_mod: Counter[str] = Counter()
    by_src: Counter[str] = Counter()
    hists: dict[str, np.ndarray] = {}
    keys: dict[str, list[tuple[str, str]]] = {}
    for shard in finished_shards(out):
        cache = out / STATS_DIR / f"{shard.name}.json"
        st = json.loads(cache.read_text()) if cache.exists() else shard_stats(shard)
        by_mod.update(st["by_modality"])
        by_src.update(st["by_source"])
        for m, h in st["histograms"].items():
            hists[m] = hists.get(m, np.zeros(HIST_BINS, np.int64)) + np.asarray(h)
        for m, ks in st["keys"].items():
            keys.setdefault(m, []).extend((shard.name, k) for k in ks)
    records = read_manifest(out)
    status = Counter(r["status"] for r in records)
    reasons = Counter(public_reason(r["reason"], r.get("input")) for r in records
                      if r.get("reason") and r["status"] != "written")
    stats = {"samples": sum(by_mod.values()), "by_modality": dict(by_mod), "by_source": dict(by_src),
             "inputs": dict(status), "reasons": dict(reasons.most_common()),
             "burned_in": burned_in_stats(out, records),
             "histograms": {m: {"range": [0.0, 1.0], "bins": HIST_BINS, "counts": h.tolist()}
                            for m, h in sorted(hists.items())}}
    write_json(out / STATS, stats)
    rng = random.Random(seed)
    for mod, cands in sorted(keys.items()):
        _contact_sheet(out, mod, rng.sample(cands, min(SHEET_SAMPLES, len(cands))))
    return stats


def public_reason(reason: str, inputs: str | list[str] | None) -> str:
    """A manifest reason fit for `stats.json` and the summary: the input's path, and every trailing part of it
    (a folder named after a patient, the file name), replaced by ``<file>``. The manifest keeps the full text
    (it is private; `stats.json` is meant to be published)."""
    for path in [inputs] if isinstance(inputs, str) else list(inputs or []):
        parts = Path(str(path)).parts
        for tail in sorted({"/".join(parts[k:]) for k in range(len(parts))} | {str(path)}, key=len, reverse=True):
            if tail and tail != "/":
                reason = reason.replace(tail, "<file>")
    return reason


def burned_in_stats(out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the burned-in policy did: images left out (by rule), blanked by OCR, or kept unchecked."""
    config = out / CONFIG
    policy = json.loads(config.read_text()).get("burned_in") if config.exists() else None
    images = [b for r in records for b in r.get("burned_in", [])]  # one record per image at risk
    actions = Counter(b["action"] for b in images)
    return {"policy": policy, "left_out": actions["left out"], "blanked": actions["blanked"],
            "no_text_found": actions["no text found"], "kept_unchecked": actions["kept unchecked"],
            "regions_blanked": sum(len(b.get("regions", [])) for b in images if b["action"] == "blanked"),
            "left_out_by_rule": dict(Counter(b["rule"] for b in images if b["action"] == "left out"))}


def _contact_sheet(out: Path, modality: str, picks: list[tuple[str, str]]) -> None:
    """A page of random samples of one modality: drawn from the finished shards only, so it shows
    nothing the burned-in policy left out (and the blanked version of what OCR cleaned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (shard, key) in zip(axes.ravel(), picks):
        arr, meta = read_sample(out / shard, key)
        if arr.ndim == 3:  # a volume (--dims 3): its middle plane
            arr = arr[arr.shape[0] // 2]
        ax.imshow(arr, cmap="gray", vmin=0, vmax=np.iinfo(arr.dtype).max)
        ax.set_title(f"{meta['source'][:14]} {meta.get('window', {}).get('name', '')}", fontsize=6)
    fig.suptitle(f"{modality}: {len(picks)} random samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"contact_{slug(modality).upper()}.png", dpi=80)
    plt.close(fig)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """Human-readable end-of-run summary."""
    print(f"inputs: {summary['files']} files -> {summary['units']} units "
          f"({summary['already_done']} already done, {summary['todo']} to do) kinds={summary['kinds']}")
    if "stats" not in summary:
        print(f"dry run: nothing written; preset={summary.get('preset')}")
        return
    stats = summary["stats"]
    print(f"this run: {summary['this_run']}")
    print(f"total in {out}: {stats['samples']} samples; by modality {stats['by_modality']}; "
          f"inputs {stats['inputs']}")
    for reason, n in list(stats["reasons"].items())[:12]:
        print(f"  {n:5d} x {reason}")
    print(burned_in_line(stats["burned_in"]))


def burned_in_line(b: dict[str, Any]) -> str:
    """One summary line on the burned-in policy (see `burned_in_stats`)."""
    rules = ", ".join(f"{n} by {rule}" for rule, n in sorted(b["left_out_by_rule"].items())) or "none"
    if b["policy"] == "keep":
        return (f"burned-in policy keep: images were NOT checked for burned-in text (for archives cleaned "
                f"upstream); {b['kept_unchecked']} images of risky kinds written unchecked")
    line = f"burned-in policy {b['policy']}: {b['left_out']} images left out ({rules})"
    if b["policy"] == "ocr":
        line += (f"; {b['blanked']} cleaned ({b['regions_blanked']} text regions blanked), "
                 f"{b['no_text_found']} with no text found")
    return line
