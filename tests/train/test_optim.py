"""Optimizer helpers against the MAE recipe's formulas and torch's reference AdamW."""

import math

import pytest
import torch
import torch.nn as nn

from medssl.train.optim import cosine_lr, make_adamw, param_groups, scaled_lr, set_lr


def test_cosine_lr_matches_the_mae_schedule():
    base, warm, total, floor = 1e-3, 10, 110, 1e-5
    assert cosine_lr(0, total, warm, base, floor) == 0.0
    assert cosine_lr(5, total, warm, base, floor) == pytest.approx(5e-4)
    assert cosine_lr(10, total, warm, base, floor) == pytest.approx(base)
    # half way through the cosine part: exactly the mid point between base and floor
    assert cosine_lr(60, total, warm, base, floor) == pytest.approx((base + floor) / 2)
    assert cosine_lr(110, total, warm, base, floor) == pytest.approx(floor)
    assert cosine_lr(500, total, warm, base, floor) == pytest.approx(floor)  # clamped after the end
    step = 37.5
    expected = floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    assert cosine_lr(step, total, warm, base, floor) == pytest.approx(expected)


def test_scaled_lr_is_the_linear_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_param_groups_split_decay_and_apply_layer_scales():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, 0.05, layer_id=lambda n: int(n.split(".")[0]), layer_decay=0.5, num_layers=2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.bias"}  # frozen weight left out
    assert by_name["0.weight"]["weight_decay"] == 0.05
    assert all(by_name[n]["weight_decay"] == 0.0 for n in ("0.bias", "1.weight", "1.bias", "2.bias"))
    assert by_name["0.weight"]["lr_scale"] == 0.25 and by_name["1.bias"]["lr_scale"] == 0.5
    assert by_name["2.bias"]["lr_scale"] == 1.0
    opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1.0)
    set_lr(opt, 0.1)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.025, 0.025, 0.05, 0.1])


def test_make_adamw_is_fused_on_cpu_and_matches_the_reference_update():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    b = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())
    ours = make_adamw(param_groups(a, 0.05), lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in param_groups(b, 0.05)],
                            lr=1e-2, betas=(0.9, 0.95), foreach=False)
    assert ours.defaults["fused"] is True and not ref.defaults["fused"]
    for _ in range(5):
        x = torch.randn(32, 8)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_make_adamw_falls_back_when_a_parameter_cannot_be_fused():
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    assert not make_adamw([p], lr=1e-3).defaults["fused"]
    q = nn.Parameter(torch.zeros(3, device="meta"))  # a device without the fused kernel
    assert not make_adamw([q], lr=1e-3).defaults["fused"]


def test_make_adamw_keeps_parameters_given_as_generators():
    model = nn.Linear(3, 2)
    opt = make_adamw([{"params": model.parameters(), "weight_decay": 0.0}], lr=1e-3)
    assert [p.shape for p in opt.param_groups[0]["params"]] == [(2, 3), (2,)]
