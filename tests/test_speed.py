"Appendix D's tools: fair timing, the profile by category, the static decode step, the stable peak. No timed asserts."
import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.profiler import profile

import tinyllama.device as device
import tinyllama.speed as speed
from tinyllama.generate import generate_tokens
from tinyllama.model import PRESETS, Llama
from tinyllama.norm import RMSNorm
from tinyllama.rope import apply_rope, precompute_rope
from tinyllama.device import stable_peak
from tinyllama.speed import (CompiledDecoder, decode_step, median_times, profiler_labels,
                             time_by_category, top_operators)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Llama(dataclasses.replace(PRESETS["tiny"], max_seq_len=48)).eval()


def test_median_times_gives_every_runner_and_rejects_bad_counts():
    calls = []
    out = median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert set(out) == {"a", "b"} and all(s >= 0 for s in out.values())
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then in turn
    for bad in ({"repeats": 0}, {"calls": 0}, {"warmup": -1}, {"repeats": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            median_times({"a": lambda: None}, **bad)


def test_profile_categories_cover_forward_and_backward_and_add_up():
    model = nn.Sequential(nn.Linear(16, 16), RMSNorm(16))
    with profiler_labels(model, {RMSNorm: "norm"}), profile() as prof:
        model(torch.randn(8, 16, requires_grad=True)).square().sum().backward()
    times = time_by_category(prof, ["norm"])
    assert {"matmul", "norm"} <= set(times.index)
    assert times.sum() == pytest.approx(sum(e.self_cpu_time_total for e in prof.events()) / 1e3)
    norm_forward = {e.sequence_nr for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.name == "norm"}
    assert any(e.sequence_nr in norm_forward for e in prof.events() if e.name.startswith("autograd::engine::evaluate"))
    assert not model[1]._forward_hooks  # the labels are gone afterwards
    assert len(top_operators(prof, 4)) == 4


def test_apply_rope_compiled_equals_eager():
    "The compiled decode step runs chapter 03's apply_rope inside a graph: same rotation."
    cos, sin = precompute_rope(16, 32)
    x = torch.randn(2, 8, 3, 16)
    compiled = torch.compile(apply_rope, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, cos, sin, 4), apply_rope(x, cos, sin, 4), rtol=1e-6, atol=1e-6)


def test_decode_step_equals_the_models_cached_forward(tiny_model):
    prompt = torch.randint(0, tiny_model.args.vocab_size, (2, 6))
    with torch.inference_mode():
        tiny_model.enable_kv_cache(2)
        tiny_model(prompt)
        reference = tiny_model(prompt[:, -1:], start_pos=6)[:, -1]
        tiny_model.enable_kv_cache(2)
        tiny_model(prompt)
        key_mask = torch.ones(2, tiny_model.args.max_seq_len, dtype=torch.bool)
        ours = decode_step(tiny_model, prompt[:, -1:], torch.tensor([6]), key_mask)
        tiny_model.disable_kv_cache()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 0.9, "top_p": 0.9}, {"eos_id": 5}])
def test_static_decoder_yields_generate_tokens_tokens(tiny_model, kwargs):
    prompts = [[3, 4, 5, 6, 7], [8, 9]]  # left padding included
    ours = CompiledDecoder(tiny_model, batch_size=2, compile=False)
    a = list(ours.generate_tokens(prompts, 20, generator=torch.Generator().manual_seed(3), **kwargs))
    b = list(generate_tokens(tiny_model, prompts, 20, generator=torch.Generator().manual_seed(3), **kwargs))
    assert torch.equal(torch.stack(a), torch.stack(b))
    assert all(layer.attention.cache is None for layer in tiny_model.layers)  # caches put back


def test_compiled_decoder_matches_and_does_not_recompile(tiny_model):
    decoder = CompiledDecoder(tiny_model)
    prompt = [[3, 4, 5, 6]]
    assert torch.equal(torch.stack(list(decoder.generate_tokens(prompt, 12))),
                       torch.stack(list(generate_tokens(tiny_model, prompt, 12))))
    with torch._dynamo.config.patch(error_on_recompile=True):
        list(decoder.generate_tokens([[9, 10]], 30))  # another length and other positions: same graph


def test_compiled_decoder_errors_name_the_argument(tiny_model):
    with pytest.raises(ValueError, match="batch_size"):
        CompiledDecoder(tiny_model, batch_size=0)
    with pytest.raises(ValueError, match="Llama only"):
        CompiledDecoder(nn.Linear(2, 2))
    decoder = CompiledDecoder(tiny_model, compile=False)
    with pytest.raises(ValueError, match="batch_size=1"):
        decoder.generate_tokens([[1], [2]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate_tokens([[1]], 0)
    with pytest.raises(ValueError, match="vocab|max_seq_len"):
        decoder.generate_tokens([[tiny_model.args.vocab_size]], 3)


def test_stable_peak_uses_the_recorded_figure(monkeypatch):
    key = (device.cpu_model_name(), 3, "float32")
    monkeypatch.setitem(device.RECORDED_PEAKS, key, (1.25e11, "test figure"))
    assert stable_peak(torch.device("cpu"), "float32", 3) == (1.25e11, "recorded: test figure")


@pytest.mark.parametrize("kwargs", [{}, {"eos_id": 5}, {"temperature": 0.9, "top_k": 20}])
def test_greedy_chunks_give_generate_tokens_tokens(tiny_model, kwargs):
    "Several greedy tokens a call (and the single steps at the end of the cache) change no token; sampling keeps its steps."
    prompts = [[3, 4, 5, 6, 7], [8, 9]]  # left padding included
    n_new = tiny_model.args.max_seq_len - 5  # to the end of the cache: the last tokens come one step a call
    ours = CompiledDecoder(tiny_model, batch_size=2, greedy_chunk=3)
    a = list(ours.generate_tokens(prompts, n_new, generator=torch.Generator().manual_seed(3), **kwargs))
    b = list(generate_tokens(tiny_model, prompts, n_new, generator=torch.Generator().manual_seed(3), **kwargs))
    assert torch.equal(torch.stack(a), torch.stack(b))


def test_greedy_chunk_must_be_a_positive_integer(tiny_model):
    with pytest.raises(ValueError, match="greedy_chunk"):
        CompiledDecoder(tiny_model, greedy_chunk=0)


def test_the_command_decodes_compiled_with_the_eager_commands_text(tmp_path, capsys):
    "tinyllama-generate --compile (greedy: eight steps a call) prints what chapter 12's eager command prints."
    from tinyllama.generate import main as eager_main
    from tinyllama.train import TRAIN_PRESETS, train
    tiny = TRAIN_PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, out_dir=str(tmp_path / "run"), max_chars=100_000, max_steps=10, eval_interval=10,
                              sample_tokens=0, model=dataclasses.replace(tiny.model, max_seq_len=64))
    train(cfg, progress=False)
    capsys.readouterr()
    argv = ["--checkpoint", cfg.out_dir, "--prompt", "ROMEO:\n", "--max-new-tokens", "40", "--temperature", "0"]
    eager_main(argv)
    eager = capsys.readouterr().out
    speed.main(argv + ["--compile"])
    assert capsys.readouterr().out == eager and len(eager) > len("ROMEO:\n") + 20
    speed.main(argv + ["--temperature", "0.9", "--seed", "3"])  # 40 tokens: compiling would not pay
    sampled = capsys.readouterr().out
    eager_main(argv + ["--temperature", "0.9", "--seed", "3"])
    assert capsys.readouterr().out == sampled
