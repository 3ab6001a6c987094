"Speculative decoding (appendix E): exact for greedy and for sampling, rollback by position, errors that name the argument."
import contextlib
import copy

import pytest
import torch
from torch.testing import assert_close

import tinyllama.speculative as speculative
from tinyllama.generate import generate_tokens, sampling_probs
from tinyllama.model import Llama, ModelArgs
from tinyllama.speculative import (SpeculativeStats, check_same_tokenizer, chi_square_test,
                                   continuation_probs, draft_config, kv_cached, measure_speculative,
                                   speculative_decode, verify_draft, verify_greedy)
from tinyllama.tokenizer import CharTokenizer
from tinyllama.train import TRAIN_PRESETS

VOCAB = 6  # 6 ** 3 = 216 three-token continuations: enumerable, and each is drawn often


def random_llama(seed: int, dim: int = 16, n_layers: int = 1, vocab_size: int = VOCAB, std: float = 0.5,
                 max_seq_len: int = 32) -> Llama:
    "A random model with large weights (std 0.5), so that its next-token distributions are far from uniform."
    torch.manual_seed(seed)
    model = Llama(ModelArgs(dim=dim, n_layers=n_layers, n_heads=2, vocab_size=vocab_size, multiple_of=8,
                            max_seq_len=max_seq_len))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.normal_(0, std)
    return model.eval()


def perturbed(model: Llama, seed: int, noise: float = 0.02) -> Llama:
    "A copy of `model` with noise on its weights: a draft that agrees with it often, but not always."
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in other.parameters():
            if weight.ndim == 2:
                weight.add_(noise * torch.randn(weight.shape, generator=generator))
    return other


TARGET = random_llama(0, n_layers=2)
DRAFTS = {"independent": random_llama(1, dim=8), "perturbed": perturbed(TARGET, 2), "identical": copy.deepcopy(TARGET)}


@pytest.mark.parametrize("draft_name", list(DRAFTS))
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_is_plain_greedy_token_for_token(draft_name, k):
    draft = DRAFTS[draft_name]
    for seed in range(4):
        prompt = torch.randint(0, VOCAB, (1 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = torch.cat(list(generate_tokens(TARGET, [prompt], 20))).tolist()
        ids, stats = speculative_decode(TARGET, draft, prompt, 20, k=k)
        assert ids == plain, (draft_name, k, seed)
        assert stats.generated == 20 == stats.accepted + stats.rounds and stats.rejected <= stats.rounds
        if draft_name == "identical":  # every proposal kept: k + 1 tokens a round, fewer only at the end
            assert stats.acceptance_rate == 1.0 == stats.kept_fraction and stats.rejected == 0
            assert stats.rounds == -(-20 // (k + 1))


def test_acceptance_depends_on_the_draft():
    rates = {name: speculative_decode(TARGET, draft, [1, 2, 3], 24, k=4)[1].acceptance_rate
             for name, draft in DRAFTS.items()}
    assert rates["identical"] == 1.0 > rates["perturbed"] > rates["independent"]


def always_accept(draft_ids, draft_probs, target_probs, generator):
    "Broken: keep every proposal."
    return len(draft_ids), int(torch.multinomial(target_probs[-1], 1, generator=generator))


def resample_from_p(draft_ids, draft_probs, target_probs, generator):
    "Broken: a rejected proposal is replaced from p instead of max(0, p - q)."
    k, rows = len(draft_ids), torch.arange(len(draft_ids))
    kept = torch.rand(k, generator=generator) * draft_probs[rows, draft_ids] < target_probs[rows, draft_ids]
    n_kept = int(kept.long().cumprod(0).sum())
    return n_kept, int(torch.multinomial(target_probs[n_kept], 1, generator=generator))


def chi_square_of(verify, n_samples: int, temperature: float = 1.0, top_k=None, top_p=None, k: int = 2,
                  draft=DRAFTS["independent"], seed: int = 0) -> float:
    "p-value of the speculative samples' three-token continuations against the target's exact distribution."
    prompt, generator, counts = [1, 2], torch.Generator().manual_seed(seed), torch.zeros(VOCAB ** 3)
    for _ in range(n_samples):
        ids, _ = speculative_decode(TARGET, draft, prompt, 3, k=k, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator, verify=verify)
        counts[(ids[0] * VOCAB + ids[1]) * VOCAB + ids[2]] += 1
    return chi_square_test(counts, continuation_probs(TARGET, prompt, 3, temperature, top_k, top_p))[2]


N_SAMPLES = 1_500  # enough to reject the broken rules by far (p-values below 1e-20)


@pytest.mark.parametrize("temperature, top_k, top_p, k", [(1.0, None, None, 2), (0.7, 3, None, 3), (1.3, None, 0.8, 1)])
def test_sampled_output_has_the_targets_distribution(temperature, top_k, top_p, k):
    assert chi_square_of(verify_draft, N_SAMPLES, temperature, top_k, top_p, k) > 1e-3


@pytest.mark.parametrize("broken", [always_accept, resample_from_p])
def test_the_test_detects_a_broken_rule(broken):
    assert chi_square_of(broken, N_SAMPLES) < 1e-6


def test_verify_draft_first_token_is_the_targets():
    "k = 1 on fixed p and q: the first emitted token has distribution p (chi-square), and acceptance sum(min(p, q))."
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(8, generator=generator), 0)
    q = torch.softmax(2 * torch.randn(8, generator=generator), 0)
    counts, kept_total, n = torch.zeros(8), 0, 20_000
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=generator)
        n_kept, next_id = verify_draft(d, q[None], torch.stack([p, p]), generator)
        counts[d.item() if n_kept else next_id] += 1
        kept_total += n_kept
    assert chi_square_test(counts, p)[2] > 1e-3
    beta = torch.minimum(p, q).sum().item()
    assert abs(kept_total / n - beta) < 5 * (beta * (1 - beta) / n) ** 0.5


def test_verify_draft_greedy_and_shapes():
    one_hot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids, dtype=torch.long), 10).float()
    target = one_hot([3, 4, 5, 6])
    logits = target + 0.1 * torch.rand(4, 10)  # argmax 3, 4, 5, 6
    for ids, expected in [([3, 4, 5], (3, 6)), ([3, 9, 5], (1, 4)), ([9, 4, 5], (0, 3)), ([], (0, 3))]:
        draft_ids = torch.tensor(ids, dtype=torch.long)
        rows = len(ids) + 1
        assert verify_draft(draft_ids, one_hot(ids).reshape(len(ids), 10), target[:rows]) == expected
        assert verify_greedy(draft_ids, logits[:rows]) == expected
    with pytest.raises(ValueError, match="k \\+ 1 rows"):
        verify_draft(torch.tensor([3]), one_hot([3]), target[:1])
    with pytest.raises(ValueError, match="k \\+ 1 rows"):
        verify_greedy(torch.tensor([3]), logits[:1])


def test_rollback_is_moving_the_position():
    "Stale cache entries after a rejection change nothing: the next write at that position replaces them."
    prompt, right, wrong = [1, 2, 3], [4, 5], [0, 0]
    with torch.inference_mode():
        with kv_cached(TARGET, 5):
            TARGET(torch.tensor([prompt]))
            clean = TARGET(torch.tensor([right]), start_pos=3)
            clean_cache = [layer.attention.cache.v.clone() for layer in TARGET.layers]
        with kv_cached(TARGET, 5):
            TARGET(torch.tensor([prompt + wrong]))
            rolled_back = TARGET(torch.tensor([right]), start_pos=3)
            for layer, values in zip(TARGET.layers, clean_cache):
                assert_close(layer.attention.cache.v, values)
    assert_close(rolled_back, clean)
    assert all(layer.attention.cache is None for layer in TARGET.layers)


def test_caches_after_speculation_hold_the_committed_tokens(monkeypatch):
    "After a generation with rejections, the caches' committed positions equal a fresh prefill of the committed tokens."
    caches = {}

    @contextlib.contextmanager
    def keeping(model, max_seq_len):  # kv_cached, but remember the caches it hands back
        with kv_cached(model, max_seq_len):
            yield model
            caches[id(model)] = [layer.attention.cache for layer in model.layers]
    monkeypatch.setattr(speculative, "kv_cached", keeping)
    target, draft, prompt = TARGET, DRAFTS["perturbed"], [1, 2, 3]
    ids, stats = speculative_decode(target, draft, prompt, 16, k=4)
    assert 0 < stats.accepted < stats.drafted  # some proposals were rejected: stale entries were written
    sequence = torch.tensor([prompt + ids])  # (1, n)
    n = sequence.shape[1]
    # the target holds every committed token but the last; the draft may lag up to two more behind
    for model, valid in ((target, n - 1), (draft, n - 3)):
        with torch.inference_mode(), kv_cached(model, n):
            model(sequence)
            for layer, cache in zip(model.layers, caches[id(model)]):
                assert_close(cache.k[:, :valid], layer.attention.cache.k[:, :valid], atol=1e-5, rtol=1e-5)
                assert_close(cache.v[:, :valid], layer.attention.cache.v[:, :valid], atol=1e-5, rtol=1e-5)


def test_length_eos_and_context():
    ids, stats = speculative_decode(TARGET, DRAFTS["perturbed"], [1], 7, k=8)
    assert len(ids) == 7 == stats.generated
    plain = torch.cat(list(generate_tokens(TARGET, [[1]], 20))).tolist()
    eos = plain[5]
    ids, _ = speculative_decode(TARGET, DRAFTS["perturbed"], [1], 20, k=3, eos_id=eos)
    assert ids == plain[:plain.index(eos) + 1]
    ids, _ = speculative_decode(TARGET, DRAFTS["identical"], [1] * 28, 100, k=8)  # max_seq_len 32
    assert len(ids) == 4


def test_errors_name_the_argument():
    target, draft = TARGET, DRAFTS["independent"]
    for kwargs, match in [({"k": 0}, "k=0"), ({"max_new_tokens": 0}, "max_new_tokens=0"),
                          ({"prompt_ids": []}, "prompt has 0 tokens"), ({"prompt_ids": [VOCAB]}, "vocab_size"),
                          ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=match):
            speculative_decode(target, draft, **({"prompt_ids": [1], "max_new_tokens": 4} | kwargs))
    with pytest.raises(ValueError, match="vocab_size=7"):
        speculative_decode(target, random_llama(3, vocab_size=7), [1], 4)
    with pytest.raises(ValueError, match="deepcopy"):
        speculative_decode(target, target, [1], 4)


def test_stats():
    stats = SpeculativeStats(rounds=4, drafted=12, accepted=6, rejected=3, generated=10)
    assert stats.acceptance_rate == 6 / 9 and stats.kept_fraction == 0.5 and stats.tokens_per_round == 2.5
    assert SpeculativeStats().acceptance_rate != SpeculativeStats().acceptance_rate  # nan before any proposal


def test_chi_square_test_against_closed_forms():
    statistic, dof, p_value = chi_square_test(torch.tensor([10.0, 30.0]), torch.tensor([0.5, 0.5]))
    assert (statistic, dof) == (10.0, 1) and abs(p_value - 0.0015654022580025) < 1e-12  # erfc(sqrt(5))
    statistic, dof, p_value = chi_square_test(torch.tensor([30.0, 20.0, 10.0]), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    assert abs(statistic - (0 + 4 / 18 + 4 / 12)) < 1e-12 and dof == 2
    assert abs(p_value - torch.exp(torch.tensor(-statistic / 2, dtype=torch.float64)).item()) < 1e-12  # 2 dof: e^(-x/2)
    assert chi_square_test(torch.tensor([5.0, 1.0]), torch.tensor([1.0, 0.0]))[2] == 0.0  # an impossible outcome
    with pytest.raises(ValueError, match="1-D of one shape"):
        chi_square_test(torch.zeros(3), torch.ones(4))


def test_continuation_probs_is_a_distribution_and_matches_the_chain_rule():
    probs = continuation_probs(TARGET, [1, 2], 2, temperature=0.9, top_k=4)
    assert probs.shape == (VOCAB ** 2,) and abs(probs.sum().item() - 1) < 1e-5
    with torch.no_grad():
        first = sampling_probs(TARGET(torch.tensor([[1, 2]]))[0, -1], 0.9, 4)
        second = sampling_probs(TARGET(torch.tensor([[1, 2, 3]]))[0, -1], 0.9, 4)
    assert_close(probs[3 * VOCAB + 4], first[3] * second[4])
    with pytest.raises(ValueError, match="temperature"):
        continuation_probs(TARGET, [1], 2, temperature=0.0)


def test_draft_config_keeps_the_tokenizer_fields():
    target_cfg = TRAIN_PRESETS["cpu"]
    cfg = draft_config(target_cfg, dim=64, n_layers=2, max_steps=100, out_dir="/tmp/x", lr=3e-3)
    for name in ("tokenizer", "max_chars", "split", "seq_len"):
        assert getattr(cfg, name) == getattr(target_cfg, name)
    assert cfg.model.vocab_size == target_cfg.model.vocab_size and cfg.model.max_seq_len == target_cfg.model.max_seq_len
    assert (cfg.model.dim, cfg.model.n_layers, cfg.max_steps, cfg.lr, cfg.out_dir) == (64, 2, 100, 3e-3, "/tmp/x")
    check_same_tokenizer(CharTokenizer("abc"), CharTokenizer("cab"))
    with pytest.raises(ValueError, match="token id 6"):
        check_same_tokenizer(CharTokenizer("abc"), CharTokenizer("abd"))
    with pytest.raises(ValueError, match="vocab_size"):
        check_same_tokenizer(CharTokenizer("abc"), CharTokenizer("ab"))


def test_measure_speculative():
    rows = measure_speculative(TARGET, DRAFTS["identical"], [[1, 2], [3]], 9, ks=[2], repeats=1)
    assert [row["k"] for row in rows] == [0, 2]
    assert rows[1]["acceptance"] == 1.0 == rows[1]["proposals kept"] and rows[0]["speed-up"] == 1.0
    assert rows[1]["tokens per target pass"] == 18 / 6  # 9 tokens a prompt, 3 a round
