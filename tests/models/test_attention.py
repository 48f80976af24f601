import pytest
import torch

from medssl.models import attention as A
from medssl.models.vit import create_vit


def _qkv(b=2, h=3, n=17, k=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, h, n, k, generator=g, dtype=dtype).to(device) for _ in range(3)]


def test_sdpa_matches_math_and_hand_computation():
    q, k, v = _qkv()
    ref = torch.softmax(q @ k.transpose(-1, -2) / 16**0.5, dim=-1) @ v  # by hand
    torch.testing.assert_close(A.attention(q, k, v, "math"), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(A.attention(q, k, v, "sdpa"), A.attention(q, k, v, "math"), rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_picks_sdpa_and_xformers_falls_back():
    q, _, _ = _qkv()
    assert A.resolve_attn_impl("auto", q) == "sdpa"
    assert A.resolve_attn_impl("xformers", q) == "sdpa"  # no CPU kernels: fallback with a log line
    with pytest.raises(ValueError, match="attn_impl"):
        A.resolve_attn_impl("flash9", q)


def test_env_variable_and_model_switch(monkeypatch):
    monkeypatch.setenv("MEDSSL_ATTN", "math")
    assert A.default_attn_impl() == "math"
    vit_math = create_vit("vit_tiny_patch16", img_size=32, in_chans=1)
    assert vit_math.blocks[0].attn.attn_impl == "math"
    monkeypatch.setenv("MEDSSL_ATTN", "bogus")
    with pytest.raises(ValueError, match="MEDSSL_ATTN"):
        A.default_attn_impl()
    monkeypatch.delenv("MEDSSL_ATTN")
    vit_sdpa = create_vit("vit_tiny_patch16", img_size=32, in_chans=1, attn_impl="sdpa")
    vit_sdpa.load_state_dict(vit_math.state_dict())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(vit_sdpa.eval()(x), vit_math.eval()(x), rtol=1e-5, atol=1e-5)


def test_same_output_as_timm_attention():
    """Our Attention is timm's with a kernel switch: same weights, same result."""
    from timm.layers import Attention as TimmAttention

    ours = A.attention_class("math")(64, num_heads=4, qkv_bias=True)
    ref = TimmAttention(64, num_heads=4, qkv_bias=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_matches_sdpa_on_cuda():
    pytest.importorskip("xformers.ops")
    q, k, v = _qkv(dtype=torch.bfloat16, device="cuda", n=197, k=64)
    assert A.resolve_attn_impl("auto", q) == "xformers"
    torch.testing.assert_close(A.attention(q, k, v, "xformers").float(), A.attention(q, k, v, "sdpa").float(),
                               rtol=2e-2, atol=2e-2)
