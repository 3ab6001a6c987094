"Tests for tinyllama.rope against Meta's complex-number RoPE, transformers' Llama RoPE, and RoPE's properties."
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tinyllama.rope import apply_rope, half_to_interleaved, interleaved_to_half, precompute_rope

seeds = st.integers(0, 2**32 - 1)

head_dims = st.sampled_from([2, 4, 8, 16, 64, 128])
thetas = st.sampled_from([10_000.0, 500_000.0, 100.0])


def meta_rope(x, theta, start_pos):
    "Meta's llama/model.py precompute_freqs_cis + apply_rotary_emb (complex numbers), x (B, T, H, D)."
    dim, end = x.shape[-1], start_pos + x.shape[1]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    freqs = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)[start_pos:]
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(x_ * freqs_cis.view(1, x.shape[1], 1, x_.shape[-1])).flatten(3)
    return out.type_as(x)


def hf_cos_sin(head_dim, n_heads, positions, theta):
    "cos, sin (1, T, head_dim) from transformers' LlamaRotaryEmbedding."
    config = LlamaConfig(hidden_size=head_dim * n_heads, num_attention_heads=n_heads,
                         max_position_embeddings=int(positions.max()) + 1,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])


@given(head_dim=head_dims, max_seq_len=st.integers(1, 300), theta=thetas)
@settings(max_examples=50)
def test_precompute_matches_transformers(head_dim, max_seq_len, theta):
    cos, sin = precompute_rope(head_dim, max_seq_len, theta)
    assert cos.shape == sin.shape == (max_seq_len, head_dim // 2)
    assert cos.dtype == sin.dtype == torch.float32
    hf_cos, hf_sin = hf_cos_sin(head_dim, 2, torch.arange(max_seq_len), theta)
    torch.testing.assert_close(torch.cat((cos, cos), -1), hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat((sin, sin), -1), hf_sin[0], rtol=0, atol=1e-6)


def test_precompute_default_theta_is_10000():
    for a, b in zip(precompute_rope(32, 50), precompute_rope(32, 50, theta=10000.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cos, sin = precompute_rope(4, 2)
    # pair 1 of a 4-feature head turns theta**(-1/2) = 0.01 radians per token
    torch.testing.assert_close(torch.atan2(sin[1], cos[1]), torch.tensor([1.0, 0.01]))


@given(head_dim=head_dims, seq_len=st.integers(1, 20), n_heads=st.integers(1, 4),
       start_pos=st.integers(0, 200), theta=thetas, dtype=st.sampled_from([torch.float32, torch.float64]), seed=seeds)
def test_apply_rope_matches_meta(head_dim, seq_len, n_heads, start_pos, theta, dtype, seed):
    torch.manual_seed(seed)  # each example reproducible
    x = torch.randn(2, seq_len, n_heads, head_dim, dtype=dtype)
    cos, sin = precompute_rope(head_dim, start_pos + seq_len + 5, theta)
    out = apply_rope(x, cos, sin, start_pos)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, meta_rope(x, theta, start_pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_rope_low_precision_computes_in_float32(dtype):
    x = torch.randn(3, 10, 4, 32).to(dtype)
    cos, sin = precompute_rope(32, 600)
    out = apply_rope(x, cos, sin, start_pos=500)
    assert out.dtype == dtype
    # rounding once, at the end, from the float32 result
    torch.testing.assert_close(out, apply_rope(x.float(), cos, sin, start_pos=500).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(out, meta_rope(x, 10000.0, 500))


@given(n_kv_heads=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 16, 32]),
       seq_len=st.integers(1, 12), start_pos=st.integers(0, 100), theta=thetas, seed=seeds)
@settings(max_examples=50)
def test_meta_and_hf_conventions_give_same_scores(n_kv_heads, group, head_dim, seq_len, start_pos, theta, seed):
    torch.manual_seed(seed)  # each example reproducible
    n_heads, dim = n_kv_heads * group, 24
    wq = torch.randn(n_heads * head_dim, dim)
    wk = torch.randn(n_kv_heads * head_dim, dim)
    x = torch.randn(2, seq_len, dim)
    cos, sin = precompute_rope(head_dim, start_pos + seq_len, theta)

    q = apply_rope((x @ wq.T).view(2, seq_len, n_heads, head_dim), cos, sin, start_pos)
    k = apply_rope((x @ wk.T).view(2, seq_len, n_kv_heads, head_dim), cos, sin, start_pos)

    hf_cos, hf_sin = hf_cos_sin(head_dim, n_heads, torch.arange(start_pos, start_pos + seq_len), theta)
    q_hf = (x @ interleaved_to_half(wq, n_heads).T).view(2, seq_len, n_heads, head_dim)
    k_hf = (x @ interleaved_to_half(wk, n_kv_heads).T).view(2, seq_len, n_kv_heads, head_dim)
    q_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, hf_cos, hf_sin, unsqueeze_dim=2)
    k_hf, _ = apply_rotary_pos_emb(k_hf, k_hf, hf_cos, hf_sin, unsqueeze_dim=2)

    # feature by feature: ours, put into HF's order (first the even features of each head, then the odd ones)
    to_halves = lambda t: torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)
    torch.testing.assert_close(to_halves(q), q_hf, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(to_halves(k), k_hf, rtol=1e-4, atol=1e-4)

    scores = torch.einsum("bmhd,bnhd->bhmn", q, k.repeat_interleave(group, dim=2))
    scores_hf = torch.einsum("bmhd,bnhd->bhmn", q_hf, k_hf.repeat_interleave(group, dim=2))
    torch.testing.assert_close(scores, scores_hf, rtol=1e-4, atol=1e-3)


@given(head_dim=head_dims, seq_len=st.integers(1, 16), start_pos=st.integers(0, 1000), seed=seeds)
def test_norms_preserved(head_dim, seq_len, start_pos, seed):
    torch.manual_seed(seed)  # each example reproducible
    x = torch.randn(2, seq_len, 3, head_dim, dtype=torch.float64)
    cos, sin = precompute_rope(head_dim, start_pos + seq_len)
    torch.testing.assert_close(apply_rope(x, cos, sin, start_pos).norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)


cached_tables = functools.lru_cache(precompute_rope)


@given(head_dim=head_dims, m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 500), theta=thetas, seed=seeds)
def test_scores_depend_only_on_relative_position(head_dim, m, n, shift, theta, seed):
    torch.manual_seed(seed)  # each example reproducible
    q, k = torch.randn(2, 1, 1, 1, head_dim, dtype=torch.float64)
    cos, sin = cached_tables(head_dim, 1001, theta)
    score = lambda m, n: (apply_rope(q, cos, sin, m) * apply_rope(k, cos, sin, n)).sum()
    # float32 angles of positions up to 1000 are off by up to ~3e-5 rad
    torch.testing.assert_close(score(m + shift, n + shift), score(m, n), rtol=0, atol=5e-4 * head_dim)


def test_relative_position_check_can_fail():
    "The relative-position test can fail: a wrong sign in the rotation makes scores depend on absolute position."
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64)
    cos, sin = precompute_rope(16, 64)
    bad_score = lambda m, n: (apply_rope(q, cos, sin, m) * apply_rope(k, cos, -sin, n)).sum()
    assert (bad_score(10, 3) - bad_score(17, 10)).abs() > 1e-3


@given(head_dim=head_dims, seq_len=st.integers(2, 20), data=st.data(), seed=seeds)
def test_start_pos_equals_slice_of_full(head_dim, seq_len, data, seed):
    torch.manual_seed(seed)  # each example reproducible
    start_pos = data.draw(st.integers(0, seq_len - 1))
    x = torch.randn(2, seq_len, 3, head_dim)
    cos, sin = precompute_rope(head_dim, seq_len + 3)
    full = apply_rope(x, cos, sin)
    torch.testing.assert_close(apply_rope(x[:, start_pos:], cos, sin, start_pos), full[:, start_pos:], rtol=0, atol=0)


@given(head_dim=head_dims, theta=thetas, seed=seeds)
def test_position_zero_is_identity(head_dim, theta, seed):
    torch.manual_seed(seed)  # each example reproducible
    x = torch.randn(4, 1, 2, head_dim)
    cos, sin = precompute_rope(head_dim, 8, theta)
    torch.testing.assert_close(apply_rope(x, cos, sin), x, rtol=0, atol=0)
    assert not torch.allclose(apply_rope(x, cos, sin, start_pos=1), x)


@given(n_heads=st.integers(1, 6), half_head_dim=st.integers(1, 16), dim=st.integers(1, 20), seed=seeds)
def test_permutations_are_inverse(n_heads, half_head_dim, dim, seed):
    torch.manual_seed(seed)  # each example reproducible
    w = torch.randn(n_heads * 2 * half_head_dim, dim)
    torch.testing.assert_close(half_to_interleaved(interleaved_to_half(w, n_heads), n_heads), w, rtol=0, atol=0)
    torch.testing.assert_close(interleaved_to_half(half_to_interleaved(w, n_heads), n_heads), w, rtol=0, atol=0)


@pytest.mark.parametrize("n_heads,head_dim", [(1, 2), (2, 8), (3, 6), (4, 32)])
def test_interleaved_to_half_row_order(n_heads, head_dim):
    "Meta's row h*head_dim + 2j goes to h*head_dim + j, row h*head_dim + 2j + 1 to h*head_dim + head_dim/2 + j."
    w = torch.randn(n_heads * head_dim, 5)
    w_hf = interleaved_to_half(w, n_heads)
    for h in range(n_heads):
        for j in range(head_dim // 2):
            torch.testing.assert_close(w_hf[h * head_dim + j], w[h * head_dim + 2 * j], rtol=0, atol=0)
            torch.testing.assert_close(w_hf[h * head_dim + head_dim // 2 + j], w[h * head_dim + 2 * j + 1], rtol=0, atol=0)


def test_errors_name_the_values():
    cos, sin = precompute_rope(8, 16)
    with pytest.raises(ValueError, match="head_dim=7"):
        precompute_rope(7, 16)
    with pytest.raises(ValueError, match="max_seq_len=0"):
        precompute_rope(8, 0)
    with pytest.raises(ValueError, match="theta=1"):
        precompute_rope(8, 16, theta=1.0)
    with pytest.raises(ValueError, match=r"start_pos=10 \+ T=7 must be at most max_seq_len=16"):
        apply_rope(torch.randn(1, 7, 2, 8), cos, sin, start_pos=10)
    with pytest.raises(ValueError, match="start_pos=-1"):
        apply_rope(torch.randn(1, 7, 2, 8), cos, sin, start_pos=-1)
    with pytest.raises(ValueError, match="head_dim=9"):
        apply_rope(torch.randn(1, 7, 2, 9), cos, sin)
    with pytest.raises(ValueError, match=r"cos.shape=\(16, 4\)"):
        apply_rope(torch.randn(1, 7, 2, 6), cos, sin)
    with pytest.raises(ValueError, match=r"x.shape=\(7, 2, 8\)"):
        apply_rope(torch.randn(7, 2, 8), cos, sin)
    apply_rope(torch.randn(1, 6, 2, 8), cos, sin, start_pos=10)  # exactly fills the table: fine
    with pytest.raises(ValueError, match="n_heads=5"):
        interleaved_to_half(torch.randn(12, 3), n_heads=5)
    with pytest.raises(ValueError, match="head_dim=3"):
        half_to_interleaved(torch.randn(12, 3), n_heads=4)
    with pytest.raises(ValueError, match="n_heads=0"):
        interleaved_to_half(torch.randn(12, 3), n_heads=0)
