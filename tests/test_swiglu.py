"Tests for tinyllama.swiglu against Meta's published LLaMA sizes, F.silu/F.linear and transformers' LlamaMLP."
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from tinyllama.swiglu import SwiGLU, ffn_hidden_dim

seeds = st.integers(0, 2**32 - 1)


@pytest.mark.parametrize("dim,multiple_of,ffn_dim_multiplier,expected", [
    (4096, 256, None, 11008),  # LLaMA 7B
    (5120, 256, None, 13824),  # LLaMA 13B
    (8192, 4096, 1.3, 28672),  # LLaMA 2 70B
    (6656, 256, None, 17920),  # LLaMA 1 33B
    (4096, 1024, 1.3, 14336),  # LLaMA 3 8B
    (288, 32, None, 768),  # llama2.c stories15M
])
def test_ffn_hidden_dim_published_sizes(dim, multiple_of, ffn_dim_multiplier, expected):
    assert ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier) == expected


def test_ffn_hidden_dim_defaults():
    assert ffn_hidden_dim(4096) == ffn_hidden_dim(4096, 256, None) == 11008
    assert ffn_hidden_dim(1) == 256  # int(8/3) = 2, rounded up


@given(dim=st.integers(1, 20_000), multiple_of=st.integers(1, 4096),
       ffn_dim_multiplier=st.one_of(st.none(), st.floats(0.1, 4.0)))
def test_ffn_hidden_dim_is_smallest_multiple_at_least_target(dim, multiple_of, ffn_dim_multiplier):
    target = int(8 * dim / 3)
    if ffn_dim_multiplier is not None:
        target = int(ffn_dim_multiplier * target)
    hidden_dim = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
    # the smallest multiple of multiple_of that is >= target
    assert hidden_dim % multiple_of == 0
    assert target <= hidden_dim < target + multiple_of


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=0), "dim=0"), (dict(dim=-8), "dim=-8"),
    (dict(dim=64, multiple_of=0), "multiple_of=0"),
    (dict(dim=64, ffn_dim_multiplier=0.0), "ffn_dim_multiplier=0.0"),
    (dict(dim=64, ffn_dim_multiplier=-1.3), "ffn_dim_multiplier=-1.3"),
])
def test_ffn_hidden_dim_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ffn_hidden_dim(**kwargs)


def test_swiglu_bad_arguments():
    with pytest.raises(ValueError, match="dim=0"):
        SwiGLU(0, 16)
    with pytest.raises(ValueError, match="hidden_dim=-1"):
        SwiGLU(8, -1)


def test_swiglu_layers():
    ff = SwiGLU(32, 96)
    assert set(dict(ff.named_parameters())) == {"w1.weight", "w2.weight", "w3.weight"}  # bias-free
    assert ff.w1.weight.shape == ff.w3.weight.shape == (96, 32) and ff.w2.weight.shape == (32, 96)
    assert sum(p.numel() for p in ff.parameters()) == 3 * 32 * 96


@given(dim=st.integers(1, 48), hidden_dim=st.integers(1, 96), lead=st.lists(st.integers(1, 4), max_size=2), seed=seeds)
def test_swiglu_matches_functional(dim, hidden_dim, lead, seed):
    torch.manual_seed(seed)  # each example reproducible
    ff = SwiGLU(dim, hidden_dim)
    x = torch.randn(*lead, dim)
    w1, w2, w3 = ff.w1.weight, ff.w2.weight, ff.w3.weight
    silu = lambda t: t * torch.sigmoid(t)  # the definition, independent of F.silu
    expected = F.linear(silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    out = ff(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_swiglu_matches_transformers_llama_mlp(dtype, tol):
    dim = 64
    hidden_dim = ffn_hidden_dim(dim, multiple_of=32)
    ff = SwiGLU(dim, hidden_dim).to(dtype)
    hf = LlamaMLP(LlamaConfig(hidden_size=dim, intermediate_size=hidden_dim, hidden_act="silu")).to(dtype)
    hf.load_state_dict({"gate_proj.weight": ff.w1.weight, "up_proj.weight": ff.w3.weight,
                        "down_proj.weight": ff.w2.weight})
    x = torch.randn(3, 11, dim, dtype=dtype)
    out = ff(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, hf(x), rtol=tol, atol=tol)
    # and the gradients with respect to the input
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ff(x1).sum().backward()
    hf(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)


def test_swiglu_is_tokenwise():
    ff = SwiGLU(16, 48)
    x = torch.randn(2, 7, 16)
    x_changed = x.clone()
    x_changed[:, 4] += 1.0
    moved = (ff(x_changed) != ff(x)).any(-1)
    assert moved[:, 4].all() and not moved[:, :4].any() and not moved[:, 5:].any()
