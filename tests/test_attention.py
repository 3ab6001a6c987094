"Tests for tinyllama.attention: causality, KV cache, grouped-query attention, SDPA against the textbook formula."
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tinyllama.attention import Attention, KVCache, attend, causal_mask, repeat_kv
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


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attend_matches_explicit_softmax(n_kv_heads):
    "attend on raw q, k, v: an explicit masked softmax per head, head h reading key/value head h // n_rep."
    q = torch.randn(2, 7, 4, 8)  # (B, T, n_heads, head_dim)
    k, v = torch.randn(2, 2, 7, n_kv_heads, 8).unbind(0)  # (B, T, n_kv_heads, head_dim)
    n_rep = 4 // n_kv_heads
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)  # (T, T), True above the diagonal
    heads = []
    for h in range(4):
        scores = q[:, :, h] @ k[:, :, h // n_rep].transpose(1, 2) / math.sqrt(8)  # (B, T, T)
        heads.append(scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, :, h // n_rep])  # (B, T, head_dim)
    assert_close(attend(q, k, v), torch.cat(heads, dim=-1), rtol=1e-5, atol=1e-6)


def test_attend_with_cache_in_pieces_equals_one_pass():
    q = torch.randn(2, 9, 4, 8)  # (B, T, n_heads, head_dim)
    k, v = torch.randn(2, 2, 9, 2, 8).unbind(0)  # (B, T, n_kv_heads, head_dim)
    full = attend(q, k, v)
    cache = KVCache(2, 16, 2, 8)
    pieces = [attend(q[:, a:b], k[:, a:b], v[:, a:b], cache, start_pos=a) for a, b in [(0, 4), (4, 7), (7, 8), (8, 9)]]
    assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-6)


def test_attend_key_mask_hides_padding_and_never_returns_nan():
    q = torch.randn(2, 6, 2, 8)
    k, v = torch.randn(2, 2, 6, 2, 8).unbind(0)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[1, :2] = False  # row 1: two pads in front
    out = attend(q, k, v, key_mask=key_mask)  # (B, T, n_heads * head_dim)
    assert not out.isnan().any()
    assert_close(out[1, 2:], attend(q[1:, 2:], k[1:, 2:], v[1:, 2:])[0], rtol=1e-5, atol=1e-6)
    assert_close(out[0], attend(q[:1], k[:1], v[:1])[0], rtol=0, atol=0)


def test_attend_bad_args():
    q, k = torch.randn(1, 5, 6, 8), torch.randn(1, 5, 4, 8)
    with pytest.raises(ValueError, match="n_kv_heads=4 .* must divide n_heads=6"):
        attend(q, k, k)
    with pytest.raises(ValueError, match="head_dim"):
        attend(q, k[..., :4], k[..., :4])
    with pytest.raises(ValueError, match="start_pos=-1"):
        attend(q, q, q, start_pos=-1)
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor of shape .* = \(1, 5\)"):
        attend(q, q, q, key_mask=torch.ones(1, 4, dtype=torch.bool))


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
