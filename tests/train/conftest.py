import numpy as np
import pytest

from medssl.data.shard_writer import write_array_shards


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory):
    """Three small shards of random 2-D uint8 images with smooth structure (so MAE can learn)."""
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48]

    def image(i):
        f = rng.uniform(0.05, 0.3, size=2)
        img = 127 + 80 * np.sin(f[0] * yy + i) * np.cos(f[1] * xx) + rng.normal(0, 8, yy.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    write_array_shards((image(i) for i in range(96)), out, samples_per_shard=32)
    return out


TINY = ["model.name=mae_vit_tiny_patch8", "data.img_size=32", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "data.num_workers=0", "data.shuffle_buffer=16",
        "train.batch_size=8", "train.precision=fp32", "output.log_every=1", "output.figure_every=0",
        "train.lr=1e-3", "train.epochs=2", "train.warmup_epochs=1"]


@pytest.fixture(scope="session")
def toy_volume_shards(tmp_path_factory):
    """Two shards of small smooth uint8 volumes (a few shallower than a 16^3 crop, to be padded)."""
    out = tmp_path_factory.mktemp("volume_shards")
    rng = np.random.default_rng(0)

    def volume(i):
        d = 12 if i % 5 == 0 else 20
        zz, yy, xx = np.mgrid[0:d, 0:20, 0:24]
        f = rng.uniform(0.1, 0.4, size=3)
        vol = 127 + 80 * np.sin(f[0] * zz + i) * np.cos(f[1] * yy) * np.sin(f[2] * xx) + rng.normal(0, 6, zz.shape)
        return np.clip(vol, 0, 255).astype(np.uint8)

    write_array_shards((volume(i) for i in range(32)), out, samples_per_shard=16)
    return out


TINY_3D = ["data.dims=3", "model.name=mae_vit_tiny_patch8", "data.img_size=16", "model.decoder_embed_dim=48",
           "model.decoder_depth=1", "model.decoder_num_heads=2", "data.num_workers=0", "data.shuffle_buffer=8",
           "train.batch_size=4", "train.precision=fp32", "output.log_every=1", "output.figure_every=0",
           "train.lr=1e-3", "train.epochs=2", "train.warmup_epochs=1"]
