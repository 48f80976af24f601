"""Expert embeddings: file naming, shapes, L2 rows, pooling by hand, saved backbones, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import medssl
from data_tools.extract_embeddings import extract_embeddings, main


def _images(folder, n=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 65535, (40, 30)).astype(np.uint16)).save(folder / f"img{i}.png")
    return sorted(folder.glob("*.png"))


def test_cli_writes_normalised_rows(tmp_path, capsys):
    _images(tmp_path / "imgs")
    assert main(["--model", "vit_tiny_patch16", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "e"),
                 "--img-size", "32", "--grid", "0"]) == 0
    files = sorted((tmp_path / "e").glob("*.npy"))
    assert [f.name for f in files] == [f"img{i}_embedding.npy" for i in range(3)]
    e = np.load(files[0])
    assert e.dtype == np.float32 and e.shape == (5, 192)  # cls + all 2 x 2 patch tokens
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert "wrote 3 embeddings of shape (5, 192)" in capsys.readouterr().out


def test_pooling_by_hand_and_saved_backbone(tmp_path):
    files = _images(tmp_path / "imgs", n=2)
    torch.manual_seed(3)
    model = medssl.load_backbone("vit_tiny_patch16", img_size=32, in_chans=1).eval()
    medssl.save_backbone(model, tmp_path / "bb")
    out = extract_embeddings(str(tmp_path / "bb"), files, tmp_path / "e", grid=1, img_size=32)
    e = np.load(out[1])  # cls + the mean of the 4 patch tokens
    img = torch.from_numpy(np.asarray(Image.open(files[1])).astype(np.float32) / 65535)[None, None]
    x = torch.nn.functional.interpolate(img, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        tok = model.forward_features((x - 0.5) / 0.25)[0].numpy()  # [1 + 4, 192]
    ref = np.stack([tok[0], tok[1:].mean(0)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(e, ref, atol=1e-5)


def test_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b" / "x.png")
    with pytest.raises(ValueError, match="unique"):
        extract_embeddings("vit_tiny_patch16", [tmp_path / "a/x.png", tmp_path / "b/x.png"], tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--images"):
        main(["--model", "vit_tiny_patch16", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    with pytest.raises((ImportError, FileNotFoundError), match="BiomedParse"):
        extract_embeddings("biomedparse:/no/such.pt", [tmp_path / "a/x.png"], tmp_path / "o")
