"Evaluation: whole-split metrics against brute-force loops, count baselines against numpy, the hybrid against Llama, the pretrained GPT-2 path against transformers."
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tinyllama.data import load_corpus, split_text
from tinyllama.evaluate import (GPT2_PATH_ENV, CountModel, Hybrid, HybridArgs, choose_alpha, finetune,
                                fit_count_model, hybrid_flops_per_token, load_gpt2_with_tokenizer, loss_by_position,
                                pretrained_gpt2_dir, split_metrics, token_nll, window_plan)
from tinyllama.gpt2 import GPT2Args, hf_gpt2_config
from tinyllama.model import Llama, ModelArgs, count_parameters, flops_per_token
from tinyllama.tokenizer import CharTokenizer
from tinyllama.train import TrainConfig, load_trained_model, train

SMALL = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=64)


def confident_llama(args: ModelArgs = SMALL) -> Llama:
    "A random Llama with large embeddings, so that its predictions are far from uniform."
    model = Llama(args).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(50)
    return model


@pytest.fixture(scope="module")
def text() -> str:
    return load_corpus()[:60_000]


@pytest.mark.parametrize("n_ids,seq_len,stride", [(2, 1, None), (13, 4, None), (13, 4, 2), (100, 7, 3), (100, 7, 7),
                                                  (100, 7, 1), (5, 10, None), (5, 10, 4)])
def test_window_plan_scores_every_target_once(n_ids, seq_len, stride):
    times_scored = np.zeros(n_ids - 1, dtype=int)
    for start, length, n_scored in window_plan(n_ids, seq_len, stride):
        assert 1 <= n_scored <= length <= seq_len and start + length <= n_ids - 1
        times_scored[start + length - n_scored:start + length] += 1
        if stride is not None and start > 0:  # a later sliding window keeps seq_len - stride targets of context
            assert length == seq_len and length - n_scored >= seq_len - stride
    assert (times_scored == 1).all()


def test_window_plan_rejects_bad_arguments():
    for kwargs, word in [(dict(n_ids=1, seq_len=4), "n_ids"), (dict(n_ids=10, seq_len=0), "seq_len"),
                         (dict(n_ids=10, seq_len=4, stride=5), "stride"), (dict(n_ids=10, seq_len=4, stride=0), "stride")]:
        with pytest.raises(ValueError, match=word):
            window_plan(**kwargs)


def test_token_nll_equals_a_cross_entropy_loop_over_windows():
    model = confident_llama()
    ids = torch.randint(0, SMALL.vocab_size, (300,))
    nll, correct = token_nll(model, ids, seq_len=40, batch_size=3)
    expected, hits = [], []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 40):
            end = min(start + 40, len(ids) - 1)  # the last window is shorter
            x, y = ids[start:end], ids[start + 1:end + 1]
            logits = model(x[None])[0]  # (T, V)
            expected.append(F.cross_entropy(logits, y, reduction="none"))
            hits.append(logits.argmax(-1) == y)
    assert_close(nll, torch.cat(expected).double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(correct, torch.cat(hits))
    assert nll.mean() < math.log(SMALL.vocab_size) - 0.5 or nll.mean() > math.log(SMALL.vocab_size) + 0.5  # not uniform


def test_sliding_stride_one_predicts_each_token_from_the_previous_seq_len_tokens():
    model = confident_llama()
    ids = torch.randint(0, SMALL.vocab_size, (60,))
    seq_len = 12
    nll, _ = token_nll(model, ids, seq_len=seq_len, batch_size=7, stride=1)
    with torch.no_grad():
        expected = [F.cross_entropy(model(ids[max(0, j - seq_len):j][None])[0, -1], ids[j]) for j in range(1, len(ids))]
    assert_close(nll, torch.stack(expected).double(), rtol=1e-5, atol=1e-5)


def test_split_metrics_definitions(text):
    tokenizer = CharTokenizer(text)
    model = confident_llama(dataclasses.replace(SMALL, vocab_size=tokenizer.vocab_size))
    part = text[:3000]
    m = split_metrics(model, tokenizer, part, seq_len=64, batch_size=8)
    nll, correct = token_nll(model, torch.tensor(tokenizer.encode(part)), 64, 8)
    assert m["tokens"] == len(part) - 1 and m["chars"] == len(part) - 1  # characters: the first is never a target
    assert_close(m["total_nll"], nll.sum().item(), rtol=1e-12, atol=0)
    assert_close(m["bits_per_char"], m["total_nll"] / (m["chars"] * math.log(2)), rtol=1e-12, atol=0)
    assert_close(m["perplexity"], math.exp(m["loss"]), rtol=1e-12, atol=0)
    assert_close(m["accuracy"], correct.double().mean().item(), rtol=1e-12, atol=0)


def test_count_baselines_against_numpy(text):
    tokenizer = CharTokenizer(text)
    vocab_size = tokenizer.vocab_size
    parts = split_text(text, (0.8, 0.2))
    train_ids = np.array(tokenizer.encode(parts["train"]))
    val_ids = np.array(tokenizer.encode(parts["val"]))
    metrics = {order: split_metrics(fit_count_model(torch.tensor(train_ids), vocab_size, order, alpha=0.5), tokenizer,
                                    parts["val"], seq_len=500) for order in (0, 1, 2)}
    assert_close(metrics[0]["loss"], math.log(vocab_size), rtol=1e-6, atol=0)  # uniform: exactly ln V
    counts = np.bincount(train_ids, minlength=vocab_size) + 0.5
    unigram_loss = -np.log(counts[val_ids[1:]] / counts.sum()).mean()
    assert_close(metrics[1]["loss"], unigram_loss, rtol=1e-6, atol=0)
    pairs = np.full((vocab_size, vocab_size), 0.5)
    np.add.at(pairs, (train_ids[:-1], train_ids[1:]), 1)
    bigram_loss = -np.log(pairs[val_ids[:-1], val_ids[1:]] / pairs[val_ids[:-1]].sum(axis=1)).mean()
    assert_close(metrics[2]["loss"], bigram_loss, rtol=1e-6, atol=0)
    assert metrics[2]["bits_per_char"] < metrics[1]["bits_per_char"] - 0.3  # context helps on real text
    best, losses = choose_alpha(torch.tensor(train_ids), torch.tensor(val_ids), vocab_size, 2, alphas=(1e-3, 0.1, 10.0))
    assert losses[best] == min(losses.values()) and losses[10.0] > losses[best]
    with pytest.raises(ValueError, match="alpha"):
        fit_count_model(torch.tensor(train_ids), vocab_size, 1, alpha=0.0)
    with pytest.raises(ValueError, match="order"):
        CountModel(torch.zeros(5), order=3)


def test_hybrid_at_llama_settings_is_llama():
    args = dataclasses.replace(SMALL, vocab_size=80)
    torch.manual_seed(3)
    llama = Llama(args).eval()
    torch.manual_seed(3)
    hybrid = Hybrid(HybridArgs(**args.to_dict())).eval()
    tokens = torch.randint(0, 80, (2, 50))
    with torch.no_grad():
        assert torch.equal(llama(tokens), hybrid(tokens))
    assert hybrid_flops_per_token(HybridArgs(**args.to_dict()), 64) == flops_per_token(args, 64)


def test_hybrid_switches_change_the_parameter_count_as_expected():
    args = HybridArgs(dim=48, n_layers=3, n_heads=4, vocab_size=100, multiple_of=32, max_seq_len=40)
    n_llama = count_parameters(Llama(ModelArgs(**{k: v for k, v in args.to_dict().items()
                                                 if k not in ("norm", "positions", "mlp")})))
    assert count_parameters(Hybrid(args)) == n_llama
    dim, hidden = args.dim, args.hidden_dim
    expected = {("norm", "layernorm"): (2 * 3 + 1) * dim, ("positions", "learned"): 40 * dim,
                ("mlp", "gelu"): 3 * (2 * dim * 4 * dim + 4 * dim + dim - 3 * dim * hidden)}
    for (name, value), delta in expected.items():
        model = Hybrid(dataclasses.replace(args, **{name: value}))
        assert count_parameters(model) - n_llama == delta, name
    everything = Hybrid(dataclasses.replace(args, norm="layernorm", positions="learned", mlp="gelu"))
    assert count_parameters(everything) - n_llama == sum(expected.values())
    assert all(isinstance(m, torch.nn.LayerNorm) for m in (everything.norm, everything.layers[0].ffn_norm))
    assert everything.output.weight is everything.tok_embeddings.weight  # still tied
    with pytest.raises(ValueError, match="positions"):
        HybridArgs(positions="alibi")


def test_learned_positions_cache_equals_recomputation_and_stop_at_max_seq_len():
    model = Hybrid(HybridArgs(dim=32, n_layers=2, n_heads=4, vocab_size=60, max_seq_len=24, positions="learned")).eval()
    tokens = torch.randint(0, 60, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        shifted = model(tokens[:, 1:])  # the same tokens at other positions: other logits
        model.enable_kv_cache(2)
        steps = [model(tokens[:, :10])] + [model(tokens[:, t:t + 1], start_pos=t) for t in range(10, 24)]
        model.disable_kv_cache()
    assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert not torch.allclose(shifted[:, 0], full[:, 1], atol=1e-3)
    assert (model.rope_cos == 1).all() and (model.rope_sin == 0).all()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_hybrid_trains_and_its_checkpoint_reloads(tmp_path):
    cfg = TrainConfig(arch="hybrid", model=HybridArgs(dim=32, n_layers=1, n_heads=2, max_seq_len=32, norm="layernorm",
                                                      positions="learned", mlp="gelu"),
                      tokenizer="char", max_chars=20_000, batch_size=4, seq_len=32, max_steps=6, warmup_steps=1,
                      lr=3e-3, eval_interval=6, eval_batches=2, dtype="float32", sample_tokens=0, out_dir=str(tmp_path))
    result = train(cfg, progress=False)
    assert result.losses[-1] < result.losses[0]
    model, _, loaded_cfg = load_trained_model(tmp_path)
    assert isinstance(model, Hybrid) and loaded_cfg.arch == "hybrid" and loaded_cfg.model.mlp == "gelu"
    for key, value in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_loss_by_position_is_the_mean_over_full_windows():
    model = confident_llama()
    ids = torch.randint(0, SMALL.vocab_size, (105,))
    got = loss_by_position(model, ids, seq_len=16)
    with torch.no_grad():
        windows = ids[:6 * 16 + 1].unfold(0, 17, 16)  # (6, 17)
        logits = model(windows[:, :-1])
        expected = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    assert_close(got, expected.double(), rtol=1e-5, atol=1e-6)


def test_pretrained_path_matches_gpt2lmheadmodel_loss(tmp_path, monkeypatch, text):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2LMHeadModel
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text[:20_000]], vocab_size=300, min_frequency=2, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    hf_model = GPT2LMHeadModel(hf_gpt2_config(GPT2Args(dim=32, n_layers=2, n_heads=4, vocab_size=bpe.get_vocab_size(),
                                                        max_seq_len=128))).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path)
    monkeypatch.delenv(GPT2_PATH_ENV, raising=False)
    assert pretrained_gpt2_dir() is None and pretrained_gpt2_dir(tmp_path / "missing") is None
    monkeypatch.setenv(GPT2_PATH_ENV, str(tmp_path))
    assert pretrained_gpt2_dir() == tmp_path
    model, tokenizer = load_gpt2_with_tokenizer(pretrained_gpt2_dir())
    window = text[1000:1150]
    window_ids = torch.tensor([tokenizer.encode(window)])
    assert 10 < window_ids.shape[1] <= 128
    with torch.no_grad():
        expected = hf_model(window_ids, labels=window_ids).loss.item()
    m = split_metrics(model, tokenizer, window, seq_len=128)
    assert_close(m["loss"], expected, rtol=1e-5, atol=1e-5)
    assert m["chars"] == len(window) - len(tokenizer.decode(window_ids[0, :1].tolist()))
    train_ids = torch.tensor(tokenizer.encode(text[:20_000]))
    losses = finetune(model, train_ids, steps=8, batch_size=4, seq_len=32, lr=3e-3)
    assert len(losses) == 8 and losses[-1] < losses[0] and not model.training
