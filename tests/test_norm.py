"Tests for tinyllama.norm against torch.nn.RMSNorm, transformers' LlamaRMSNorm and RMSNorm's properties."
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tinyllama.norm import RMSNorm

seeds = st.integers(0, 2**32 - 1)

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).flatmap(
    lambda lead: st.integers(1, 96).map(lambda dim: (*lead, dim)))
epsilons = st.sampled_from([1e-6, 1e-5, 1e-2])
# (dtype, rtol, atol) against torch.nn.RMSNorm run in float32 on the same (rounded) input
dtypes = st.sampled_from([(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-5, 1e-5),
                          (torch.bfloat16, 1.6e-2, 2e-2), (torch.float16, 2e-3, 2e-3)])


def make_pair(dim, eps):
    "Our RMSNorm and torch.nn.RMSNorm with the same random gain."
    ours, torchs = RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
    with torch.no_grad():
        ours.weight.uniform_(-2.0, 2.0)
    torchs.load_state_dict(ours.state_dict())
    return ours, torchs


@given(shape=shapes, eps=epsilons, dtype_tol=dtypes, scale=st.sampled_from([1e-2, 1.0, 50.0]), seed=seeds)
def test_matches_torch_rmsnorm(shape, eps, dtype_tol, scale, seed):
    torch.manual_seed(seed)  # each example reproducible
    dtype, rtol, atol = dtype_tol
    ours, torchs = make_pair(shape[-1], eps)
    x = (torch.randn(shape) * scale).to(dtype)
    out = ours(x)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, torchs(x.float()).to(dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_torch_rmsnorm(dtype):
    ours, torchs = make_pair(48, 1e-5)
    ours, torchs = ours.to(dtype), torchs.to(dtype)
    x = torch.randn(3, 7, 48, dtype=dtype) * 2 + 0.5
    upstream = torch.randn(3, 7, 48, dtype=dtype)
    x_ours, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(x_ours) * upstream).sum().backward()
    (torchs(x_torch) * upstream).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(x_ours.grad, x_torch.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.weight.grad, torchs.weight.grad, rtol=tol, atol=tol)


def test_gradcheck_float64():
    norm = RMSNorm(6, eps=1e-3).double()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))


def test_matches_transformers_llama_rmsnorm():
    ours, _ = make_pair(64, 1e-6)
    hf = LlamaRMSNorm(64, eps=1e-6)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 64) * 4
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-6, atol=1e-6)


@given(shape=shapes, c=st.floats(1e-3, 1e4), seed=seeds)
def test_scale_invariance(shape, c, seed):
    torch.manual_seed(seed)  # each example reproducible
    norm, _ = make_pair(shape[-1], 0.0)  # exact invariance needs eps = 0
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(norm(c * x), norm(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(norm(-c * x), -norm(x), rtol=1e-10, atol=1e-10)
    # with eps > 0 it still holds while the mean square stays far above eps
    norm.eps = 1e-6
    x = x + torch.sign(x) * 0.5  # mean square >= 0.25
    torch.testing.assert_close(norm(max(c, 1.0) * x), norm(x), rtol=1e-5, atol=1e-5)


@given(shape=shapes, scale=st.floats(1e-3, 1e3), eps=epsilons, seed=seeds)
def test_output_rms_is_one_at_init(shape, scale, eps, seed):
    "With weight = 1 the output RMS is sqrt(ms / (ms + eps)), ms the input's mean square: 1 unless ms ~ eps."
    torch.manual_seed(seed)  # each example reproducible
    norm = RMSNorm(shape[-1], eps=eps)
    x = torch.randn(shape, dtype=torch.float64) * scale
    mean_square = x.pow(2).mean(-1)
    rms = norm(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, (mean_square / (mean_square + eps)).sqrt(), rtol=1e-10, atol=1e-10)
    big = mean_square > 1e4 * eps
    torch.testing.assert_close(rms[big], torch.ones_like(rms[big]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_preserved_with_float32_weight(dtype):
    norm, _ = make_pair(16, 1e-6)
    assert norm.weight.dtype == torch.float32
    x = torch.randn(4, 16).to(dtype)
    assert norm(x).dtype == dtype
    # computed in float32 and rounded once
    torch.testing.assert_close(norm(x), norm(x.float()).to(dtype), rtol=0, atol=0)


def test_float64_input_is_computed_in_float64():
    norm, _ = make_pair(16, 1e-6)
    x = torch.randn(4, 16, dtype=torch.float64)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight.detach().double()
    assert norm(x).dtype == torch.float64
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_float16_large_activations_do_not_overflow():
    norm = RMSNorm(256)
    x = torch.randn(4, 256, dtype=torch.float64) * 1000  # squares far beyond float16's 65504
    out = norm(x.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), norm(x), rtol=2e-3, atol=4e-3)


def test_equals_layernorm_on_zero_mean_rows():
    norm, _ = make_pair(32, 1e-5)
    layer_norm = nn.LayerNorm(32, eps=1e-5, bias=False)
    layer_norm.load_state_dict(norm.state_dict())
    x = torch.randn(5, 32) * 3
    x = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(norm(x), layer_norm(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(norm(x + 1), layer_norm(x + 1), atol=1e-3)


def test_parameters_and_defaults():
    norm = RMSNorm(10)
    assert norm.eps == 1e-6
    assert list(norm.state_dict()) == ["weight"]
    assert isinstance(norm.weight, nn.Parameter) and norm.weight.shape == (10,)
    torch.testing.assert_close(norm.weight.detach(), torch.ones(10), rtol=0, atol=0)
    assert torch.isfinite(norm(torch.zeros(2, 10))).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim=0"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps=-1e-06"):
        RMSNorm(8, eps=-1e-6)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=7 must equal dim=8"):
        RMSNorm(8)(torch.randn(2, 7))
