"""The shared training loop: schedule, best-on-val restore, cached probes, bad config."""

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from medssl.heads.classify import LinearProbe
from medssl.heads.fit import FitConfig, fit, predict

from ._vit import tiny_vit

torch.set_num_threads(1)


def _toy(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 32, 32, generator=g) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def _acc(out, tgt):
    return (out.argmax(1) == tgt).float().mean().item()


def test_cached_probe_learns_and_backbone_untouched():
    torch.manual_seed(0)
    vit = tiny_vit()
    before = copy.deepcopy(vit.state_dict())
    probe = LinearProbe(vit, 2, pool="mean")
    cfg = FitConfig(epochs=15, batch_size=16, lr=0.05, warmup_epochs=1, device="cpu")
    res = fit(probe, _toy(), _toy(seed=1), torch.nn.functional.cross_entropy, _acc, cfg)
    out, tgt = predict(probe, _toy(seed=2))
    assert _acc(out, tgt) > 0.9 and res.best_score > 0.9
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_best_epoch_weights_are_restored():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2))
    scores = iter([0.2, 0.9, 0.1])
    snaps = []

    def score(out, tgt):
        snaps.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    cfg = FitConfig(epochs=3, batch_size=16, lr=0.01, warmup_epochs=0, device="cpu")
    res = fit(model, _toy(), _toy(seed=1), torch.nn.functional.cross_entropy, score, cfg)
    assert res.best_epoch == 1 and res.best_score == 0.9 and len(res.history) == 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snaps[1][k])


def test_bad_config_and_no_params():
    with pytest.raises(ValueError, match="epochs"):
        FitConfig(epochs=0)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        fit(frozen, TensorDataset(torch.randn(4, 2), torch.zeros(4).long()), None,
            torch.nn.functional.cross_entropy, _acc, FitConfig(epochs=1, device="cpu"))


def test_fit_with_balanced_sampler_and_flip_augment():
    from medssl.heads.classify import balanced_sampler
    from medssl.heads.fit import random_hflip

    data = _toy(40)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2))
    cfg = FitConfig(epochs=3, batch_size=8, lr=0.01, warmup_epochs=0, device="cpu")
    sampler = balanced_sampler(data.tensors[1].numpy(), torch.Generator().manual_seed(0))
    res = fit(model, data, _toy(seed=1), torch.nn.functional.cross_entropy, _acc, cfg, sampler=sampler,
              augment=random_hflip)
    assert res.best_score > 0.8 and len(res.history) == 3
    x = torch.arange(8.0).view(2, 1, 2, 2)
    y = torch.arange(8).view(2, 2, 2)
    torch.manual_seed(0)
    fx, fy = random_hflip(x, y)
    for i in range(2):  # image and mask flipped together or not at all
        flipped = torch.equal(fx[i, 0], x[i, 0].flip(-1))
        assert flipped == torch.equal(fy[i], y[i].flip(-1))
    x3, y3 = torch.arange(64.0).view(4, 1, 2, 2, 4), torch.arange(64).view(4, 2, 2, 4)  # volumes, left-right last
    torch.manual_seed(1)
    fx, fy = random_hflip(x3, y3)
    assert fx.shape == x3.shape and fy.shape == y3.shape
    flips = [torch.equal(fx[i, 0], x3[i, 0].flip(-1)) for i in range(4)]
    assert any(flips) and not all(flips)
    for i in range(4):
        assert torch.equal(fx[i, 0], x3[i, 0].flip(-1) if flips[i] else x3[i, 0])
        assert torch.equal(fy[i], y3[i].flip(-1) if flips[i] else y3[i])


def test_validation_predictions_are_float32_under_bf16_training():
    """fit's validation (which picks the epoch kept) runs in float32, like the final test scoring."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2))
    seen = []
    model.register_forward_hook(lambda m, i, o: None if m.training else seen.append(torch.is_autocast_enabled("cpu")))
    cfg = FitConfig(epochs=1, batch_size=16, lr=0.01, warmup_epochs=0, device="cpu", precision="bf16")
    fit(model, _toy(), _toy(seed=1), torch.nn.functional.cross_entropy, lambda out, tgt: 0.5, cfg)
    assert seen and not any(seen)  # every validation forward ran without bf16 autocast
