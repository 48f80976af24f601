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
