"""Frozen-encoder features: computed once per key, shared, and what `fit` trains a probe's head on."""

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from medssl.heads.classify import FineTuneClassifier, LinearProbe
from medssl.heads.features import FeatureCache, frozen_features, subset
from medssl.heads.fit import FitConfig, fit

from ._vit import tiny_vit

torch.set_num_threads(1)


def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return TensorDataset(torch.randn(n, 1, 32, 32, generator=g) + y.float().view(-1, 1, 1, 1), y)


def _acc(out, tgt):
    return (out.argmax(1) == tgt).float().mean().item()


def test_frozen_features_and_cache():
    torch.manual_seed(0)
    probe = LinearProbe(tiny_vit(), 2, pool="cls+mean", num_blocks=2)
    data = _data()
    feats = frozen_features(probe, data, batch_size=7)  # batches of 7: the same as one pass
    torch.testing.assert_close(feats.tensors[0], probe.features(data.tensors[0]))
    assert torch.equal(feats.tensors[1], data.tensors[1])
    assert torch.equal(subset(feats, torch.tensor([3, 1])).tensors[1], data.tensors[1][[3, 1]])
    calls = []
    counting = copy.deepcopy(probe)
    counting.features = lambda x: calls.append(len(x)) or probe.features(x)
    cache = FeatureCache(size=2)
    first = cache.get("a", counting, {"train": data, "val": _data(5, 1)})
    assert cache.get("a", counting, {"train": data, "val": _data(5, 1)}) is first and sum(calls) == 25
    cache.get("b", counting, {"train": data})
    cache.get("c", counting, {"train": data})  # the oldest key goes
    assert "a" not in cache and "b" in cache and len(cache) == 2
    with pytest.raises(ValueError, match="size"):
        FeatureCache(0)


def test_fit_on_precomputed_features_is_fit_on_images():
    cfg = FitConfig(epochs=3, batch_size=8, lr=0.05, warmup_epochs=1, device="cpu")
    train, val = _data(), _data(10, 1)
    heads = []
    for precomputed in (False, True):
        torch.manual_seed(0)
        probe = LinearProbe(tiny_vit(), 2, pool="mean")
        if precomputed:
            cached = FeatureCache().get("k", probe, {"train": train, "val": val}, batch_size=8)
            res = fit(probe, None, None, torch.nn.functional.cross_entropy, _acc, cfg,
                      features=(cached["train"], cached["val"]))
        else:
            res = fit(probe, train, val, torch.nn.functional.cross_entropy, _acc, cfg)
        heads.append((probe.head.state_dict(), res.best_score))
    for k, v in heads[0][0].items():
        torch.testing.assert_close(heads[1][0][k], v)
    assert heads[0][1] == heads[1][1]
    with pytest.raises(ValueError, match="not a cacheable"):
        fit(FineTuneClassifier(tiny_vit(), 2), None, None, torch.nn.functional.cross_entropy, _acc, cfg,
            features=(train, val))
    with pytest.raises(ValueError, match="no train_set"):
        fit(LinearProbe(tiny_vit(), 2), None, val, torch.nn.functional.cross_entropy, _acc, cfg)
