"""Run by test_ms_deform_triton.py in a fresh process: the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, hence a separate process. Forward against the
per-point bilinear loop and gradients against autograd through the per-level grid_sample form, float64,
with odd level sizes (7x5, 3x3, 2x1), head_dim 3 (not a power of two) and points outside the map.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from test_deformable_attn import _bilinear_loop, _inputs  # noqa: E402

from medssl.detection.deformable_attn import (  # noqa: E402
    ms_deform_attn,
    ms_deform_attn_projected,
    ms_deform_attn_reference,
)


def main() -> None:
    value, shapes, loc, attn = _inputs(torch.float64, n=2, lq=5, m=2, d=3, p=2, shapes=((7, 5), (3, 3), (2, 1)))
    assert ((loc < 0) | (loc > 1)).any(), "the check needs points outside the map"
    out = ms_deform_attn(value, shapes, loc, attn, impl="triton")
    torch.testing.assert_close(out, _bilinear_loop(value, shapes, loc, attn))
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    grads = []
    for impl in ("triton", "reference"):
        args = [t.clone().requires_grad_() for t in (value, loc, attn)]
        fn = ms_deform_attn if impl == "triton" else ms_deform_attn_reference
        kw = {"impl": "triton"} if impl == "triton" else {}
        (fn(args[0], shapes, args[1], args[2], **kw) * weights).sum().backward()
        grads.append([a.grad for a in args])
    for name, got, ref in zip(("value", "locations", "attention"), *grads, strict=True):
        torch.testing.assert_close(got, ref, msg=lambda m, name=name: f"grad of {name}: {m}")
    # value projection + attention with recomputation (the module's path) on the Triton kernels
    from test_deformable_attn import _projected_expected, _projected_inputs

    x, weight, bias, pad, shapes, loc, attn = _projected_inputs(torch.float64)
    grads = []
    for impl in ("triton", "reference"):
        args = [t.clone().requires_grad_() for t in (x, weight, bias, loc, attn)]
        if impl == "triton":
            out = ms_deform_attn_projected(args[0], args[1], args[2], shapes, args[3], args[4], pad, impl="triton")
        else:
            out = _projected_expected(args[0], args[1], args[2], pad, shapes, args[3], args[4])
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([out.detach()] + [a.grad for a in args])
    for name, got, ref in zip(("out", "x", "weight", "bias", "loc", "attn"), *grads, strict=True):
        torch.testing.assert_close(got, ref, msg=lambda m, name=name: f"projected {name}: {m}")
    print("triton interpreter: forward and gradients match")


if __name__ == "__main__":
    main()
