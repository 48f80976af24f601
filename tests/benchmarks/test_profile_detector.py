"""profile_detector.py charges backward work to the part whose forward created it."""

from __future__ import annotations

import torch
from torch.autograd.profiler import record_function

from benchmarks.profile_detector import PREFIX, breakdown


def test_backward_of_a_part_is_charged_to_it():
    torch.manual_seed(0)
    big = torch.randn(768, 768, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    x = torch.randn(768, 768)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with record_function(PREFIX + "big"):
            h = (x @ big).relu()  # 768^3 multiply-adds forward, twice that backward
        with record_function(PREFIX + "small"):
            y = h.mean() * scale  # a reduction and a scalar product
        y.backward()
    parts = breakdown(prof.events())
    # the large backward matmul (gradient of big) and relu belong to "big", not to the unlabelled rest
    assert parts["big"]["backward_s"] > 5 * parts["small"]["backward_s"]
    other = parts.get("heads and other model code", {"backward_s": 0.0})["backward_s"]
    assert parts["big"]["backward_s"] > 5 * other
    assert parts["big"]["forward_s"] > 5 * parts["small"]["forward_s"]
    total = sum(e.self_cpu_time_total for e in prof.events()) / 1e6
    assert abs(sum(p["forward_s"] + p["backward_s"] for p in parts.values()) - total) < 1e-6 * max(total, 1)
