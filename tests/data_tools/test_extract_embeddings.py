"""Expert embeddings: file naming, shapes, L2 rows, pooling by hand, saved backbones, open_clip, resume,
bad images in the manifest, two torchrun ranks, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import medssl
from data_tools.extract_embeddings import extract_embeddings, main
from medssl.detection.medmask import EmbeddingStore

ROOT = Path(__file__).resolve().parents[2]


def _images(folder, n=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 65535, (40, 30)).astype(np.uint16)).save(folder / f"img{i}.png")
    return sorted(folder.glob("*.png"))


def _manifest(out):
    return {Path(r["image"]).name: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _grey(path, size):
    """The image as the tool reads it: uint16 / 65535, bilinear antialiased resize -> [1, 1, S, S]."""
    img = torch.from_numpy(np.asarray(Image.open(path)).astype(np.float32) / 65535)[None, None]
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_cli_writes_normalised_rows(tmp_path, capsys):
    _images(tmp_path / "imgs")
    assert main(["--model", "vit_tiny_patch16", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "e"),
                 "--img-size", "32", "--grid", "0", "--workers", "0", "--device", "cpu"]) == 0
    files = sorted((tmp_path / "e").glob("*.npy"))
    assert [f.name for f in files] == [f"img{i}_embedding.npy" for i in range(3)]
    e = np.load(files[0])
    assert e.dtype == np.float32 and e.shape == (5, 192)  # cls + all 2 x 2 patch tokens
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert "3 images: 3 embeddings written of shape (5, 192), 0 already there, 0 skipped" in capsys.readouterr().out
    rows = _manifest(tmp_path / "e")
    assert {r["status"] for r in rows.values()} == {"written"} and rows["img2.png"]["shape"] == [5, 192]
    assert torch.equal(EmbeddingStore(tmp_path / "e").load(tmp_path / "imgs" / "img1.png"), torch.from_numpy(np.load(
        files[1])))


def test_pooling_by_hand_and_saved_backbone(tmp_path):
    """A medssl backbone folder (what MAE pretraining writes) as the expert: cls + pooled patch tokens."""
    files = _images(tmp_path / "imgs", n=2)
    torch.manual_seed(3)
    model = medssl.load_backbone("vit_tiny_patch16", img_size=32, in_chans=1).eval()
    medssl.save_backbone(model, tmp_path / "bb")
    rows = extract_embeddings(str(tmp_path / "bb"), files, tmp_path / "e", grid=1, img_size=32, progress=False)
    e = np.load(rows[1]["embedding"])  # cls + the mean of the 4 patch tokens
    with torch.no_grad():
        tok = model.forward_features((_grey(files[1], 32) - 0.5) / 0.25)[0].numpy()  # [1 + 4, 192]
    ref = np.stack([tok[0], tok[1:].mean(0)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(e, ref, atol=1e-5)


def test_resume_skips_written_files_and_refuses_another_expert(tmp_path, monkeypatch):
    import data_tools.extract_embeddings as tool

    batches = []  # the batch sizes the expert sees: a resumed run must batch exactly as the killed one did
    load = tool.load_expert

    def recording(*a, **k):
        expert = load(*a, **k)
        inner = expert.embed
        expert.embed = lambda x: (batches.append(len(x)), inner(x))[1]
        return expert

    monkeypatch.setattr(tool, "load_expert", recording)
    files = _images(tmp_path / "imgs", n=4)
    out = tmp_path / "e"
    kw = dict(grid=1, img_size=32, batch_size=3, progress=False)
    extract_embeddings("vit_tiny_patch16", files, out, **kw)
    first = {f.name: f.read_bytes() for f in out.glob("*.npy")}
    # a killed run: two files never written, a temporary file left behind, a stale manifest part
    (out / "img1_embedding.npy").unlink()
    (out / "img3_embedding.npy").unlink()
    (out / ".img3_embedding.npy.999.tmp").write_bytes(b"half")
    keep = (out / "img0_embedding.npy").stat().st_mtime_ns
    batches.clear()
    rows = extract_embeddings("vit_tiny_patch16", files, out, **kw)
    assert batches == [3, 1]  # img0-2 (img1 missing) and img3, as in the first run; not [img1, img3]
    assert [r["status"] for r in rows] == ["exists", "written", "exists", "written"]
    assert (out / "img0_embedding.npy").stat().st_mtime_ns == keep
    # same bytes as the uninterrupted run, on every CPU kind: the resumed run recomputes the original batches
    assert {f.name: f.read_bytes() for f in out.glob("*.npy")} == first
    assert [r["status"] for r in _manifest(out).values()] == ["exists", "written", "exists", "written"]
    assert not list(out.glob(".manifest-rank*"))
    later = (out / "img2_embedding.npy").stat().st_mtime_ns + 10**9
    os.utime(files[2], ns=(later, later))  # an image changed after its embedding was written: redone
    assert [r["status"] for r in extract_embeddings("vit_tiny_patch16", files, out, **kw)] == \
        ["exists", "exists", "written", "exists"]
    with pytest.raises(ValueError, match="another expert"):
        extract_embeddings("vit_tiny_patch16", files, out, **{**kw, "grid": 2})
    rows = extract_embeddings("vit_tiny_patch16", files, out, **{**kw, "grid": 2}, overwrite=True)
    assert {r["status"] for r in rows} == {"written"} and np.load(rows[0]["embedding"]).shape == (5, 192)


def test_bad_images_are_recorded_and_skipped(tmp_path, capsys):
    _images(tmp_path / "imgs", n=2)
    good = (tmp_path / "imgs" / "img0.png").read_bytes()
    (tmp_path / "imgs" / "cut.png").write_bytes(good[: len(good) // 2])  # a partial download
    (tmp_path / "imgs" / "text.png").write_bytes(b"not an image")
    assert main(["--model", "vit_tiny_patch16", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "e"),
                 "--img-size", "32", "--batch-size", "4", "--workers", "1", "--device", "cpu"]) == 0
    rows = _manifest(tmp_path / "e")
    assert {k: r["status"] for k, r in rows.items()} == {"cut.png": "skipped", "img0.png": "written",
                                                          "img1.png": "written", "text.png": "skipped"}
    assert "unreadable image" in rows["text.png"]["reason"] and rows["cut.png"]["reason"]
    assert sorted(f.name for f in (tmp_path / "e").glob("*.npy")) == ["img0_embedding.npy", "img1_embedding.npy"]
    assert "2 embeddings written of shape (17, 192), 0 already there, 2 skipped" in capsys.readouterr().out


VISION_TOWERS = {  # open_clip's own ViT, and a timm trunk + linear head (the layout of BiomedCLIP's image tower)
    "native": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "timm": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
             "timm_proj": "linear", "image_size": 224},
}


@pytest.mark.parametrize("tower", sorted(VISION_TOWERS))
def test_open_clip_folder_expert(tmp_path, tower):
    """A randomly initialised open_clip model saved locally; reference: open_clip's own loader + encode_image."""
    open_clip = pytest.importorskip("open_clip")
    cfg = {"embed_dim": 24, "vision_cfg": VISION_TOWERS[tower],
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
    size = VISION_TOWERS[tower]["image_size"]
    pre = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}
    torch.manual_seed(0)
    folder = tmp_path / "clip"
    folder.mkdir()
    torch.save(open_clip.CLIP(**cfg).state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    files = _images(tmp_path / "imgs", n=3)
    rows = extract_embeddings(f"open_clip:{folder}", files, tmp_path / "e", batch_size=2, progress=False)
    ref_model = open_clip.create_model(f"local-dir:{folder}").eval()
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    for f, row in zip(files, rows):
        e = np.load(row["embedding"])
        assert Path(row["embedding"]).name == f"{f.stem}_embedding.npy" and e.shape == (1, 24)
        with torch.no_grad():
            ref = ref_model.encode_image((_grey(f, size).expand(-1, 3, -1, -1) - mean) / std, normalize=True)
        np.testing.assert_allclose(e, ref.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        extract_embeddings(f"open_clip:{tmp_path}", files, tmp_path / "o2", progress=False)


@pytest.mark.slow
def test_two_torchrun_ranks_split_the_files_and_rank0_merges(tmp_path):
    files = _images(tmp_path / "imgs", n=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "data_tools.extract_embeddings", "--model", "vit_tiny_patch16", "--images", str(tmp_path / "imgs"),
           "--out", str(tmp_path / "e"), "--img-size", "32", "--grid", "1", "--workers", "0", "--device", "cpu",
           "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _manifest(tmp_path / "e")
    assert {k: r["rank"] for k, r in rows.items()} == {f"img{i}.png": i % 2 for i in range(5)}
    assert {r["status"] for r in rows.values()} == {"written"} and not list((tmp_path / "e").glob(".manifest-*"))
    single = extract_embeddings("vit_tiny_patch16", files, tmp_path / "one", grid=1, img_size=32, progress=False)
    # Same expert (seeded), same files as one process, but batched 3 + 2 instead of 5: oneDNN chooses its float32
    # kernels by shape (AMX / AVX-512 blockings differ), so the last bits may differ (1.6e-7 seen on AMX). The rows
    # are unit vectors: 1e-5 is ~80 float32 ulps at 1.0, far below any real difference between two images.
    for r in single:
        np.testing.assert_allclose(np.load(r["embedding"]), np.load(tmp_path / "e" / Path(r["embedding"]).name),
                                   rtol=0, atol=1e-5)


def test_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b" / "x.png")
    with pytest.raises(ValueError, match="unique"):
        extract_embeddings("vit_tiny_patch16", [tmp_path / "a/x.png", tmp_path / "b/x.png"], tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--images"):
        main(["--model", "vit_tiny_patch16", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="generate_embedings.py in BiomedParse's environment"):
        extract_embeddings("biomedparse:/no/such.pt", [tmp_path / "a/x.png"], tmp_path / "o", progress=False)
