"""One switch for the attention kernel: xformers | sdpa | math, chosen per call by `attn_impl`.

`auto` takes xformers' memory-efficient attention only for CUDA fp16/bf16 tensors when xformers imports,
PyTorch `scaled_dot_product_attention` otherwise. The environment variable `MEDSSL_ATTN` overrides the
default (`auto`). Each choice is logged once per process.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention

log = logging.getLogger("medssl")

ATTN_IMPLS = ("auto", "sdpa", "xformers", "math")


def default_attn_impl() -> str:
    """The implementation named by `MEDSSL_ATTN`, else `auto`."""
    impl = os.environ.get("MEDSSL_ATTN", "auto").strip().lower() or "auto"
    if impl not in ATTN_IMPLS:
        raise ValueError(f"MEDSSL_ATTN={impl!r} is not one of {ATTN_IMPLS}")
    return impl


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: PLC0415
    except Exception as exc:  # ImportError, or a broken CUDA build
        log.info("medssl attention: xformers unavailable (%s)", exc)
        return None
    return xops


@functools.cache
def _log_choice(requested: str, chosen: str, why: str) -> None:
    log.info("medssl attention: %s -> %s (%s)", requested, chosen, why)


def resolve_attn_impl(impl: str, q: torch.Tensor) -> str:
    """Decide the kernel for tensor `q` given the requested implementation."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl in ("sdpa", "math"):
        return impl
    usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if impl == "xformers":
        if not q.is_cuda:
            _log_choice(impl, "sdpa", "xformers has no CPU kernels")
            return "sdpa"
        if _xformers_ops() is None:
            _log_choice(impl, "sdpa", "xformers is not installed")
            return "sdpa"
        return "xformers"
    if usable and _xformers_ops() is not None:
        _log_choice(impl, "xformers", f"CUDA {q.dtype}")
        return "xformers"
    _log_choice(impl, "sdpa", "CPU or fp32 tensor, or no xformers" if not usable else "no xformers")
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto",
              dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Softmax attention on [B, H, N, K] tensors with the chosen kernel; returns [B, H, N, K]."""
    kind = resolve_attn_impl(impl, q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kind == "xformers":
        xops = _xformers_ops()
        # xformers layout is [B, N, H, K]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              p=dropout_p, scale=scale)
        return out.transpose(1, 2)
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, N]
    attn = attn.softmax(dim=-1)
    if dropout_p:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


class Attention(TimmAttention):
    """timm's ViT attention (same parameters and state-dict names) with the medssl kernel switch."""

    default_impl: str | None = None  # set by `attention_class`

    def __init__(self, *args, attn_impl: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn_impl = attn_impl or self.default_impl or default_attn_impl()
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:  # masks: leave them to timm's own path
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, K] each
        q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v, self.attn_impl, self.attn_drop.p if self.training else 0.0, self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # [B, N, H*K]
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@functools.cache
def attention_class(impl: str | None) -> type[Attention]:
    """An `Attention` subclass bound to `impl` (timm's blocks take a class, not a partial)."""
    if impl is None:
        return Attention
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    return type(f"Attention_{impl}", (Attention,), {"default_impl": impl})
