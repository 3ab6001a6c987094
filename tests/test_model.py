"Tests for tinyllama.model: ModelArgs, presets, the Llama forward pass, KV cache, counts and FLOPs."
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tinyllama.model import PRESETS, Llama, ModelArgs, TransformerBlock, count_parameters, flops_per_token
from tinyllama.rope import precompute_rope

TINY = PRESETS["tiny"]


def tiny_model(**changes) -> Llama:
    return Llama(dataclasses.replace(TINY, **changes)).eval()


# ---- ModelArgs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    (dict(dim=30), "n_heads=4 must divide dim=30"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (dict(dim=40, n_heads=8, n_kv_heads=4), "head_dim"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(n_layers=-1), "n_layers=-1"),
    (dict(max_seq_len=2.5), "max_seq_len=2.5"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(norm_eps=0.0), "norm_eps=0.0"),
    (dict(ffn_dim_multiplier=-1.0), "ffn_dim_multiplier=-1.0"),
])
def test_model_args_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


def test_model_args_defaults_and_json_round_trip():
    args = ModelArgs(dim=64, n_heads=8, n_kv_heads=None)
    assert args.n_kv_heads == 8 and args.head_dim == 8
    for args in [*PRESETS.values(), dataclasses.replace(TINY, ffn_dim_multiplier=1.5, tie_embeddings=False)]:
        assert ModelArgs.from_dict(json.loads(json.dumps(args.to_dict()))) == args
    with pytest.raises(ValueError, match=r"unknown ModelArgs field\(s\) \['n_layer'\]"):
        ModelArgs.from_dict({**TINY.to_dict(), "n_layer": 3})


def test_presets_are_sensible():
    assert set(PRESETS) == {"tiny", "cpu", "gpu"}
    sizes = {name: count_parameters(Llama(args)) for name, args in PRESETS.items()}
    assert sizes["tiny"] < 100_000
    assert 1e6 < sizes["cpu"] < 5e6
    assert 8e6 < sizes["gpu"] < 13e6  # nanoGPT's Shakespeare model is 10.7M
    for args in PRESETS.values():
        assert args.n_kv_heads < args.n_heads  # the presets exercise grouped-query attention


# ---- the model --------------------------------------------------------------------------------------

def test_forward_shape_dtype_and_clean_state_dict():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, TINY.vocab_size) and logits.dtype == torch.float32
    assert not any("rope" in key or "cache" in key for key in model.state_dict())
    model.to(torch.bfloat16)
    assert model(tokens).dtype == torch.float32


def test_block_is_pre_norm():
    "Recompute a block from its parts with the LLaMA formulas (independent of TransformerBlock.forward)."
    block = TransformerBlock(TINY).eval()
    with torch.no_grad():
        for norm in (block.attention_norm, block.ffn_norm):
            norm.weight.uniform_(0.5, 1.5)
    cos, sin = precompute_rope(TINY.head_dim, TINY.max_seq_len)
    x = 3 * torch.randn(2, 7, TINY.dim)

    def rms_norm(v, weight):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + TINY.norm_eps) * weight

    with torch.no_grad():
        h = x + block.attention(rms_norm(x, block.attention_norm.weight), cos, sin)
        ffn = block.feed_forward
        expected = h + ffn.w2(F.silu(ffn.w1(rms_norm(h, block.ffn_norm.weight))) * ffn.w3(rms_norm(h, block.ffn_norm.weight)))
        assert_close(block(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_initialisation():
    args = dataclasses.replace(PRESETS["cpu"], n_layers=8)
    model = Llama(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 0.001
    assert abs(model.layers[0].attention.wq.weight.std().item() - 0.02) < 0.001
    residual_std = 0.02 / math.sqrt(2 * args.n_layers)
    for layer in model.layers:
        for weight in (layer.attention.wo.weight, layer.feed_forward.w2.weight):
            assert abs(weight.std().item() - residual_std) < 0.1 * residual_std
        assert torch.all(layer.attention_norm.weight == 1) and torch.all(layer.ffn_norm.weight == 1)
    assert not tiny_model(tie_embeddings=False).output.weight is tiny_model().tok_embeddings.weight


def test_initial_loss_is_near_uniform():
    for args in (TINY, PRESETS["cpu"]):
        model = Llama(args).eval()
        tokens = torch.randint(0, args.vocab_size, (4, 65))
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
        assert abs(loss - math.log(args.vocab_size)) < 0.15, (loss, math.log(args.vocab_size))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_model_is_causal(tie_embeddings):
    model = tiny_model(tie_embeddings=tie_embeddings)
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 9, 19):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
            diff = (model(changed) - base).abs().amax(dim=(0, 2))  # (T,)
            assert torch.all(diff[:t] == 0) and torch.all(diff[t:] > 0)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_equals_recomputation(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, TINY.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(tokens)
        model.enable_kv_cache(batch_size=3, max_seq_len=40)
        steps = [model(tokens[:, :7]), model(tokens[:, 7:12], start_pos=7)]
        steps += [model(tokens[:, t:t + 1], start_pos=t) for t in range(12, 30)]
        model.disable_kv_cache()
        assert all(layer.attention.cache is None for layer in model.layers)
        again = model(tokens)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    assert torch.equal(again, full)


def test_state_dict_round_trip():
    model, other = tiny_model(), tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    assert not torch.equal(model(tokens), other(tokens))
    other.load_state_dict(model.state_dict())
    assert torch.equal(model(tokens), other(tokens))


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.3)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))


def test_bad_inputs():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    with pytest.raises(ValueError, match="shape"):
        model(tokens[0])
    with pytest.raises(ValueError, match="dtype"):
        model(tokens.float())
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(tokens + TINY.vocab_size)
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(tokens - 300)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(tokens, start_pos=60)
    with pytest.raises(ValueError, match="max_seq_len=65"):
        model.enable_kv_cache(1, max_seq_len=65)
    model.enable_kv_cache(1, max_seq_len=16)
    with torch.no_grad(), pytest.raises(ValueError, match="max_seq_len=16"):
        model(tokens[:1], start_pos=10)
    with torch.no_grad(), pytest.raises(ValueError, match="batch_size=1"):
        model(tokens)


# ---- counting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_count_parameters(tie_embeddings):
    model = tiny_model(tie_embeddings=tie_embeddings)
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()}  # tied tensors share storage
    assert count_parameters(model) == sum(unique.values())
    vocab_matrices = (1 if tie_embeddings else 2) * TINY.vocab_size * TINY.dim
    assert count_parameters(model, exclude_embeddings=True) == sum(unique.values()) - vocab_matrices
    # body by hand: per block wq + wo (dim^2 each), wk + wv (dim * n_kv_heads * head_dim each), SwiGLU, two norms
    hidden = TINY.hidden_dim
    per_block = 2 * TINY.dim ** 2 + 2 * TINY.dim * TINY.n_kv_heads * TINY.head_dim + 3 * TINY.dim * hidden + 2 * TINY.dim
    assert count_parameters(model, exclude_embeddings=True) == TINY.n_layers * per_block + TINY.dim


def test_flops_per_token():
    for args in [*PRESETS.values(), dataclasses.replace(TINY, tie_embeddings=False, ffn_dim_multiplier=1.3)]:
        model = Llama(args)
        n_matmul = count_parameters(model, exclude_embeddings=True) + args.dim * args.vocab_size
        for seq_len in (1, 100, args.max_seq_len):
            assert flops_per_token(args, seq_len) == 6 * n_matmul + 12 * args.n_layers * args.dim * seq_len
    with pytest.raises(ValueError, match="seq_len=0"):
        flops_per_token(TINY, 0)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_training_flops_match_torch_flop_counter(tie_embeddings):
    "flops_per_token against torch's FLOP counter over a forward and backward pass (math SDPA, so it is counted)."
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    args = dataclasses.replace(TINY, tie_embeddings=tie_embeddings)
    model = Llama(args)
    batch_size, seq_len = 2, 16
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    norm_gains = (2 * args.n_layers + 1) * args.dim  # counted in N by convention, but elementwise, not matmuls
    expected = (flops_per_token(args, seq_len) - 6 * norm_gains) * batch_size * seq_len
    assert counter.get_total_flops() == expected
