"Tests for tinyllama.attention: causality, KV cache, grouped-query attention, SDPA against the textbook formula."
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tinyllama.attention import Attention, KVCache, causal_mask, repeat_kv
from tinyllama.rope import apply_rope, precompute_rope

MAX_SEQ_LEN = 32


def make(dim=48, n_heads=6, n_kv_heads=2):
    attn = Attention(dim, n_heads, n_kv_heads).eval()
    cos, sin = precompute_rope(dim // n_heads, MAX_SEQ_LEN)
    return attn, cos, sin


def reference_attention(attn, x, cos, sin, start_pos=0):
    "Independent reference: explicit softmax(q k^T / sqrt(d) + mask) v, head by head, no SDPA, no repeat_kv."
    batch_size, seq_len, _ = x.shape
    q = apply_rope(attn.wq(x).view(batch_size, seq_len, attn.n_heads, attn.head_dim), cos, sin, start_pos)
    k = apply_rope(attn.wk(x).view(batch_size, seq_len, attn.n_kv_heads, attn.head_dim), cos, sin, start_pos)
    v = attn.wv(x).view(batch_size, seq_len, attn.n_kv_heads, attn.head_dim)
    group = attn.n_heads // attn.n_kv_heads
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len)[:, None]  # (T, T)
    heads = []
    for h in range(attn.n_heads):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(attn.head_dim)  # (B, T, T)
        scores = scores.masked_fill(~allowed, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, h // group])  # (B, T, head_dim)
    return attn.wo(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("n_kv_heads", [6, 3, 2, 1])
def test_matches_naive_formula(n_kv_heads):
    attn, cos, sin = make(n_kv_heads=n_kv_heads)
    x = torch.randn(2, 11, 48)
    with torch.no_grad():
        assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-6)
        # without a cache, start_pos only shifts RoPE; scores depend on relative positions only
        assert_close(attn(x, cos, sin, start_pos=7), reference_attention(attn, x, cos, sin, start_pos=7),
                     rtol=1e-5, atol=1e-6)


def test_sdpa_matches_naive_with_offset_mask():
    start_pos, seq_len, head_dim = 5, 4, 16
    q = torch.randn(2, 3, seq_len, head_dim)
    k, v = torch.randn(2, 2, 3, start_pos + seq_len, head_dim).unbind(0)
    mask = causal_mask(seq_len, start_pos)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
    # explicit loop over the mask's definition: query i sits at start_pos + i
    for i in range(seq_len):
        scores[..., i, start_pos + i + 1:] = float("-inf")
    naive = scores.softmax(-1) @ v
    assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), naive, rtol=1e-5, atol=1e-6)


def test_causal_mask_values():
    for seq_len, start_pos in [(1, 0), (1, 9), (4, 0), (3, 5)]:
        mask = causal_mask(seq_len, start_pos)
        assert mask.shape == (seq_len, start_pos + seq_len)
        expected = torch.tensor([[j <= start_pos + i for j in range(start_pos + seq_len)] for i in range(seq_len)])
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("n_rep", [1, 2, 3])
def test_repeat_kv_matches_repeat_interleave(n_rep):
    x = torch.randn(2, 5, 4, 8)
    assert_close(repeat_kv(x, n_rep), torch.repeat_interleave(x, n_rep, dim=2), rtol=0, atol=0)


def test_causality():
    attn, cos, sin = make()
    x = torch.randn(2, 12, 48)
    with torch.no_grad():
        base = attn(x, cos, sin)
        for t in (0, 5, 11):
            changed = x.clone()
            changed[:, t] += torch.randn(48)
            diff = (attn(changed, cos, sin) - base).abs().amax(dim=(0, 2))  # (T,)
            assert torch.all(diff[:t] == 0), f"changing token {t} changed earlier outputs"
            assert torch.all(diff[t:] > 0)


@pytest.mark.parametrize("n_kv_heads", [6, 2, 1])
def test_cache_equals_full_recomputation(n_kv_heads):
    attn, cos, sin = make(n_kv_heads=n_kv_heads)
    x = torch.randn(3, 20, 48)
    with torch.no_grad():
        full = attn(x, cos, sin)
        attn.cache = KVCache(3, MAX_SEQ_LEN, n_kv_heads, attn.head_dim)
        pieces = [attn(x[:, :6], cos, sin, start_pos=0),  # prefill
                  attn(x[:, 6:10], cos, sin, start_pos=6)]  # a chunk at an offset: explicit mask
        pieces += [attn(x[:, t:t + 1], cos, sin, start_pos=t) for t in range(10, 20)]  # one token at a time
        cached = torch.cat(pieces, dim=1)
        # a smaller batch reuses the same cache; starting over needs no reset
        again = torch.cat([attn(x[:1, :15], cos, sin), attn(x[:1, 15:], cos, sin, start_pos=15)], dim=1)
    assert (cached - full).abs().max() <= 1e-5
    assert (again - full[:1]).abs().max() <= 1e-5


def test_cache_is_not_persistent_and_moves_with_module():
    attn, _, _ = make()
    attn.cache = KVCache(2, 8, 2, 8)
    assert set(attn.state_dict()) == {"wq.weight", "wk.weight", "wv.weight", "wo.weight"}
    attn.to(torch.float64)
    assert attn.cache.k.dtype == torch.float64 and attn.cache.v.shape == (2, 8, 2, 8)


def test_gqa_with_all_heads_is_torch_multihead_attention():
    "n_kv_heads = n_heads is plain multi-head attention: compare with nn.MultiheadAttention (RoPE set to identity)."
    attn = Attention(48, 6, n_kv_heads=6).eval()
    reference = torch.nn.MultiheadAttention(48, 6, bias=False, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        reference.out_proj.weight.copy_(attn.wo.weight)
    cos, sin = torch.ones(MAX_SEQ_LEN, 4), torch.zeros(MAX_SEQ_LEN, 4)  # rotation by angle 0
    x = torch.randn(2, 9, 48)
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)  # True = not allowed, in nn.MultiheadAttention's convention
    with torch.no_grad():
        expected, _ = reference(x, x, x, attn_mask=future, need_weights=False)
        assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [3, 2, 1])
def test_gqa_equals_mha_with_repeated_weights(n_kv_heads):
    gqa, cos, sin = make(n_kv_heads=n_kv_heads)
    mha = Attention(48, 6, 6).eval()
    n_rep, head_dim = 6 // n_kv_heads, 8
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(n_kv_heads, head_dim, 48)  # (n_kv_heads, head_dim, dim)
            getattr(mha, name).weight.copy_(w.repeat_interleave(n_rep, dim=0).reshape(48, 48))
        x = torch.randn(2, 10, 48)
        assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    attn = Attention(48, 6, 2, dropout=0.5)
    _, cos, sin = make()
    x = torch.randn(2, 10, 48)
    attn.eval()
    assert torch.equal(attn(x, cos, sin), attn(x, cos, sin))
    attn.train()
    assert not torch.equal(attn(x, cos, sin), attn(x, cos, sin))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=50, n_heads=6, n_kv_heads=2), "n_heads=6 must divide dim=50"),
    (dict(dim=48, n_heads=6, n_kv_heads=4), "n_kv_heads=4 must divide n_heads=6"),
    (dict(dim=48, n_heads=16, n_kv_heads=4), "head_dim"),
    (dict(dim=48, n_heads=6, n_kv_heads=2, dropout=1.0), "dropout=1.0"),
    (dict(dim=48, n_heads=0, n_kv_heads=2), "n_heads=0"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(**kwargs)


def test_bad_forward_and_cache_args():
    attn, cos, sin = make()
    with pytest.raises(ValueError, match="dim=48"):
        attn(torch.randn(2, 5, 40), cos, sin)
    attn.cache = KVCache(2, 8, 2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_seq_len=8"):
            attn(torch.randn(2, 5, 48), cos, sin, start_pos=4)  # 4 + 5 > 8
        with pytest.raises(ValueError, match="batch_size=2"):
            attn(torch.randn(3, 2, 48), cos, sin)
    with pytest.raises(ValueError, match="n_rep=0"):
        repeat_kv(torch.randn(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="max_seq_len=0"):
        KVCache(1, 0, 2, 8)
