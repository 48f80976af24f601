"""Transfer tables: several backbone initialisations x tasks x protocols x label fractions x seeds.

    python benchmarks/run_all.py --quick                               # CPU demo scale
    python benchmarks/run_all.py --quick --backbone runs/lumid/backbone  # + your MAE backbone
    python benchmarks/run_all.py --config benchmarks/configs/default.yaml --out benchmarks/results/full

Every table carries the rows a user would otherwise pick, trained the same way on the same splits:
a from-scratch CNN (timm ResNet-18 / small U-Net) and each ViT architecture at random init. A backbone entry
whose folder holds a pretrained CNN (SparK: `config.json` says `"family": "cnn"`) becomes a row of its own,
fine-tuned exactly as the from-scratch CNN trains (its hyper-parameters and lr grid), on the classification and
detection tasks. Results
go to one folder: results.md / .csv / .json, one bar chart per task, config.resolved.yaml, tasks.json,
code.json (per task: the fingerprinted source files, their fingerprint and commit) and cells/ (one JSON
per finished cell: a re-run skips them, so an interrupted run resumes). A cell's key includes the
fingerprint of the code that computes it (benchmarks/provenance.py), so editing a model, head, task or the
training loop recomputes the cells it affects; each cell records the commit it came from.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.cells import Backbone, backbone_dims, run_cell, run_detection_cell, twin_source, vit_label
from benchmarks.provenance import cached_cell, cell_code, cell_key
from benchmarks.report import write_all
from benchmarks.tasks import build_task
from medssl.config import read_config

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "benchmarks" / "configs"


def resolve_backbones(cfg: dict[str, Any]) -> list[Backbone]:
    """Pretrained rows from the config, their random-init twins, extra random rows, and the CNN marker. A pretrained
    CNN's twin is the from-scratch CNN row itself."""
    rows: list[Backbone] = []
    twins: dict[str, Backbone] = {}
    for entry in cfg.get("backbones") or []:
        entry = {"source": entry} if isinstance(entry, str) else dict(entry)
        src = str(entry["source"])
        from medssl.hub import backbone_config, backbone_record, list_backbones

        if not Path(src).exists() and src not in list_backbones():
            raise FileNotFoundError(f"backbone {src!r}: no such file/folder and not a registered name "
                                    f"({', '.join(list_backbones())})")
        fractions = entry.get("fractions")
        meta = backbone_config(src) if Path(src).exists() else {}
        if meta.get("family") == "cnn":
            name = str(meta["architecture"])
            label = entry.get("label", name.replace("resnet", "ResNet-"))
            rows.append(Backbone("cnn_pretrained", src, entry.get("pretraining", "SparK"),
                                 entry.get("data", Path(src).name), label,
                                 epochs=entry.get("epochs"),
                                 fractions=tuple(float(f) for f in fractions) if fractions else None,
                                 pool=entry.get("pool") or pretraining_pool(src)))
            continue
        arch = backbone_record(src)
        is_random = src in list_backbones() and not Path(src).exists()
        if not is_random:
            rows.append(Backbone("vit", src, entry.get("pretraining", "MAE"), entry.get("data", Path(src).name),
                                 entry.get("label", vit_label(arch)), epochs=entry.get("epochs"),
                                 fractions=tuple(float(f) for f in fractions) if fractions else None,
                                 pool=entry.get("pool") or pretraining_pool(src)))
        key = twin_source(arch)
        if is_random or cfg.get("random_init", True):
            # a twin runs the budgets of the rows it is a baseline for: all where one of them runs all (or the
            # random init is listed itself), else the union of theirs (a lever's new architecture: its budgets)
            own = None if is_random or not fractions else {float(f) for f in fractions}
            seen = twins.get(key)
            if seen is not None:
                own = None if own is None or seen.fractions is None else own | set(seen.fractions)
            twins[key] = Backbone("vit_random", key, "none (random init)", "-", vit_label(arch), epochs=0,
                                  fractions=None if own is None else tuple(sorted(own)))
    return rows + list(twins.values())


def primary_source(cfg: dict[str, Any], backbones: list[Backbone]) -> str | None:
    """The pretrained ViT row the answer reads: the config entry marked `primary: true`, else the first pretrained
    ViT row of `resolve_backbones` (None without one: no answer). Other pretrained rows, pretrained CNNs included,
    are levers, reported beside it but not counted in the verdict (no best-of-n).

    Raises:
        ValueError: several entries marked primary, a source listed twice, a pretrained CNN marked primary, or two
            pretrained rows recording the same `epochs` (it places a row on the pretraining-length curve, one row
            per length).
    """
    pretrained = [b.source for b in backbones if b.kind == "vit"]
    cnns = [b.source for b in backbones if b.kind == "cnn_pretrained"]
    marked = [str(e["source"]) for e in cfg.get("backbones") or [] if isinstance(e, dict) and e.get("primary")]
    listed = pretrained + cnns
    if len(marked) > 1 or len(set(listed)) < len(listed):
        raise ValueError("backbones: one entry answers the question: at most one says primary: true, and no "
                         f"source is listed twice (primary: {marked}, pretrained: {listed})")
    lengths = [b.epochs for b in backbones if b.kind in ("vit", "cnn_pretrained") and b.epochs is not None]
    if len(set(lengths)) < len(lengths):
        raise ValueError("backbones: `epochs` places a row on the pretraining-length curve, one row per length; "
                         f"several pretrained rows say {sorted(lengths)} (leave it out of a row that is not a "
                         "point on that curve: a second pretraining seed, another pool, a pretrained CNN)")
    if marked and marked[0] in cnns:
        raise ValueError(f"backbones: {marked[0]} is a pretrained CNN: the answer reads a pretrained ViT against "
                         "both baselines; a pretrained CNN is a lever, compared with the same CNN from scratch")
    return marked[0] if marked else (pretrained[0] if pretrained else None)


def provenance(source: str) -> dict[str, Any]:
    """`provenance` of a backbone's `config.json` (`medssl.hub.backbone_config`); {} where there is none."""
    from medssl.hub import backbone_config

    return backbone_config(source).get("provenance") or {}


def pretraining_pool(source: str) -> str | None:
    """The shard folder a backbone was pretrained on (`provenance.data`)."""
    data = provenance(source).get("data")
    if data and not Path(data).is_absolute() and not Path(data).exists() and (ROOT / data).exists():
        return str(ROOT / data)  # an older backbone recorded its pool relative to the repository
    return data


def check_pools(task: Any, backbones: list[Backbone]) -> None:
    """Refuse (`PoolOverlapError`) a pretrained row whose pool holds one of the task's test images.

    Raises:
        ValueError: a pretrained row names no pool (set `pool:` in its entry), or the task declares no test files.
    """
    from medssl.data.holdout import POOL_RECORD, check_disjoint, file_sha256, keys_of, read_pool_keys

    rows = [b for b in backbones if b.kind in ("vit", "cnn_pretrained")]
    if not rows:
        return
    if not task.test_files:
        raise ValueError(f"task {task.name} declares no test files: its test images cannot be checked against "
                         "the pretraining pools")
    test = keys_of(task.test_files)
    for bb in rows:
        if not bb.pool:
            raise ValueError(f"backbone {bb.source}: no pretraining pool recorded in its config.json; name it with "
                             "`pool: SHARD_FOLDER` in the config entry")
        recorded = provenance(bb.source).get("pool_record")
        if recorded and file_sha256(Path(bb.pool) / POOL_RECORD) != recorded:
            raise ValueError(f"backbone {bb.source}: its pool {bb.pool} changed since it was pretrained (pool.json "
                             "differs from the one recorded in its provenance): the check would read another pool")
        check_disjoint(read_pool_keys(bb.pool), test, f"task {task.name}, backbone {bb.source} (pool {bb.pool})")


def task_rows(task: Any, backbones: list[Backbone]) -> list[Backbone]:
    """The ViT rows that take the task's inputs: 3-D backbones for volume tasks, 2-D ones for the rest (the others
    are left out of this task's table, with one printed line).

    Raises:
        ValueError: no row of the config takes the task's inputs.
    """
    dims = getattr(task, "spatial_dims", 2)
    rows = [bb for bb in backbones if backbone_dims(bb) == dims
            and (bb.kind != "cnn_pretrained" or task.kind in ("classification", "detection"))]  # no ResNet U-Net
    if not rows:
        raise ValueError(f"task {task.name} holds {dims}-D inputs, and no backbone of the config does: list a "
                         f"{dims}-D backbone under 'backbones' (3-D: pretrained on `build_shards --dims 3` volumes)")
    if len(rows) < len(backbones):
        print(f"{task.name}: {dims}-D task; rows of other dimensions left out: "
              f"{', '.join(f'{b.label} ({b.pretraining})' for b in backbones if b not in rows)}")
    return rows


def task_specs(cfg: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(task spec for `build_task`, its own run options: label_fractions / seeds / protocols) per config task."""
    out = []
    for spec in cfg["tasks"]:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        out.append((spec, {k: spec.pop(k) for k in ("label_fractions", "seeds", "protocols") if k in spec}))
    return out


def check_search(cfg: dict[str, Any], protocols: list[str]) -> None:
    """Every trained protocol searches as many learning rates (`lr_grid`): no row gets a larger tuning budget."""
    from benchmarks.cells import lr_grid

    sizes = {p: len(lr_grid(cfg.get(p, {}))) for p in {*protocols, "scratch"} if p not in ("knn",)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the rows would get unequal learning-rate searches {sizes}: give every protocol an "
                         "lr_grid of the same size")


def missing_summary(missing: list[tuple[str, float, int]]) -> str:
    """'brain_level all labels, seeds 0-4: 25 cells; ...': the cells not run yet, by task and label budget."""
    groups: dict[tuple[str, float], list[int]] = {}
    for task, frac, seed in missing:
        groups.setdefault((task, frac), []).append(seed)
    parts = []
    for (task, frac), seeds in groups.items():
        budget = "all labels" if frac == 1 else (f"{frac:g} labels" if frac > 1 else f"{100 * frac:g} % labels")
        parts.append(f"{task} {budget}, seeds {', '.join(map(str, sorted(set(seeds))))}: {len(seeds)} cells")
    return "; ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--quick", action="store_true", help="use configs/quick.yaml (CPU demo scale)")
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<config name>)")
    p.add_argument("--backbone", action="append", default=[],
                   help="extra backbone source (folder / checkpoint / registry name); repeatable. "
                        "Give PATH=LABEL:DATA to set the Data column, e.g. runs/bb=MAE:LUMID-mini")
    p.add_argument("--tasks", nargs="+", help="task names to keep (default: all in the config)")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--fractions", nargs="+", type=float, help="label fractions (<= 1) or counts (> 1)")
    p.add_argument("--protocols", nargs="+", choices=["probe", "finetune", "knn"])
    p.add_argument("--device", help="cpu / cuda (default: config, else cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables from the finished cells only (missing cells are listed, not run)")
    return p.parse_args(argv)


def _cli_backbone(text: str) -> dict[str, str]:
    """`--backbone PATH[=PRETRAINING[:DATA]]` as a config entry (the pretraining named by the folder's kind when
    left out: resolve_backbones names a pretrained CNN "SparK", a ViT "MAE")."""
    src, _, rest = text.partition("=")
    pre, _, data = rest.partition(":")
    return {"source": src, **({"pretraining": pre} if pre else {}), "data": data or Path(src).name}


def check_checkout() -> None:
    """Refuse to run when this script and the code it imports come from two checkouts (a git worktree whose
    `python benchmarks/run_all.py` imports medssl / benchmarks from another checkout's editable install): the cells
    would be computed, and fingerprinted, with the other checkout's code."""
    import benchmarks.provenance
    import medssl

    for mod in (benchmarks.provenance, medssl):
        where = Path(mod.__file__).resolve().parents[1]
        if where != ROOT and (ROOT / "medssl").is_dir():
            raise RuntimeError(f"{Path(__file__).resolve()} runs the code of {where} ({mod.__name__} is imported "
                               f"from there, probably an editable install): run it with PYTHONPATH={ROOT}")


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) every cell of the config and write the tables."""
    check_checkout()
    args = parse_args(argv)
    cfg_path = args.config or CONFIGS / ("quick.yaml" if args.quick else "default.yaml")
    cfg = read_config(cfg_path)
    cfg["backbones"] = list(cfg.get("backbones") or []) + [_cli_backbone(b) for b in args.backbone]
    for k in ("seeds", "protocols"):
        if getattr(args, k):
            cfg[k] = getattr(args, k)
    if args.fractions:
        cfg["label_fractions"] = args.fractions
    if args.device:
        cfg["device"] = args.device
    if args.threads or cfg.get("threads"):
        torch.set_num_threads(int(args.threads or cfg["threads"]))
    specs = task_specs(cfg)
    if args.tasks:
        specs = [t for t in specs if t[0]["name"] in args.tasks]
        if not specs:
            raise ValueError(f"--tasks {args.tasks}: none of them is in {cfg_path}")
    out = args.out or ROOT / "benchmarks" / "results" / cfg.get("name", cfg_path.stem)
    out.mkdir(parents=True, exist_ok=True)
    img = int(cfg.get("img_size", 64))
    backbones = resolve_backbones(cfg)
    primary = primary_source(cfg, backbones)
    if not backbones:
        raise ValueError("no ViT backbone: list at least one source under 'backbones' or pass --backbone")
    cfg["resolved_rows"] = [b.__dict__ for b in backbones]
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    device = cfg.get("device") if cfg.get("device") not in (None, "auto") else None
    rows, tasks_info, code_info, t_start, missing = [], {}, {}, time.time(), []
    for spec, per_task in specs:
        for key, flag in (("label_fractions", args.fractions), ("seeds", args.seeds), ("protocols", args.protocols)):
            if flag:  # the command line wins over a task's own list
                per_task.pop(key, None)
        task = build_task(spec, img)
        if task.name in tasks_info:
            raise ValueError(f"two tasks of {cfg_path} are both named {task.name}: their cells would be merged; "
                             "give each fold its own test subject or name")
        vits = task_rows(task, backbones)  # the rows of the task's dimensions (2-D images or 3-D volumes)
        check_pools(task, vits)  # before any cell: no pretrained row may have seen a test image
        tasks_info[task.name] = task.summary()
        code = cell_code(task.kind, spec)  # the files that compute this task's cells, hashed once per run
        code_info[task.name] = code
        det = task.kind == "detection"
        cnn_name = {"segmentation": "unet",
                    "detection": str(cfg.get("detection", {}).get("cnn", "resnet18"))}.get(task.kind, "resnet18")
        if task.kind == "classification" and getattr(task, "spatial_dims", 2) == 3:
            cnn_name = "resnet3d"  # medssl.heads.classify3d.resnet3d
        cnn = Backbone("cnn", cnn_name, "none (from scratch)", "-",
                       {"unet": "U-Net", "resnet3d": "ResNet-3D"}.get(cnn_name, cnn_name.replace("resnet", "ResNet-")))
        protocols = per_task.get("protocols", cfg["protocols"])
        if not det:
            check_search(cfg, protocols)
        plan = [(bb, p) for bb in vits if bb.kind != "cnn_pretrained" for p in protocols  # a row may run a subset
                if (p != "knn" or task.kind == "classification")  # kNN classifies
                and (p in ("finetune", "knn") or getattr(task, "spatial_dims", 2) == 2)]  # 3-D: no probe rows
        # a pretrained CNN fine-tunes once per budget, as the CNN baseline trains (its "scratch" section)
        plan += [(bb, "finetune") for bb in vits if bb.kind == "cnn_pretrained"]
        if cfg.get("baselines", True):
            plan.insert(0, (cnn, "scratch"))
        for frac in per_task.get("label_fractions", cfg["label_fractions"]):
            for seed in per_task.get("seeds", cfg["seeds"]):
                for bb, protocol in plan:
                    if not bb.runs(frac):
                        continue
                    section = "scratch" if bb.kind == "cnn_pretrained" else protocol  # trained as the CNN row
                    hp = dict(cfg.get("detection" if det else section, {}))
                    extra = {"task_version": task.info["version"]} if "version" in task.info else {}
                    key = cell_key(task=spec, img=img, bb=bb.identity(), protocol=protocol, fraction=float(frac),
                                   seed=seed, hp=hp, code=code["fingerprint"], **extra)
                    t0 = time.time()
                    if det:
                        job = functools.partial(run_detection_cell, task, bb, protocol, frac, seed, hp,
                                                out / "work" / key, device=device)
                    else:
                        job = functools.partial(run_cell, task, bb, protocol, frac, seed, hp, img, device=device)
                    if args.report_only and not (out / "cells" / f"{key}.json").is_file():
                        missing.append((task.name, frac, seed))
                        continue
                    res, hit = cached_cell(out / "cells", key, job,
                                           meta={k: code[k] for k in ("commit", "fingerprint")})
                    role = "cnn" if bb.kind == "cnn" else "random" if bb.kind == "vit_random" else "pretrained"
                    # (a pretrained CNN is "pretrained": the report compares it with the from-scratch CNN)
                    rows.append({"task": task.name, "kind": task.kind, "fraction": frac, "seed": seed,
                                 "row": f"{bb.pretraining} | {bb.data} | {bb.label}", "protocol": protocol,
                                 "pretraining": bb.pretraining, "data": bb.data, "backbone": bb.label,
                                 "role": role, "pretrain_epochs": bb.epochs, "key": key,
                                 "primary": role == "pretrained" and bb.source == primary,
                                 "family": task.info.get("family", task.name), **res})
                    m = res["metrics"]
                    main_metric = m.get("dice", m.get("auc", m.get("r@0.3", float("nan"))))
                    print(f"[{time.time() - t_start:6.0f}s] {task.name} frac={frac:g} seed={seed} "
                          f"{bb.label:10s} {bb.pretraining[:18]:18s} {protocol:8s} -> {main_metric:.3f} "
                          f"({'cached' if hit else f'{time.time() - t0:.0f}s'})", flush=True)
    compute = sum(float(r.get("seconds") or 0.0) for r in rows)  # what the cells took when they were computed
    header = (f"Config `{cfg_path.name}`" + (f" (tasks {', '.join(args.tasks)} only)" if args.tasks else "")
              + f", image size {img}, seeds {cfg['seeds']}, device "
              f"{device or ('cuda' if torch.cuda.is_available() else 'cpu')}; {len(rows)} cells, "
              f"{compute / 3600:.1f} h summed over the cells' own run times ({time.time() - t_start:.0f} s this pass).")
    if missing:
        header += f"\n\nPARTIAL TABLE: {len(missing)} cells not run yet: " + missing_summary(missing)
        print(f"{len(missing)} cells missing (not run with --report-only)")
    (out / "tasks.json").write_text(json.dumps(tasks_info, indent=1, default=str))
    (out / "code.json").write_text(json.dumps(code_info, indent=1))
    paths = write_all(rows, tasks_info, out, header)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
