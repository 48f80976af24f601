import io
import json
import tarfile

import numpy as np
import pytest
import torch

from medssl.data.shard_writer import write_array_shards
from medssl.data.shards import ShardStream, count_samples, expand_urls, make_loader, random_resized_crop


@pytest.fixture()
def shards(tmp_path):
    rng = np.random.default_rng(1)
    write_array_shards((rng.integers(0, 65535, (30, 36), dtype=np.uint16) for _ in range(40)), tmp_path,
                       samples_per_shard=10)
    return tmp_path


def test_expand_and_count(shards):
    urls = expand_urls(str(shards / "lumid-{000000..000003}.tar"))
    assert len(urls) == 4 and urls == expand_urls(shards)
    assert count_samples(urls) == 40
    with pytest.raises(FileNotFoundError, match="lumid-000008.tar does not exist"):
        expand_urls(str(shards / "lumid-{000008..000009}.tar"))


def test_batches_are_normalised_and_deterministic(shards):
    a = next(iter(make_loader(shards, 16, 4, mean=(0.5,), std=(0.25,), shuffle_buffer=8)))
    b = next(iter(make_loader(shards, 16, 4, mean=(0.5,), std=(0.25,), shuffle_buffer=8)))
    assert a.shape == (4, 1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # uint16 scaled to [0, 1] before (x - 0.5) / 0.25
    assert a.min() >= -2.0 - 1e-6 and a.max() <= 2.0 + 1e-6
    c = next(iter(make_loader(shards, 16, 4, shuffle_buffer=8, seed=1)))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("workers", [0, 2])
def test_start_step_resumes_the_exact_stream(shards, workers):
    full = iter(make_loader(shards, 16, 4, num_workers=workers, shuffle_buffer=8))
    ref = [next(full) for _ in range(12)]  # 12 batches of 4 > 40 samples: crosses an epoch
    for start in (1, 5, 11):
        it = iter(make_loader(shards, 16, 4, num_workers=workers, shuffle_buffer=8, start_step=start))
        assert torch.equal(next(it), ref[start])


def test_ranks_read_disjoint_shards(shards):
    seen = []
    for rank in (0, 1):
        stream = ShardStream(expand_urls(shards), 16, 1, rank=rank, world_size=2, shuffle_buffer=1)
        seen.append({s["__url__"] for s, _ in zip(stream._samples(0, 1), range(20))})
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 4


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    np.save(buf, np.full((20, 20), 7, np.uint8))
    good = buf.getvalue()
    with tarfile.open(tmp_path / "lumid-000000.tar", "w") as tar:
        for i in range(6):
            payload = good if i % 2 == 0 else b"not an npy file"
            member(tar, f"s{i}.npy", payload)
            member(tar, f"s{i}.json", json.dumps({"i": i}).encode())
        buf3 = io.BytesIO()
        np.save(buf3, np.zeros((2, 3, 4), np.uint8))
        member(tar, "s9.npy", buf3.getvalue())  # 3-D: wrong shape
    stream = ShardStream(expand_urls(tmp_path), 8, 2, shuffle_buffer=1)
    it = iter(stream)
    batches = [next(it) for _ in range(3)]  # 6 good samples = two passes over the shard
    assert all(b.shape == (2, 1, 8, 8) for b in batches)
    assert stream.corrupt >= 3  # every bad sample of the first pass was counted


def test_random_resized_crop_bounds():
    img = torch.arange(100.0).reshape(1, 10, 10) / 100
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = random_resized_crop(img, 8, (0.2, 1.0), (3 / 4, 4 / 3), True, g)
        assert out.shape == (1, 8, 8) and 0 <= out.min() and out.max() <= 1


def test_empty_or_all_corrupt_shards_raise_instead_of_spinning(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "lumid-000000.tar", "w"):
        pass
    with pytest.raises(ValueError, match="no samples could be read"):
        next(iter(make_loader(empty, 8, 2)))
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "lumid-000000.tar", "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"s{i}.npy")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"junk!"))
    stream = ShardStream(expand_urls(bad), 8, 2, shuffle_buffer=1)
    with pytest.raises(ValueError, match="corrupt samples in a row"):
        next(iter(stream))
    assert stream.corrupt > 10_000


def test_corrupt_count_is_shared_with_workers(tmp_path):
    rng = np.random.default_rng(0)
    write_array_shards((rng.integers(0, 255, (12, 12), dtype=np.uint8) for _ in range(6)), tmp_path, 3)
    with tarfile.open(tmp_path / "lumid-000001.tar", "a") as tar:
        info = tarfile.TarInfo("zz.npy")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    loader = make_loader(tmp_path, 8, 2, num_workers=2, shuffle_buffer=1)
    it = iter(loader)
    for _ in range(6):
        next(it)
    assert loader.dataset.corrupt >= 1
