import numpy as np
import pytest
import torch

from medssl.models.pos_embed import resample_pos_embed, sincos_2d


def _official_sincos(embed_dim, gh, gw):
    """The official MAE construction, written out independently in numpy (grid built width first)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # w first
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("dim,gh,gw", [(64, 4, 4), (192, 14, 14), (32, 3, 5)])
def test_sincos_matches_official(dim, gh, gw):
    ours = sincos_2d(dim, (gh, gw), cls_token=True).numpy()
    np.testing.assert_allclose(ours, _official_sincos(dim, gh, gw), atol=1e-6)


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 4)


def test_resample_keeps_cls_and_identity():
    pe = torch.randn(1, 1 + 4 * 6, 8)
    assert resample_pos_embed(pe, (4, 6), (4, 6)) is pe
    out = resample_pos_embed(pe, (8, 3), (4, 6))
    assert out.shape == (1, 1 + 8 * 3, 8)
    assert torch.equal(out[:, :1], pe[:, :1])
    # bicubic of a constant grid stays constant
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 24, 8), 2.5)], dim=1)
    torch.testing.assert_close(resample_pos_embed(const, (7, 5), (4, 6))[:, 1:], torch.full((1, 35, 8), 2.5))
