"Evaluation: whole-split metrics against brute-force loops, count baselines against numpy, the pretrained GPT-2 path against transformers."
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tinyllama.data import load_corpus, split_text
from tinyllama.evaluate import (GPT2_PATH_ENV, CountModel, choose_alpha, finetune, fit_count_model,
                                load_gpt2_with_tokenizer, loss_by_position, pretrained_gpt2_dir, split_metrics)
from tinyllama.measure import evaluate, token_nll, window_plan  # chapter 08's; chapter 15 scores with them
from tinyllama.gpt2 import GPT2Args, hf_gpt2_config
from tinyllama.model import Llama, ModelArgs
from tinyllama.tokenizer import CharTokenizer

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


def test_split_metrics_is_chapter_08s_evaluate_on_the_encoded_text(text):
    "One scorer: split_metrics only encodes and counts characters; BPE's first token may span several characters."
    from tinyllama.tokenizer import train_tokenizer
    tokenizer = train_tokenizer(text[:20_000], 400)
    model = confident_llama(dataclasses.replace(SMALL, vocab_size=tokenizer.vocab_size))
    part = text[20_000:23_000]
    ids = torch.tensor(tokenizer.encode(part))
    first = len(tokenizer.decode(ids[:1].tolist()))
    for stride in (None, 16):
        m = split_metrics(model, tokenizer, part, seq_len=64, batch_size=4, stride=stride)
        assert m == evaluate(model, ids, len(part) - first, 64, 4, stride)
    assert m["chars"] == len(part) - first and m["tokens"] == len(ids) - 1
    with pytest.raises(ValueError, match="need at least 2"):
        split_metrics(model, tokenizer, part[:1], seq_len=64)


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


def test_evaluate_refuses_a_nan_loss_instead_of_dropping_it():
    class NaNAtOnePosition(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1))  # token_nll finds the device from a buffer

        def forward(self, tokens):
            logits = torch.zeros(*tokens.shape, 8)
            logits[:, 3] = float("nan")  # one position of every window
            return logits
    ids = torch.arange(49) % 8  # 48 targets: six full windows of 8
    with pytest.raises(FloatingPointError, match="NaN at"):
        evaluate(NaNAtOnePosition(), ids, n_chars=48, seq_len=8)
