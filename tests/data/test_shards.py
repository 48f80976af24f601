import io
import itertools
import json
import random
import tarfile

import numpy as np
import pytest
import torch

from medssl.data import shards as shards_mod
from medssl.data.shard_writer import shard_keys, write_array_shards, write_info
from medssl.data.shards import ShardStream, count_samples, expand_urls, make_loader, random_resized_crop
from medssl.utils import stable_seed


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


@pytest.mark.parametrize("workers, rank, world, resampled", [(0, 0, 1, False), (2, 0, 1, False), (2, 1, 2, True)])
def test_late_resume_seeks_without_reading_earlier_samples(shards, workers, rank, world, resampled, monkeypatch):
    """Batches 301.. (20+ epochs in) after a resume equal the uninterrupted run's; at most one block is read."""
    kw = dict(num_workers=workers, shuffle_buffer=7, rank=rank, world_size=world, resampled=resampled)
    full = iter(make_loader(shards, 16, 3, **kw))
    ref = [next(full) for _ in range(304)]
    start = 301
    if workers == 0:  # count the samples the resumed stream reads from the shards
        reads = []
        real = shards_mod.read_shard
        monkeypatch.setattr(shards_mod, "read_shard",
                            lambda url, a, b: (reads.append(s) or s for s in real(url, a, b)))
    it = iter(make_loader(shards, 16, 3, start_step=start, **kw))
    for k in range(start, 304):
        assert torch.equal(next(it), ref[k])
    if workers == 0:  # 3 batches of 3 from a block of 7: at most 6 samples before the resume point, + 9 used
        assert len(reads) <= 7 + 9


def test_stream_positions_by_hand(shards):
    """A reader's stream is its epoch's shards in order, cut into blocks of `shuffle_buffer`, each permuted."""
    stream = ShardStream(expand_urls(shards), 16, 1, shuffle_buffer=7, rank=1, world_size=2, seed=5)
    got = [(p, s["__key__"]) for p, s in itertools.islice(stream.positions(1, 2), 45)]
    keys = [shard_keys(u) for u in stream.urls]
    expect, pos = [], 0
    for epoch in range(3):
        epoch_keys = [k for i in stream.epoch_shards(1, 2, epoch) for k in keys[i]]  # 2 shards of 10
        for b in range(0, len(epoch_keys), 7):
            block = epoch_keys[b:b + 7]
            order = list(range(len(block)))
            random.Random(stable_seed(5, 2, 1, epoch, b // 7)).shuffle(order)
            expect += [(pos + b + i, block[j]) for i, j in enumerate(order)]
        pos += len(epoch_keys)
    assert got == expect[:45]
    assert list(itertools.islice(stream.positions(1, 2, 33), 12)) == \
        list(itertools.islice(stream.positions(1, 2), 33, 45))


def test_ranks_read_disjoint_shards(shards):
    seen = []
    for rank in (0, 1):
        stream = ShardStream(expand_urls(shards), 16, 1, rank=rank, world_size=2, shuffle_buffer=1)
        seen.append({s["__url__"] for _, s in itertools.islice(stream.positions(rank, 2), 20)})
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
    batches = [next(it) for _ in range(4)]  # positions 0-7: s0 s1 s2 s3 s4 s5 s9 | s0 (one block per sample)
    assert all(b.shape == (2, 1, 8, 8) for b in batches)
    assert stream.corrupt == 4  # s1, s3, s5, s9 counted once each
    # a corrupt position takes the next readable sample, cropped with its own position's generator
    good = torch.full((1, 20, 20), 7 / 255)
    for k, pos in ((0, 1), (1, 3), (2, 5), (3, 6)):
        g = torch.Generator().manual_seed(stable_seed(0, 3, 0, pos))
        ref = (random_resized_crop(good, 8, (0.2, 1.0), (3 / 4, 4 / 3), True, g) - 0.5) / 0.25
        assert torch.allclose(batches[k][pos % 2], ref)


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
    write_info(tmp_path)  # list the added sample
    loader = make_loader(tmp_path, 8, 2, num_workers=2, shuffle_buffer=1)
    it = iter(loader)
    for _ in range(6):
        next(it)
    assert loader.dataset.corrupt >= 1
