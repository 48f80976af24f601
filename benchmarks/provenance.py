"""Provenance of a table cell: the code that computes it (fingerprint, commit), its cache key and its cache file.

The key (`cell_key`) holds the task spec, image size, backbone identity, protocol, label fraction, seed and the
protocol's hyper-parameters, plus the fingerprint of the code that computes the cell (`cell_code`): SHA-256 of
the CONTENTS of a fixed set of source files, named by their path inside the repository (so an uncommitted edit
counts, and a fresh clone anywhere gives the same key; mtimes and git state do not count). The set is the
import closure (module- and function-level imports of `medssl`, `benchmarks` and `data_tools` modules, plus the
`__init__.py` of each package on the way) of the entry modules of the cell kind, plus `CELL_FILES` (this file
and benchmarks/cells.py, hashed, not followed: the cells' lazy detection imports belong to detection cells):

- classification / segmentation cells (`cells.run_cell`): `CODE_ENTRIES["dense"]`, i.e. the heads, their
  record-built models, frozen-feature cache and training loop (medssl/heads/*, which reach medssl/train/* and
  medssl/data/epochs.py), the dense metrics, medssl/hub.py and medssl/models/*; never medssl/detection/*.
- detection cells (`cells.run_detection_cell`): `CODE_ENTRIES["detection"]`, i.e. medssl/detection/stages.py
  and evaluation.py (reaching the rest of medssl/detection/*, medssl/train/*, medssl/data/coco.py, the
  detection metrics), medssl/hub.py and medssl/models/*; never medssl/heads/*.
- and the task's own module (`TASK_MODULES`, e.g. benchmarks/tasks/brain.py with the medssl/data/* readers
  it imports; lesion_detection reaches data_tools/demo_mammo.py).

Each cell's JSON also records `fingerprint` and `commit` (`git rev-parse HEAD`, with "+dirty" when one of
the fingerprinted files differs from that commit or is untracked; "unknown" outside a git checkout).
Fingerprints are taken when the keys are made (run_all.py, once per task), i.e. for the code on disk then.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Entry modules per cell kind whose import closure computes the cell (see the module docstring).
CODE_ENTRIES = {
    "dense": ("medssl.heads.build", "medssl.heads.classify", "medssl.heads.segment", "medssl.heads.features",
              "medssl.heads.fit", "medssl.heads.knn", "medssl.metrics.classification",
              "medssl.metrics.segmentation", "medssl.hub", "medssl.models.vit", "medssl.heads.segment3d",
              "medssl.heads.classify3d"),
    "detection": ("medssl.detection.stages", "medssl.detection.evaluation", "medssl.hub", "medssl.models.vit"),
}
# hashed with every cell's code, not followed (their lazy imports reach the other cell kind)
CELL_FILES = ("benchmarks/cells.py", "benchmarks/provenance.py")
# any other task spec is a custom task (benchmarks.tasks.custom)
TASK_MODULES = {"brain_tissue": "benchmarks.tasks.brain", "brain_level": "benchmarks.tasks.brain",
                "image_qc": "benchmarks.tasks.qc", "ct_organs": "benchmarks.tasks.organs",
                "ct_organs_3d": "benchmarks.tasks.organs3d", "ct_liver_3d": "benchmarks.tasks.organs3d",
                "lesion_detection": "benchmarks.tasks.lesions"}
_OWN = ("medssl", "benchmarks", "data_tools")  # packages whose sources are fingerprinted


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """Source file of a module of this repository (`a.b` -> a/b.py or a/b/__init__.py), None if not one."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(path: Path, name: str) -> set[str]:
    """Modules of this repository that `path` (module `name`) imports.

    A module's imports anywhere in its body count (lazy imports inside functions too); a package's
    `__init__.py` counts only its module-level imports (its re-exports), not the lazy imports of
    dispatchers such as `benchmarks.tasks.build_task`, which reach every task.
    """
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    nodes, stack = [], [ast.parse(path.read_text(), filename=str(path))]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if not (is_package and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
            stack += ast.iter_child_nodes(node)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: from .x import y
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in _OWN}


def code_files(entries: tuple[str, ...] | list[str], root: Path = ROOT) -> list[str]:
    """Repository-relative paths of the import closure of `entries` (with the packages' __init__.py), sorted."""
    seen: dict[str, Path] = {}
    todo = list(entries)
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or name in seen:
            if path is None and name in entries:
                raise FileNotFoundError(f"{name}: no such module under {root}")
            continue
        seen[name] = path
        todo += _imported(path, name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py (hashed too)
            init = module_file(".".join(parts[:i]), root)
            if init is not None:
                seen.setdefault(".".join(parts[:i]) + ".__init__", init)
    return sorted({p.relative_to(root).as_posix() for p in seen.values()})


def code_fingerprint(files: list[str], root: Path = ROOT) -> str:
    """SHA-256 over (path, content hash) of each file: the same for the same sources wherever they lie."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{hashlib.sha256((root / rel).read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()[:16]


def git_commit(files: list[str], root: Path = ROOT) -> str:
    """`git rev-parse HEAD` of `root`, + "+dirty" when one of `files` differs from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=all", "--", *files)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changed else "")


def cell_code(kind: str, spec: dict[str, Any], root: Path = ROOT) -> dict[str, Any]:
    """The code that computes a cell of a task of `kind` built from `spec`: files, fingerprint and commit."""
    task_module = TASK_MODULES.get(spec.get("name", ""), "benchmarks.tasks.custom")
    entries = CODE_ENTRIES["detection" if kind == "detection" else "dense"] + (task_module,)
    files = sorted(set(code_files(entries, root)) | set(CELL_FILES))
    return {"fingerprint": code_fingerprint(files, root), "commit": git_commit(files, root), "files": files}


def cell_key(**parts: Any) -> str:
    """Stable hash of everything that determines a cell's result (include the code fingerprint, `cell_code`)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cached_cell(folder: Path, key: str, compute: Any, meta: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], bool]:
    """Return the cached result for `key` or compute and store it atomically; (result, was_cached).

    `meta` (e.g. the commit and fingerprint of `cell_code`) is stored with a newly computed result.
    """
    path = folder / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text()), True
    result = {**compute(), **(meta or {})}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, path)
    return result, False
