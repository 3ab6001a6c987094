"The reference check: our Llama and transformers' LlamaForCausalLM compute the same function."
import dataclasses
import math

import pytest
import torch
import transformers  # a dev dependency (pyproject [dev]); the package itself imports it lazily
from torch.testing import assert_close

from tinyllama.model import PRESETS, Llama, ModelArgs, from_hf_llama, hf_llama_config, hf_state_dict, to_hf_llama

CONFIGS = {
    "mha-untied": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, multiple_of=32,
                            max_seq_len=64, tie_embeddings=False, rope_theta=500000.0),
    "gqa-tied": ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, multiple_of=32,
                          max_seq_len=64, tie_embeddings=True, ffn_dim_multiplier=1.3),
    "gqa-untied": ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=300, multiple_of=64,
                            max_seq_len=64, tie_embeddings=False, norm_eps=1e-6),
    "mqa-tied": ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=1, vocab_size=300, multiple_of=16,
                          max_seq_len=64, tie_embeddings=True),
    "cpu-preset": PRESETS["cpu"],
}


def randomized(args: ModelArgs) -> Llama:
    "A model whose every weight is random, norm weights included, so no mapping mistake can hide."
    model = Llama(args).eval()
    std = 1.5 / math.sqrt(args.dim)  # logits of order 1: far from uniform, still well inside float32
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    return model


def greedy(model: Llama, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    "Argmax decoding with our KV cache."
    model.enable_kv_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    with torch.no_grad():
        logits, new = model(prompt), []
        for step in range(max_new_tokens):
            new.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = model(new[-1], start_pos=prompt.shape[1] + step) if step + 1 < max_new_tokens else None
    model.disable_kv_cache()
    return torch.cat(new, dim=1)


def test_config_fields():
    args = CONFIGS["gqa-tied"]
    config = hf_llama_config(args)
    assert isinstance(config, transformers.LlamaConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == \
        (args.dim, args.n_layers, args.n_heads, args.n_kv_heads)
    assert config.intermediate_size == args.hidden_dim and config.head_dim == args.head_dim
    assert config.rope_parameters["rope_theta"] == args.rope_theta and config.tie_word_embeddings
    assert hf_llama_config(args, eos_token_id=2).eos_token_id == 2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    ours = randomized(CONFIGS[name])
    hf = to_hf_llama(ours)
    assert isinstance(hf, transformers.LlamaForCausalLM) and hf.config._attn_implementation == "eager"
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        ours_logits, hf_logits = ours(tokens), hf(tokens).logits
    assert ours_logits.std() > 1  # logits far from zero: a real test, not a near-uniform one
    assert_close(hf_logits, ours_logits, rtol=0, atol=1e-4)
    print(f"{name}: max |logit difference| = {(hf_logits - ours_logits).abs().max().item():.2e}")


@pytest.mark.parametrize("name", ["mha-untied", "gqa-tied"])
def test_greedy_continuation_matches_generate(name):
    ours = randomized(CONFIGS[name])
    hf = to_hf_llama(ours)
    prompt = torch.randint(0, 300, (1, 10))
    expected = hf.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           pad_token_id=0)[:, prompt.shape[1]:]
    assert expected.shape == (1, 20)
    assert torch.equal(greedy(ours, prompt, 20), expected)


def test_tied_export_has_no_separate_head():
    tied = randomized(CONFIGS["gqa-tied"])
    assert "lm_head.weight" not in hf_state_dict(tied)
    hf = to_hf_llama(tied)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" in hf_state_dict(randomized(CONFIGS["mha-untied"]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name):
    ours = randomized(CONFIGS[name])
    back = from_hf_llama(to_hf_llama(ours))
    assert back.args.hidden_dim == ours.args.hidden_dim
    assert back.args.tie_embeddings == ours.args.tie_embeddings
    assert back.args == dataclasses.replace(ours.args, multiple_of=back.args.multiple_of,
                                            ffn_dim_multiplier=back.args.ffn_dim_multiplier)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("intermediate_size, tie", [(160, False), (40, True), (171, False)])
def test_from_hf_of_a_model_built_by_transformers(intermediate_size, tie):
    "Load a LlamaForCausalLM that transformers initialised itself (odd FFN sizes included) and compare logits."
    config = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=intermediate_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                      attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.19 * torch.randn_like(p))
    ours = from_hf_llama(hf)
    assert ours.args.hidden_dim == intermediate_size and ours.args.n_kv_heads == 2
    tokens = torch.randint(0, 200, (2, 32))
    with torch.no_grad():
        assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-4)


def test_unsupported_config_is_rejected():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, hidden_act="gelu", attention_bias=True)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        from_hf_llama(transformers.LlamaForCausalLM(config))
