"""The cell cache key follows the code that computes a cell; cells and the report name their commit."""

import ast
import csv
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from benchmarks import provenance
from benchmarks.provenance import cached_cell, cell_code, cell_key, code_files, code_fingerprint, git_commit
from benchmarks.report import write_all

SPECS = {"brain_tissue": ("segmentation", {"name": "brain_tissue", "slab": 4}),
         "image_qc": ("classification", {"name": "image_qc"}),
         "lesion_detection": ("detection", {"name": "lesion_detection", "max_size": 64})}


def _write(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_import_closure_on_a_toy_package(tmp_path):
    _write(tmp_path, {
        "medssl/__init__.py": "",
        "medssl/a.py": "import numpy\nfrom medssl.b import x\nfrom medssl.pkg import y\n\n"
                       "def f():\n    from . import c\n",
        "medssl/b.py": "x = 1\n",
        "medssl/c.py": "",
        "medssl/d.py": "",  # reached only through a dispatcher's lazy import: not part of a's code
        "medssl/pkg/__init__.py": "from medssl.pkg.e import y\n\ndef build():\n    import medssl.d\n",
        "medssl/pkg/e.py": "y = 2\n",
        "medssl/pkg/f.py": "",
    })
    assert code_files(["medssl.a"], tmp_path) == ["medssl/__init__.py", "medssl/a.py", "medssl/b.py", "medssl/c.py",
                                                  "medssl/pkg/__init__.py", "medssl/pkg/e.py"]
    # importing a submodule runs (so hashes) the package's __init__, without following its lazy imports
    assert code_files(["medssl.pkg.f"], tmp_path) == ["medssl/__init__.py", "medssl/pkg/__init__.py",
                                                      "medssl/pkg/f.py"]
    with pytest.raises(FileNotFoundError, match="medssl.nope"):
        code_files(["medssl.nope"], tmp_path)


def test_fingerprint_is_the_hash_of_paths_and_contents(tmp_path):
    _write(tmp_path, {"b/y.py": "y = 2\n", "a/x.py": "x = 1\n"})
    sha = {rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in (("a/x.py", "x = 1\n"),
                                                                             ("b/y.py", "y = 2\n"))}
    expected = hashlib.sha256(f"a/x.py\0{sha['a/x.py']}\nb/y.py\0{sha['b/y.py']}\n".encode()).hexdigest()[:16]
    assert code_fingerprint(["b/y.py", "a/x.py"], tmp_path) == expected
    os.utime(tmp_path / "a/x.py", (1, 1))  # mtimes do not count
    assert code_fingerprint(["a/x.py", "b/y.py"], tmp_path) == expected


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of the repository's Python sources outside git (as a fresh clone elsewhere would hold them)."""
    dst = tmp_path_factory.mktemp("clone")
    for pkg in ("medssl", "benchmarks", "data_tools"):
        shutil.copytree(provenance.ROOT / pkg, dst / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "results", "*.pt"))
    return dst


def _keys(root):
    return {name: cell_key(task=spec, protocol="finetune", seed=0, code=cell_code(kind, spec, root)["fingerprint"])
            for name, (kind, spec) in SPECS.items()}


def test_key_follows_the_code_of_its_cell_kind(clone):
    real = {name: cell_code(kind, spec) for name, (kind, spec) in SPECS.items()}
    here = {name: cell_code(kind, spec, clone) for name, (kind, spec) in SPECS.items()}
    for name in SPECS:  # same sources at another path: same files and fingerprint; no git there
        assert here[name]["files"] == real[name]["files"]
        assert here[name]["fingerprint"] == real[name]["fingerprint"]
        assert here[name]["commit"] == "unknown"
    assert "medssl/heads/fit.py" in real["image_qc"]["files"]
    for name in ("image_qc", "brain_tissue"):
        assert not any(f.startswith(("medssl/detection/", "data_tools/")) for f in real[name]["files"])
    # the demo generator can build the lesion-trained expert (data_tools.demo_expert fine-tunes with medssl.heads),
    # so detection cells follow the heads' training code too
    assert "medssl/heads/fit.py" in real["lesion_detection"]["files"]
    assert "medssl/detection/matcher.py" in real["lesion_detection"]["files"]
    base = _keys(clone)
    assert base == _keys(clone)  # deterministic
    edits = {  # file -> the tasks whose cells it computes
        "medssl/detection/matcher.py": {"lesion_detection"},
        "medssl/heads/fit.py": {"brain_tissue", "image_qc", "lesion_detection"},
        "benchmarks/tasks/qc.py": {"image_qc"},
        "benchmarks/tasks/brain.py": {"brain_tissue"},
        "medssl/models/vit.py": {"brain_tissue", "image_qc", "lesion_detection"},
        "medssl/train/optim.py": {"brain_tissue", "image_qc", "lesion_detection"},
        "benchmarks/cells.py": {"brain_tissue", "image_qc", "lesion_detection"},
        "benchmarks/provenance.py": {"brain_tissue", "image_qc", "lesion_detection"},
        "medssl/heads/build.py": {"brain_tissue", "image_qc", "lesion_detection"},
        "medssl/heads/knn.py": {"brain_tissue", "image_qc"},
        "medssl/heads/features.py": {"brain_tissue", "image_qc", "lesion_detection"},
    }
    for rel, affected in edits.items():
        path = clone / rel
        text = path.read_text()
        try:
            path.write_text(text + "\n# an edit\n")
            changed = {name for name, key in _keys(clone).items() if key != base[name]}
        finally:
            path.write_text(text)
        assert changed == affected, rel
    os.utime(clone / "medssl/heads/fit.py", (1, 1))  # a touched file (new mtime, same content) changes nothing
    assert _keys(clone) == base


def test_dense_code_covers_what_cells_imports():
    """Every medssl module that benchmarks/cells.py imports (but the detection cell's) is in the dense cells' code."""
    tree = ast.parse((provenance.ROOT / "benchmarks/cells.py").read_text())
    modules = {n.module for n in ast.walk(tree)  # lazy imports too, but not the detection cell's
               if isinstance(n, ast.ImportFrom) and n.module.startswith("medssl") and ".detection." not in n.module}
    modules.discard("medssl.data.holdout")  # hashes the backbone's files for its identity; computes no result
    files = set(code_files(provenance.CODE_ENTRIES["dense"]))
    assert modules and {provenance.module_file(m).relative_to(provenance.ROOT).as_posix() for m in modules} <= files
    assert set(provenance.CELL_FILES) <= set(cell_code("classification", {"name": "image_qc"})["files"])
    for module in provenance.TASK_MODULES.values():
        assert provenance.module_file(module) is not None, module


def test_git_commit_and_dirty(tmp_path):
    assert git_commit(["a.py"], tmp_path) == "unknown"  # not a git checkout
    _write(tmp_path, {"a.py": "a = 1\n", "other.py": "b = 1\n"})

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "a.py", "other.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert len(head) == 40 and git_commit(["a.py"], tmp_path) == head
    (tmp_path / "other.py").write_text("b = 2\n")  # a change outside the cell's code
    assert git_commit(["a.py"], tmp_path) == head
    (tmp_path / "a.py").write_text("a = 2\n")
    assert git_commit(["a.py"], tmp_path) == head + "+dirty"
    (tmp_path / "a.py").write_text("a = 1\n")
    _write(tmp_path, {"new.py": ""})  # an untracked file of the cell's code
    assert git_commit(["a.py", "new.py"], tmp_path) == head + "+dirty"


def test_cached_cell_stores_meta_and_report_names_commits(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"metrics": {"auc": 0.75}}

    meta = {"commit": "0123456789abcdef0123456789abcdef01234567+dirty", "fingerprint": "f" * 16}
    res, hit = cached_cell(tmp_path / "cells", "k1", compute, meta=meta)
    assert not hit and res == {"metrics": {"auc": 0.75}, **meta}
    assert json.loads((tmp_path / "cells" / "k1.json").read_text()) == res
    res2, hit2 = cached_cell(tmp_path / "cells", "k1", compute, meta={"commit": "other"})
    assert hit2 and res2 == res and len(calls) == 1

    def row(seed, commit):
        r = {"task": "qc", "kind": "classification", "fraction": 1.0, "seed": seed, "row": "r", "protocol": "p",
             "pretraining": "MAE", "data": "-", "backbone": "B", "role": "pretrained", "n_train": 4,
             "seconds": 1.0, "metrics": {"auc": 0.5 + seed / 10}}
        return {**r, "commit": commit} if commit else r

    rows = [row(0, meta["commit"]), row(1, meta["commit"]), row(2, "unknown"), row(3, None)]
    paths = write_all(rows, {}, tmp_path / "out", "Header.")
    md = paths["md"].read_text()
    names = "`0123456789ab+dirty` (2 cells), `unknown` (1 cell), `unrecorded` (1 cell)"
    assert md.startswith(f"Header.\n\nCells computed at commit {names}.")
    assert f"Labels: all (4), seeds: 4; computed at commit {names}" in md
    (line,) = csv.DictReader(open(paths["csv"]))
    assert line["commits"] == "0123456789ab+dirty unknown unrecorded"
