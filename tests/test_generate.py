"Generation's promises: samplers against sort-based references, cache = recomputation, batch = one by one, = transformers, streaming, errors, the CLI."
import dataclasses
import io
import math
import re
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from tinyllama.data import load_corpus
from tinyllama.generate import (StreamDecoder, apply_temperature, check_sampling, decode_tokens_per_sec, encode_prompts,
                                generate, generate_tokens, greedy, left_pad, main, sample_next, sampling_probs,
                                stream_generate, time_per_token, top_k_filter, top_p_filter)
from tinyllama.model import Llama, ModelArgs, to_hf_llama
from tinyllama.tokenizer import CharTokenizer, train_tokenizer
from tinyllama.train import TRAIN_PRESETS, load_trained_model, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    "A checkpoint of the tiny preset, trained for seconds, with a 256-token context so that 200 tokens fit."
    tiny = TRAIN_PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, out_dir=str(tmp_path_factory.mktemp("run")), max_chars=100_000, max_steps=10,
                              eval_interval=10, sample_tokens=0, model=dataclasses.replace(tiny.model, max_seq_len=256))
    train(cfg, progress=False)
    return cfg.out_dir + "/best"


@pytest.fixture(scope="module")
def bpe():
    "A small byte-fallback BPE tokenizer: characters outside its training text become byte tokens."
    return train_tokenizer(load_corpus()[:20_000], 400)


def randomized(args: ModelArgs, seed: int = 0) -> Llama:
    "A model with every weight random and logits of order 1, so that greedy choices are far from ties."
    torch.manual_seed(seed)
    model = Llama(args).eval()
    std = 1.5 / math.sqrt(args.dim)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    return model


SMALL = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=400, multiple_of=16, max_seq_len=256)

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=40)


# ---------------------------------------------------------------- sampling

def test_greedy_is_the_first_argmax():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 3.0], [-5.0, -4.0, -6.0, -4.5]])
    assert greedy(logits).tolist() == [1, 0, 1]
    assert greedy(logits[0]).item() == 1


@given(logit_rows)
def test_temperature_limits(values):
    logits = torch.tensor(values)
    assert_close(apply_temperature(logits, 1.0), logits, rtol=0, atol=0)
    # the largest probability only grows as the temperature falls, and T -> 0 puts all mass on the argmax
    tops = [apply_temperature(logits, t).softmax(-1).max().item() for t in (10.0, 1.0, 0.1, 0.01)]
    assert all(a <= b + 1e-6 for a, b in zip(tops, tops[1:]))
    gap = (logits.max() - logits[logits < logits.max()].max()).item() if (logits < logits.max()).any() else None
    if gap is not None and gap > 0.2 and (logits == logits.max()).sum() == 1:
        assert_close(apply_temperature(logits, 0.01).softmax(-1), F.one_hot(greedy(logits), len(values)).float(),
                     rtol=0, atol=1e-6)
    # T -> infinity: uniform
    assert_close(apply_temperature(logits, 1e6).softmax(-1), torch.full((len(values),), 1 / len(values)),
                 rtol=0, atol=1e-4)


@given(logit_rows, st.integers(1, 45))
def test_top_k_matches_sort_reference(values, top_k):
    logits = torch.tensor(values)
    kept = top_k_filter(logits, top_k).isfinite()
    ranked = sorted(range(len(values)), key=lambda i: -values[i])
    if top_k >= len(values):
        assert kept.all()
        return
    threshold = values[ranked[top_k - 1]]
    reference = {i for i, v in enumerate(values) if v >= threshold}  # the k largest, and ties with the k-th
    assert set(kept.nonzero().flatten().tolist()) == reference
    assert kept.sum() >= top_k
    if len(set(values)) == len(values):
        assert set(kept.nonzero().flatten().tolist()) == set(ranked[:top_k])
    assert torch.equal(top_k_filter(logits, top_k)[kept], logits[kept])  # kept logits untouched


def nucleus_reference(values: list[float], top_p: float) -> set[int]:
    "Add tokens in decreasing order of probability (float64) until the total reaches top_p."
    probs = torch.tensor(values, dtype=torch.float64).softmax(-1).tolist()
    kept, total = set(), 0.0
    for i in sorted(range(len(values)), key=lambda i: -probs[i]):
        if total >= top_p:
            break
        kept.add(i)
        total += probs[i]
    return kept


@given(logit_rows, st.floats(0.01, 1.0))
def test_top_p_matches_reference_and_is_minimal(values, top_p):
    logits = torch.tensor(values)
    probs64 = torch.tensor(values, dtype=torch.float64).softmax(-1)
    # stay away from thresholds that float32 and float64 could round to different sides of
    cumulative = probs64.sort(descending=True).values.cumsum(0)
    assume((cumulative - top_p).abs().min() > 1e-5)
    kept = top_p_filter(logits, top_p).isfinite()
    kept_probs = probs64[kept].sort().values
    assert kept_probs.sum() >= top_p - 1e-6  # reaches p
    assert kept_probs[1:].sum() < top_p  # and is the smallest such set: without its least likely member it does not
    assert probs64[kept].min() >= probs64[~kept].max() if (~kept).any() else True  # the most likely tokens
    if len(set(probs64.tolist())) == len(values):  # no tied probabilities (distinct logits can still tie: 0 and 1e-43)
        assert set(kept.nonzero().flatten().tolist()) == nucleus_reference(values, top_p)


def test_top_p_batch_rows_are_independent():
    logits = torch.randn(5, 30) * 3
    together = top_p_filter(logits, 0.8)
    for row in range(5):
        assert torch.equal(together[row], top_p_filter(logits[row], 0.8))
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampling_probs_composition():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    assert torch.equal(sampling_probs(logits, temperature=0), F.one_hot(torch.tensor([0]), 5).float())
    assert torch.equal(sampling_probs(logits, 1.0, top_k=1), F.one_hot(torch.tensor([0]), 5).float())
    assert torch.equal(sampling_probs(logits, 1.0, top_p=1e-3), F.one_hot(torch.tensor([0]), 5).float())
    expected = torch.tensor([[2.0, 1.0, 0.5]]).div(0.7).softmax(-1)
    assert_close(sampling_probs(logits, 0.7, top_k=3)[:, :3], expected)
    # top-p measures mass after the temperature: at T = 0.1 the top token alone holds more than 0.9
    assert sampling_probs(logits, 0.1, top_p=0.9).count_nonzero() == 1
    assert sampling_probs(logits, 5.0, top_p=0.9).count_nonzero() == 5


def test_seeded_sampling_is_reproducible_and_follows_the_probabilities():
    logits = torch.tensor([1.0, 0.0, 2.0, -0.5, 1.5, -3.0])
    rows = logits.expand(40_000, -1)
    first = sample_next(rows, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, sample_next(rows, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(first, sample_next(rows, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(8)))
    frequencies = torch.bincount(first, minlength=6) / len(first)
    expected = sampling_probs(logits, 1.0, top_p=0.9)
    assert_close(frequencies, expected, rtol=0, atol=0.012)  # ~5 standard errors
    assert frequencies[expected == 0].sum() == 0  # never a token outside the nucleus


@pytest.mark.parametrize("kwargs,name", [(dict(temperature=-0.1), "temperature=-0.1"), (dict(temperature=float("nan")), "temperature=nan"),
                                         (dict(temperature=1, top_k=0), "top_k=0"), (dict(temperature=1, top_k=2.5), "top_k=2.5"),
                                         (dict(temperature=1, top_p=0.0), "top_p=0.0"), (dict(temperature=1, top_p=1.01), "top_p=1.01")])
def test_bad_sampling_settings_name_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        check_sampling(**kwargs)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        sample_next(torch.zeros(3), **kwargs)


# ---------------------------------------------------------------- the loop

def naive_greedy(model: Llama, ids: list[int], n: int) -> list[int]:
    "The reference: a full forward pass over the whole sequence for every new token."
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[-n:]


def test_greedy_with_cache_equals_recomputation_over_200_tokens():
    model = randomized(SMALL)
    prompt = [5, 9, 11, 7, 30, 12, 6, 8]
    cached = torch.cat(list(generate_tokens(model, [prompt], 200))).tolist()
    recomputed = torch.cat(list(generate_tokens(model, [prompt], 200, use_cache=False))).tolist()
    assert len(cached) == 200 and cached == recomputed == naive_greedy(model, prompt, 200)
    assert len(set(cached)) > 10  # not a degenerate constant stream


def test_sampling_with_cache_equals_recomputation_over_200_tokens(trained):
    # a barely trained model's greedy text is one repeated character; seeded sampling exercises it properly
    model, _ = trained
    prompt = [5, 9, 11, 7, 30, 12, 6, 8]
    runs = [torch.cat(list(generate_tokens(model, [prompt], 200, temperature=1.0, top_k=30,
                                           generator=torch.Generator().manual_seed(0), use_cache=use_cache))).tolist()
            for use_cache in (True, False)]
    assert len(runs[0]) == 200 and runs[0] == runs[1] and len(set(runs[0])) > 10


def test_batch_of_different_lengths_equals_one_by_one():
    model = randomized(SMALL, seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 200, 300], [17] * 12]
    batched = torch.stack(list(generate_tokens(model, prompts, 30, pad_id=3)), dim=1)  # (B, 30)
    recomputed = torch.stack(list(generate_tokens(model, prompts, 30, pad_id=3, use_cache=False)), dim=1)
    alone = torch.stack([torch.cat(list(generate_tokens(model, [p], 30))) for p in prompts])
    assert torch.equal(batched, alone) and torch.equal(recomputed, alone)
    # sampled, a batch row sees the same distribution: logits of a padded row equal those of the row alone
    tokens, key_mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        padded_logits = model(tokens, key_mask=key_mask)[:, -1]  # (B, vocab_size)
        for row, p in enumerate(prompts):
            assert_close(padded_logits[row], model(torch.tensor([p]))[0, -1], rtol=0, atol=1e-5)


def test_generate_batch_equals_one_by_one_with_text(trained):
    model, tokenizer = trained
    prompts = ["ROMEO:\n", "", "First Citizen:\nBefore we proceed", "O"]
    together = generate(model, tokenizer, prompts, max_new_tokens=25, temperature=0)
    for p, g in zip(prompts, together):
        alone = generate(model, tokenizer, p, max_new_tokens=25, temperature=0)
        assert g == alone and g.prompt == p and g.text == tokenizer.decode(g.ids)
    assert together[1].prompt_ids == [tokenizer.bos_id]  # an empty prompt starts from BOS
    assert together[0].stop_reason in ("length", "eos")


@pytest.mark.parametrize("which", ["trained", "random"])
def test_same_tokens_as_transformers_generate(which, trained, bpe):
    # the barely trained model's greedy text is dull; random weights over a BPE vocabulary make varied tokens
    model, tokenizer = trained if which == "trained" else (randomized(dataclasses.replace(SMALL, vocab_size=bpe.vocab_size)), bpe)
    hf_model = to_hf_llama(model, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                           pad_token_id=tokenizer.pad_id)
    prompts = ["KING RICHARD III:\nNow", "JULIET:\n", "An"]
    ids = encode_prompts(tokenizer, prompts)
    with torch.no_grad():
        single = hf_model.generate(torch.tensor([ids[0]]), do_sample=False, max_new_tokens=60)[0, len(ids[0]):]
        tokens, key_mask = left_pad(ids, tokenizer.pad_id)
        batch = hf_model.generate(tokens, attention_mask=key_mask.long(), do_sample=False, max_new_tokens=40)
    ours = generate(model, tokenizer, prompts[0], max_new_tokens=60, temperature=0)
    assert single.tolist()[:len(ours.ids)] == ours.ids and len(ours.ids) > 0
    ours_batch = generate(model, tokenizer, prompts, max_new_tokens=40, temperature=0)
    for g, row in zip(ours_batch, batch[:, tokens.shape[1]:].tolist()):
        assert row[:len(g.ids)] == g.ids
    if which == "random":
        assert len(set(ours.ids)) > 10 and all(len(g.ids) > 10 for g in ours_batch)


def test_stops_at_eos_and_finished_rows_repeat_it():
    model = randomized(SMALL, seed=2)
    prompts = [[10, 11, 12], [50, 60]]
    free = torch.stack(list(generate_tokens(model, prompts, 20)), dim=1)  # (2, 20) without EOS
    eos = free[0, 4].item()  # pretend the 5th token of row 0 is EOS
    stopped = torch.stack(list(generate_tokens(model, prompts, 20, eos_id=eos)), dim=1)
    for row in range(2):
        hits = (free[row] == eos).nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else 20
        assert torch.equal(stopped[row, :end], free[row, :end])  # identical up to and including the EOS
        assert (stopped[row, end:] == eos).all()  # then EOS again, while other rows go on
    assert stopped.shape[1] == 20 or (stopped[:, -1] == eos).all()


def test_generation_stop_reasons(trained):
    model, tokenizer = trained
    g = generate(model, tokenizer, "ROMEO:", max_new_tokens=5, temperature=0)
    assert g.stop_reason == "length" and len(g.ids) == 5
    long_prompt = "a" * (model.args.max_seq_len - 3)
    g = generate(model, tokenizer, long_prompt, max_new_tokens=50, temperature=0)
    assert g.stop_reason == "context" and len(g.ids) == 3  # prompt + completion fill the context exactly


def test_bad_inputs_raise_clear_errors(trained):
    model, tokenizer = trained
    context = model.args.max_seq_len
    with pytest.raises(ValueError, match=f"max_seq_len={context}"):
        generate(model, tokenizer, "a" * context, max_new_tokens=1)
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"max_new_tokens={n}"):
            generate(model, tokenizer, "ROMEO:", max_new_tokens=n)
        with pytest.raises(ValueError, match=f"max_new_tokens={n}"):
            stream_generate(model, tokenizer, "ROMEO:", max_new_tokens=n)  # raised at the call, not at next()
    with pytest.raises(ValueError, match=r"temperature=-0\.5"):
        generate(model, tokenizer, "ROMEO:", temperature=-0.5)
    for top_p in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=f"top_p={top_p}"):
            generate(model, tokenizer, "ROMEO:", top_p=top_p)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, tokenizer, "ROMEO:", top_k=0)
    other = CharTokenizer("abc")
    with pytest.raises(ValueError, match=f"vocab_size={other.vocab_size}.*vocab_size={model.args.vocab_size}"):
        generate(model, other, "abc")
    with pytest.raises(ValueError, match="vocabulary"):
        list(generate_tokens(model, [[1, model.args.vocab_size]], 3))
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, tokenizer, [])
    # the model is left as it was found: training mode, no cache
    model.train()
    generate(model, tokenizer, "ROMEO:", max_new_tokens=3)
    assert model.training and all(layer.attention.cache is None for layer in model.layers)
    model.eval()


# ---------------------------------------------------------------- streaming

def test_stream_decoder_never_splits_a_character(bpe):
    text = "the king ☃ café 😀, ünïcödé ok"
    ids = bpe.encode(text)
    assert any(bpe.sp.is_byte(i) for i in ids)  # the test needs byte-fallback tokens
    stream = StreamDecoder(bpe)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == bpe.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    emoji = [i for i in bpe.encode("😀")]
    assert len(emoji) == 4
    stream = StreamDecoder(bpe)
    assert [stream.push(i) for i in emoji] == ["", "", "", "😀"]


def test_stream_decoder_invalid_bytes_match_decode(bpe):
    byte_id = {int(bpe.sp.id_to_piece(i)[3:5], 16): i for i in range(bpe.vocab_size) if bpe.sp.is_byte(i)}
    x = bpe.encode("x")
    cases = [[byte_id[0xF0], byte_id[0x9F]] + x,  # an emoji cut short, then text
             [byte_id[0x80]] + x + [byte_id[0xE2]],  # a stray continuation byte; an unfinished char at the end
             [byte_id[0xC3]] * 5]
    for ids in cases:
        stream = StreamDecoder(bpe)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == bpe.decode(ids)


def test_stream_generate_equals_generate(trained, bpe):
    model, tokenizer = trained
    kwargs = dict(max_new_tokens=60, temperature=0.9, top_p=0.95, seed=3)
    assert "".join(stream_generate(model, tokenizer, "ROMEO:\n", **kwargs)) == generate(model, tokenizer, "ROMEO:\n", **kwargs).text
    # random weights over a byte-fallback vocabulary: many byte tokens, valid and invalid UTF-8 alike
    model = randomized(dataclasses.replace(SMALL, vocab_size=bpe.vocab_size))
    kwargs = dict(max_new_tokens=150, temperature=1.5, seed=0)
    pieces = list(stream_generate(model, bpe, "the", **kwargs))
    expected = generate(model, bpe, "the", **kwargs)
    assert "".join(pieces) == expected.text
    assert sum(bpe.sp.is_byte(i) for i in expected.ids) > 10


# ---------------------------------------------------------------- timing helpers

def test_timing_helpers_return_positive_numbers():
    model = randomized(SMALL)
    assert time_per_token(model, 32, use_cache=True, repeats=2) > 0
    assert time_per_token(model, 32, use_cache=False, repeats=2) > 0
    assert all(layer.attention.cache is None for layer in model.layers)
    rate = decode_tokens_per_sec(lambda n: list(generate_tokens(model, [[5, 6]], n)), n_tokens=8, repeats=1)
    assert rate > 0
    with pytest.raises(ValueError, match="seq_len=257"):
        time_per_token(model, 257)


# ---------------------------------------------------------------- the command line

def test_cli_streams_the_same_text_as_generate(trained, checkpoint, capsys, monkeypatch):
    model, tokenizer = trained
    prompt = "ROMEO:\nWhat"
    argv = ["--checkpoint", checkpoint, "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "20",
            "--top-p", "0.9", "--seed", "5"]
    main(argv + ["--prompt", prompt])
    expected = generate(model, tokenizer, prompt, max_new_tokens=40, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    assert capsys.readouterr().out == prompt + expected.text + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    main(argv + ["--prompt", "-"])
    assert capsys.readouterr().out == prompt + expected.text + "\n"


@pytest.mark.parametrize("extra,message", [(["--top-p", "1.5"], "top_p=1.5"), (["--temperature", "-1"], "temperature=-1"),
                                           (["--top-k", "0"], "top_k=0"), (["--max-new-tokens", "0"], "max_new_tokens=0")])
def test_cli_bad_arguments(checkpoint, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", checkpoint, "--prompt", "ROMEO:"] + extra)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""  # nothing printed before the error


def test_cli_checkpoint_problems(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert "no checkpoint" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    shutil.copytree(checkpoint, mixed)
    CharTokenizer("abcdef").save(mixed / "tokenizer.model")  # a tokenizer from somewhere else
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(mixed), "--prompt", "abc"])
    assert re.search(r"mixed/tokenizer\.model has \d+ bytes, manifest\.json says \d+", capsys.readouterr().err)  # noticed first
    (mixed / "manifest.json").unlink()  # a checkpoint from before the manifest: the shapes must notice
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(mixed), "--prompt", "abc"])
    assert "do not belong together" in capsys.readouterr().err


def test_cli_refuses_stdin_that_is_not_utf8(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("ROMEO: ¿qué?".encode("latin-1"))))
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", checkpoint, "--prompt", "-"])
    assert exit_info.value.code == 2 and "standard input is not UTF-8" in capsys.readouterr().err
