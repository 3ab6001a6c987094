"The GPT-2 baseline: its contract, its properties, and the reference check against transformers' GPT2LMHeadModel."
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency (pyproject [dev]); the package itself imports it lazily
from torch.testing import assert_close

from tinyllama.gpt2 import (GPT2, GPT2Args, GPT2Attention, GPT2MLP, from_hf_gpt2, hf_gpt2_config, hf_gpt2_state_dict,
                            load_pretrained_gpt2, matched_gpt2_args, to_hf_gpt2)
from tinyllama.generate import generate_tokens
from tinyllama.model import PRESETS, Llama, ModelArgs, build_model, count_parameters, flops_per_token, get_architecture

SMALL = GPT2Args(dim=48, n_layers=2, n_heads=6, vocab_size=300, max_seq_len=64)
CONFIGS = {
    "tied-6x8": SMALL,
    "untied-4x16": GPT2Args(dim=64, n_layers=3, n_heads=4, vocab_size=300, max_seq_len=64, tie_embeddings=False,
                            norm_eps=1e-6),
    "tied-3x10-odd-head": GPT2Args(dim=30, n_layers=2, n_heads=3, vocab_size=300, max_seq_len=48),
}


def randomized(args: GPT2Args) -> GPT2:
    "A model whose every parameter is random, biases and LayerNorm gains included, so no mapping mistake can hide."
    model = GPT2(args).eval()
    std = 1.5 / math.sqrt(args.dim)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.3 * torch.randn_like(p) if is_gain else std * torch.randn_like(p))
    return model


def test_args_validate_and_round_trip():
    assert GPT2Args.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL
    assert (SMALL.head_dim, SMALL.hidden_dim) == (8, 192)
    for bad, word in [(dict(dim=50, n_heads=4), "n_heads"), (dict(dropout=1.0), "dropout"), (dict(bias=1), "bias"),
                      (dict(vocab_size=0), "vocab_size"), (dict(norm_eps=0.0), "norm_eps")]:
        with pytest.raises(ValueError, match=word):
            GPT2Args(**bad)
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPT2Args.from_dict({"dim": 64, "n_kv_heads": 2})


def test_forward_contract_matches_llama():
    model = GPT2(SMALL).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (3, 11))
    logits = model(tokens)
    assert logits.shape == (3, 11, SMALL.vocab_size) and logits.dtype == torch.float32
    assert model.args is SMALL and model.output.weight is model.tok_embeddings.weight
    assert model.to(torch.bfloat16)(tokens).dtype == torch.float32  # float32 logits whatever the weights
    for bad in [tokens.float(), tokens[0], tokens + SMALL.vocab_size, tokens - SMALL.vocab_size]:
        with pytest.raises(ValueError):
            model(bad)


def test_positions_past_the_table_are_an_error():
    model = GPT2(SMALL).eval()
    model(torch.zeros(1, SMALL.max_seq_len, dtype=torch.long))  # the whole table is usable
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"start_pos \+ seq_len = 64 \+ 1 must be in \[1, max_seq_len=64\]"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=SMALL.max_seq_len)
    with pytest.raises(ValueError, match="start_pos"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=-1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.enable_kv_cache(1, SMALL.max_seq_len + 1)


@pytest.mark.parametrize("t", [0, 5, 15])
def test_causal(t):
    model = randomized(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % SMALL.vocab_size
    with torch.no_grad():
        diff = (model(changed) - model(tokens)).abs().amax(dim=(0, 2))
    assert (diff[:t] == 0).all() and (diff[t:] > 0).all()


def test_positions_matter():
    "Without the position table GPT-2 would be order-blind: swapping two tokens must change later logits."
    model = randomized(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (1, 12))
    swapped = tokens.clone()
    swapped[0, [3, 7]] = tokens[0, [7, 3]]
    with torch.no_grad():
        assert not torch.allclose(model(tokens)[0, -1], model(swapped)[0, -1], atol=1e-3)


def test_kv_cache_equals_recomputation():
    model = randomized(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.enable_kv_cache(batch_size=2, max_seq_len=20)
        steps = [model(tokens[:, :7]), model(tokens[:, 7:10], start_pos=7)]
        steps += [model(tokens[:, t:t + 1], start_pos=t) for t in range(10, 20)]
        model.disable_kv_cache()
    assert all(layer.attention.cache is None for layer in model.layers)
    assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    "Rows of different lengths padded on the left, and the key mask (False at the pads)."
    seq_len = max(len(r) for r in rows)
    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    key_mask = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, seq_len - len(r):], key_mask[i, seq_len - len(r):] = r, True
    return tokens, key_mask


def test_left_padding_changes_nothing():
    "Padding must not shift a row's learned positions: padded logits equal the row's logits alone."
    model = randomized(SMALL)
    rows = [torch.randint(0, SMALL.vocab_size, (n,)) for n in (12, 5, 9)]
    tokens, key_mask = left_padded(rows)
    with torch.no_grad():
        together = model(tokens, key_mask=key_mask)
        model.enable_kv_cache(3, 16)
        cached = [model(tokens, key_mask=key_mask)]
        extra = torch.randint(0, SMALL.vocab_size, (3, 4))
        for t in range(4):
            mask = torch.cat([key_mask, torch.ones(3, t + 1, dtype=torch.bool)], dim=1)
            cached.append(model(extra[:, t:t + 1], start_pos=12 + t, key_mask=mask))
        model.disable_kv_cache()
        cached = torch.cat(cached, dim=1)
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, extra[i]])[None])[0]
            assert_close(together[i, 12 - len(r):], alone[:len(r)], rtol=0, atol=1e-4)
            assert_close(cached[i, 12 - len(r):], alone, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="key_mask"):
        model(tokens, key_mask=key_mask[:, 1:])


def test_left_padding_matches_transformers():
    ours = randomized(SMALL)
    hf = to_hf_gpt2(ours)
    tokens, key_mask = left_padded([torch.randint(0, SMALL.vocab_size, (n,)) for n in (10, 4)])
    position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # as transformers' generate computes them
    with torch.no_grad():
        ours_logits = ours(tokens, key_mask=key_mask)
        hf_logits = hf(tokens, attention_mask=key_mask.long(), position_ids=position_ids).logits
    assert_close(hf_logits[key_mask], ours_logits[key_mask], rtol=0, atol=1e-4)


def test_attention_matches_textbook_formula():
    attention = GPT2Attention(30, n_heads=3).eval()  # head_dim 10
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, 7, 30)
        q, k, v = (w(x).view(2, 7, 3, 10).transpose(1, 2) for w in (attention.wq, attention.wk, attention.wv))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(10)).masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
        expected = attention.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 30))
        assert_close(attention(x), expected, rtol=0, atol=1e-5)


def test_attention_with_cache_and_padding_is_chapter_05s_attend():
    "GPT2Attention is projections around chapter 05's attend: the same output for the same q, k, v, cache and mask."
    from tinyllama.attention import KVCache, attend
    attention = GPT2Attention(30, n_heads=3).eval()
    x = torch.randn(2, 6, 30)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[0, :2] = False
    with torch.no_grad():
        q, k, v = (w(x).view(2, 6, 3, 10) for w in (attention.wq, attention.wk, attention.wv))
        assert_close(attention(x, key_mask=key_mask), attention.wo(attend(q, k, v, key_mask=key_mask)), rtol=0, atol=0)
        attention.cache = KVCache(2, 8, 3, 10)
        attention(x[:, :4])
        expected = attention.wo(attend(q, k, v))[:, 4:]  # (B, 2, dim) from one pass without a cache
        assert_close(attention(x[:, 4:], start_pos=4), expected, rtol=1e-5, atol=1e-6)


def test_registered_in_chapter_06s_registry_without_the_trainer():
    "gpt2 registers with tinyllama.model and never imports tinyllama.train (imports run down the chapter order)."
    import subprocess, sys
    code = ("import sys, tinyllama.gpt2 as g, tinyllama.model as m; "
            "assert m.get_architecture('gpt2').model_class is g.GPT2; "
            "assert 'tinyllama.train' not in sys.modules, 'tinyllama.gpt2 imported tinyllama.train'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert get_architecture("gpt2").args_class is GPT2Args
    assert type(build_model(SMALL)) is GPT2


def test_mlp_is_tanh_gelu_mlp():
    mlp = GPT2MLP(16, 64)
    x = torch.randn(4, 16, dtype=torch.float64)
    mlp = mlp.double()
    h = x @ mlp.w1.weight.T + mlp.w1.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert_close(mlp(x), gelu @ mlp.w2.weight.T + mlp.w2.bias, rtol=1e-12, atol=1e-12)


def test_initialisation_is_gpt2s():
    args = GPT2Args(dim=128, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=128)
    model = GPT2(args)
    residual = 0.02 / math.sqrt(2 * args.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert (p == 0).all(), name
        elif "norm" in name:
            assert (p == 1).all(), name
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            assert abs(p.std().item() - residual) < 0.15 * residual, name
        else:
            assert abs(p.std().item() - 0.02) < 0.15 * 0.02, name


def test_bias_false_has_no_biases():
    model = GPT2(dataclasses.replace(SMALL, bias=False))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="bias"):
        to_hf_gpt2(model)


def test_dropout_only_in_training():
    model = GPT2(dataclasses.replace(SMALL, dropout=0.2))
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_parameter_count_closed_form_and_flops():
    for args in [SMALL, CONFIGS["untied-4x16"], dataclasses.replace(SMALL, bias=False)]:
        model = GPT2(args)
        d, bias = args.dim, args.bias
        per_layer = 12 * d * d + (13 * d if bias else 2 * d)
        head = 0 if args.tie_embeddings else args.vocab_size * d
        expected = args.n_layers * per_layer + (2 if bias else 1) * d + (args.vocab_size + args.max_seq_len) * d + head
        assert count_parameters(model) == expected
        n_matmul = expected - (args.vocab_size + args.max_seq_len) * d - head + args.vocab_size * d
        assert flops_per_token(args, 32) == 6 * n_matmul + 12 * args.n_layers * d * 32  # chapter 06's, generic
    with pytest.raises(ValueError, match="seq_len=0"):
        flops_per_token(SMALL, 0)


@pytest.mark.parametrize("llama_args, n_heads", [(PRESETS["tiny"], 2), (PRESETS["cpu"], None), (PRESETS["gpu"], None),
                                                 (dataclasses.replace(PRESETS["cpu"], n_layers=6, dropout=0.1), None)])
def test_matched_parameter_count(llama_args, n_heads):
    gpt2_args = matched_gpt2_args(llama_args, n_heads=n_heads)
    n_llama, n_gpt2 = count_parameters(Llama(llama_args)), count_parameters(GPT2(gpt2_args))
    assert abs(n_gpt2 / n_llama - 1) <= 0.05
    assert gpt2_args.n_layers == llama_args.n_layers and gpt2_args.n_heads == (n_heads or llama_args.n_heads)
    assert (gpt2_args.vocab_size, gpt2_args.max_seq_len, gpt2_args.dropout, gpt2_args.tie_embeddings) == \
        (llama_args.vocab_size, llama_args.max_seq_len, llama_args.dropout, llama_args.tie_embeddings)
    for k in (-1, 1):  # no neighbouring width is closer
        neighbour = gpt2_args.dim + k * gpt2_args.n_heads
        if neighbour > 0:
            n = count_parameters(GPT2(dataclasses.replace(gpt2_args, dim=neighbour)))
            assert abs(n - n_llama) >= abs(n_gpt2 - n_llama)


def test_matched_args_refuses_what_it_cannot_match():
    # the tiny LLaMA's 4 heads allow widths 28 and 32 only: -13% and +8.5% parameters
    with pytest.raises(ValueError, match="tolerance=0.05; try another n_layers or n_heads"):
        matched_gpt2_args(PRESETS["tiny"])
    with pytest.raises(ValueError, match="tolerance"):
        matched_gpt2_args(PRESETS["cpu"], tolerance=0)


def test_config_fields():
    config = hf_gpt2_config(CONFIGS["untied-4x16"])
    assert isinstance(config, transformers.GPT2Config) and config._attn_implementation == "eager"
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions, config.n_inner) == (64, 3, 4, 64, 256)
    assert config.activation_function == "gelu_new" and not config.tie_word_embeddings
    assert config.layer_norm_epsilon == 1e-6
    dropped = hf_gpt2_config(dataclasses.replace(SMALL, dropout=0.1))
    assert dropped.resid_pdrop == dropped.embd_pdrop == dropped.attn_pdrop == 0.1
    assert hf_gpt2_config(SMALL, eos_token_id=2).eos_token_id == 2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    ours = randomized(CONFIGS[name])
    hf = to_hf_gpt2(ours)
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ours_logits, hf_logits = ours(tokens), hf(tokens).logits
    assert ours_logits.std() > 1
    assert_close(hf_logits, ours_logits, rtol=0, atol=1e-4)
    print(f"{name}: max |logit difference| = {(hf_logits - ours_logits).abs().max().item():.2e}")


@pytest.mark.parametrize("name", ["tied-6x8", "untied-4x16"])
def test_greedy_continuation_matches_generate(name):
    ours = randomized(CONFIGS[name])
    hf = to_hf_gpt2(ours)
    prompt = torch.randint(0, 300, (1, 10))
    expected = hf.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           pad_token_id=0)[:, prompt.shape[1]:]
    assert expected.shape == (1, 20)
    ours_new = torch.stack(list(generate_tokens(ours, prompt.tolist(), 20)), dim=1)  # greedy, with the KV cache
    assert torch.equal(ours_new, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_identical(name):
    ours = randomized(CONFIGS[name])
    back = from_hf_gpt2(to_hf_gpt2(ours))
    assert back.args == ours.args
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert len(hf_gpt2_state_dict(ours)) == 4 + 12 * ours.args.n_layers + (not ours.args.tie_embeddings)


def test_from_hf_refuses_what_gpt2args_cannot_hold():
    for overrides, word in [(dict(activation_function="relu"), "activation_function"),
                            (dict(n_inner=100), "n_inner"), (dict(attn_pdrop=0.3), "dropout"),
                            (dict(scale_attn_by_inverse_layer_idx=True), "scaled")]:
        hf = transformers.GPT2LMHeadModel(hf_gpt2_config(SMALL, **overrides))
        with pytest.raises(ValueError, match=word):
            from_hf_gpt2(hf)


def test_load_pretrained_from_local_folder(tmp_path):
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.GPT2LMHeadModel(hf_gpt2_config(CONFIGS["untied-4x16"])).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))  # random biases and gains as well
    hf.save_pretrained(tmp_path)
    model = load_pretrained_gpt2(tmp_path)
    assert isinstance(model, GPT2) and model.args == CONFIGS["untied-4x16"] and not model.training
    tokens = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-4)
    assert load_pretrained_gpt2(tmp_path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16


def test_missing_pretrained_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained_gpt2(tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError):
        load_pretrained_gpt2(tmp_path)  # exists, but holds no checkpoint


def test_it_learns():
    "A few AdamW steps on one batch must bring the loss well below ln(vocab_size)."
    model = GPT2(SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, SMALL.vocab_size, (4, 32))
    y = torch.roll(x, -1, dims=1)
    first = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert abs(first - math.log(SMALL.vocab_size)) < 0.2
    for _ in range(12):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first - 1.0


def test_trains_with_chapter_07_loop_and_checkpoints(tmp_path):
    "TrainConfig(arch='gpt2') goes through train(); the checkpoint reloads as a GPT2 and refuses a Llama."
    from tinyllama.train import TrainConfig, load_checkpoint, load_trained_model, train
    cfg = TrainConfig(arch="gpt2", model=GPT2Args(dim=32, n_layers=1, n_heads=2, max_seq_len=32), tokenizer="char",
                      max_chars=20_000, batch_size=4, seq_len=32, max_steps=4, warmup_steps=1, eval_interval=4,
                      eval_batches=2, dtype="float32", sample_tokens=5, out_dir=str(tmp_path / "run"))
    result = train(cfg, progress=False)
    assert isinstance(result.model, GPT2) and result.step == 4
    model, _, saved = load_trained_model(tmp_path / "run")
    assert isinstance(model, GPT2) and saved.arch == "gpt2" and saved.model.vocab_size == result.model.args.vocab_size
    for k, v in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match="GPT2Args model, not a ModelArgs"):
        load_checkpoint(tmp_path / "run", Llama(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=70)))
    longer = GPT2(dataclasses.replace(saved.model, max_seq_len=64))  # one more row of positions: another shape
    with pytest.raises(ValueError, match="max_seq_len=32 .checkpoint. vs 64"):
        load_checkpoint(tmp_path / "run", longer)
    with pytest.raises(ValueError, match="arch='gpt3' is not a registered architecture"):
        get_architecture("gpt3")
    with pytest.raises(ValueError, match="must be a GPT2Args for arch='gpt2'"):
        TrainConfig(arch="gpt2", model=ModelArgs())
