"""The two transfer recipes run end to end on tiny PNG data sets with a tiny saved backbone."""

import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.hub import save_backbone
from medssl.models.vit import build_vit
from medssl.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _run(script, args):
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "recipes" / script), run_name="__main__")
        assert exc.value.code == 0
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bb") / "backbone"
    torch.manual_seed(0)
    save_backbone(build_vit(32, 2, 2, 8, 32, 1), folder)
    return folder


def _labels(folder: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    rows = ["path,label,patient"]
    for i in range(n):
        label = i % 2
        img = rng.integers(0, 80, (32, 32)) + (120 if label else 0)  # trivially separable by brightness
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{'tumour' if label else 'normal'},P{i // 2}")
    (folder / "labels.csv").write_text("\n".join(rows))
    return folder / "labels.csv"


def _classify_args(csv: Path, backbone: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.source={csv}", f"model.backbone={backbone}", "data.img_size=32", "train.batch_size=4",
            "train.warmup_epochs=0", "train.device=cpu", "train.lr=2e-3", f"output.dir={out}", *extra]


def test_finetune_classify_recipe(tmp_path, backbone):
    from sklearn.metrics import roc_auc_score

    from medssl.heads.build import load_head

    out = tmp_path / "run"
    _run("finetune_classify.py", _classify_args(_labels(tmp_path), backbone, out, "train.epochs=8"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["normal", "tumour"] and sum(m["samples"].values()) == 24
    assert m["test"]["auc"] == 1.0  # brightness separates the classes perfectly
    assert (m["world_size"], m["steps_per_epoch"], m["global_batch"]) == (1, 4, 4)  # 16 training images / 4
    # the saved head rebuilds from its checkpoint alone, even with the backbone folder gone, and reproduces the AUC
    moved = tmp_path / "moved"
    shutil.move(str(backbone), moved)
    try:
        model, ck = load_head(out / "head.pt")
    finally:
        shutil.move(str(moved), backbone)
    assert "fc_norm.weight" in ck["model"] and ck["classes"] == m["classes"]
    from medssl.data.datasets import ClassificationDataset, classification_records, split_by_group

    records, _ = classification_records(str(tmp_path / "labels.csv"))
    split = split_by_group([r.group for r in records], [0.7, 0.15, 0.15], 0)
    test = ClassificationDataset([r for r, s in zip(records, split) if s == "test"], 32, 1)
    with torch.no_grad():
        prob = model((test.images - 0.5) / 0.25).softmax(1)[:, 1].numpy()
    assert roc_auc_score(test.labels.numpy(), prob) == pytest.approx(m["test"]["auc"])


def test_finetune_segment_recipe(tmp_path, backbone):
    rows = ["image,mask"]
    for i in range(6):
        img = np.zeros((32, 32), np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        img[4 + i:20 + i, 6:22] = 200
        mask[4 + i:20 + i, 6:22] = 1
        Image.fromarray(img).save(tmp_path / f"i{i}.png")
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        rows.append(f"i{i}.png,m{i}.png")
    (tmp_path / "pairs.csv").write_text("\n".join(rows))
    out = tmp_path / "run"
    _run("finetune_segment.py", [f"data.csv={tmp_path / 'pairs.csv'}", f"model.backbone={backbone}",
                                 "data.img_size=32", "model.decoder_dim=16", "model.blocks=2", "train.epochs=2",
                                 "train.batch_size=4", "train.warmup_epochs=0", "train.device=cpu",
                                 f"output.dir={out}"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples"] == {"train": 4, "val": 1, "test": 1}
    # the reported Dice is the Dice of the saved model on the test image, recomputed by hand
    import medssl.data.datasets as dsets
    from medssl.heads.build import load_head

    model, _ = load_head(out / "head.pt")
    assert not (out / "model.pt").exists()  # one file name for both recipes
    (out / "head.pt").rename(out / "model.pt")  # a run folder written before: still read, with a warning
    with pytest.warns(DeprecationWarning, match="model.pt"):
        old, _ = load_head(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), old.state_dict().values()))

    full = dsets.SegmentationDataset.from_csv(str(tmp_path / "pairs.csv"), 32, 2, 1, 0, 0.05)
    split = dsets.split_by_group(full.groups, [0.7, 0.15, 0.15], 0)
    (t,) = [i for i, s in enumerate(split) if s == "test"]
    with torch.no_grad():
        pred = model((full.images[t:t + 1] - 0.5) / 0.25).argmax(1)[0].numpy()
    truth = full.masks[t].numpy()
    inter = ((pred == 1) & (truth == 1)).sum()
    dice = 2 * inter / ((pred == 1).sum() + (truth == 1).sum())
    assert m["test"]["dice"] == pytest.approx(float(dice), abs=1e-6)


def test_recipe_needs_data(tmp_path, backbone):
    with pytest.raises(ValueError, match="data.source"):
        _run("finetune_classify.py", [f"output.dir={tmp_path}"])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
CLASSIFY = str(ROOT / "recipes" / "finetune_classify.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sub(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_classify_recipe_under_torchrun_and_deepspeed(tmp_path, backbone):
    """2 processes: each rank reads half the training images (steps per epoch halve), the run finishes."""
    csv = _labels(tmp_path)
    bindir = Path(sys.executable).parent
    torchrun = shutil.which("torchrun") or str(bindir / "torchrun")
    _sub([torchrun, "--nproc_per_node", "2", "--master_port", str(_port()), CLASSIFY,
          *_classify_args(csv, backbone, tmp_path / "ddp", "train.epochs=2")])
    launchers = [("ddp", None)]
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        deepspeed = shutil.which("deepspeed") or str(bindir / "deepspeed")
        _sub([deepspeed, "--num_accelerators", "2", "--master_port", str(_port()), CLASSIFY, "--deepspeed",
              "--deepspeed_config", str(ROOT / "recipes" / "configs" / "ds_zero2.json"),
              *_classify_args(csv, backbone, tmp_path / "ds", "train.epochs=2")])
        launchers.append(("ds", None))
    for name, _ in launchers:
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert (m["world_size"], m["steps_per_epoch"], m["global_batch"]) == (2, 2, 8)  # 16 images / (2 x 4)
        assert m["best_epoch"] in (0, 1) and (tmp_path / name / "head.pt").is_file()


@pytest.mark.slow
def test_classify_recipe_sigkill_then_resume_equals_uninterrupted(tmp_path, backbone):
    csv = _labels(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _sub([sys.executable, CLASSIFY, *_classify_args(csv, backbone, straight, "train.epochs=12")])
    proc = subprocess.Popen([sys.executable, CLASSIFY, *_classify_args(csv, backbone, killed, "train.epochs=12")],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "checkpoint-00000008.pt"  # the end of epoch 1 (4 steps an epoch)
    deadline = time.time() + 600
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_file() and not (killed / "metrics.json").is_file()  # killed inside the run
    _sub([sys.executable, CLASSIFY, *_classify_args(csv, backbone, killed, "train.epochs=12"), "--resume"])
    a, b = (load_checkpoint(d / "head.pt")["model"] for d in (straight, killed))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    assert ma["test"] == mb["test"] and ma["best_epoch"] == mb["best_epoch"]
