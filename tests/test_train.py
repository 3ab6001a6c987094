"The training loop's promises: the schedule, the optimiser groups, exact resume, atomic saves, clear errors, the CLI."
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import tinyllama.device as device
from tinyllama.cli import config_from_args, main
from tinyllama.model import Llama, PRESETS, flops_per_token
from tinyllama.train import (TRAIN_PRESETS, TrainConfig, check_compatible, configure_optimizer, evaluate, get_lr,
                             load_checkpoint, prepare_data, resolve_checkpoint, save_checkpoint, train)

# a small slice of the corpus keeps every run here well under a second
TINY = dataclasses.replace(TRAIN_PRESETS["tiny"], max_chars=100_000, max_steps=8, eval_interval=4, grad_accum_steps=2,
                           sample_tokens=0)


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    return dataclasses.replace(TINY, out_dir=str(tmp_path / name), **overrides)


def _rates(opt, scheduler, n):
    "The learning rate of each of n steps of a PyTorch optimiser driven by `scheduler`."
    rates = []
    for _ in range(n):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("lr,warmup,max_steps", [(1e-3, 10, 100), (3e-4, 2, 7), (2e-3, 50, 1000)])
def test_get_lr_equals_torch_linear_then_cosine(lr, warmup, max_steps):
    cfg = dataclasses.replace(TINY, lr=lr, warmup_steps=warmup, max_steps=max_steps)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps - warmup, eta_min=0.1 * lr)]
    if warmup > 1:
        schedulers.insert(0, torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1))
    ref = torch.optim.lr_scheduler.SequentialLR(opt, schedulers, milestones=[warmup]) if warmup > 1 else schedulers[0]
    theirs = _rates(opt, ref, max_steps + 1)
    ours = [get_lr(s, cfg) for s in range(max_steps + 1)]
    assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert get_lr(10 * max_steps, cfg) == pytest.approx(0.1 * lr)


@pytest.mark.parametrize("lr,warmup,max_steps,fraction,floor", [(1e-3, 10, 100, 0.2, 0.1), (3e-4, 2, 7, 0.5, 0.1),
                                                                (2e-3, 50, 1000, 0.1, 0.1), (2e-3, 50, 800, 0.2, 0.0)])
def test_get_lr_wsd_equals_torch_linear_constant_linear(lr, warmup, max_steps, fraction, floor):
    cfg = dataclasses.replace(TINY, lr=lr, warmup_steps=warmup, max_steps=max_steps, schedule="wsd", decay_fraction=fraction,
                              min_lr_ratio=floor)
    decay_start = round(max_steps * (1 - fraction))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, milestones=[warmup, decay_start], schedulers=[
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1),
        torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=floor, total_iters=max_steps - decay_start)])
    theirs = _rates(opt, ref, max_steps + 1)
    ours = [get_lr(s, cfg) for s in range(max_steps + 1)]
    assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert get_lr(10 * max_steps, cfg) == pytest.approx(floor * lr)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg = dataclasses.replace(TRAIN_PRESETS["cpu"], optimizer="muon")
    model = Llama(cfg.model)
    muon, adamw = configure_optimizer(model, cfg).parts
    names = {id(p): n for n, p in model.named_parameters()}
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {names[id(p)] for p in muon.param_groups[0]["params"]} == {
        n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    assert {names[id(p)] for g in adamw.param_groups for p in g["params"]} == {
        n for n, p in model.named_parameters() if not n.startswith("layers.") or p.ndim < 2}
    assert muon.param_groups[0]["weight_decay"] == cfg.weight_decay and adamw.param_groups[1]["weight_decay"] == 0.0


def test_weight_decay_on_matrices_only():
    cfg = TRAIN_PRESETS["cpu"]
    model = Llama(cfg.model)
    opt = configure_optimizer(model, cfg)
    decay, no_decay = opt.param_groups
    assert TrainConfig().weight_decay == 0.1 and TrainConfig().beta2 == 0.95  # the LLaMA recipe is the default
    assert decay["weight_decay"] == cfg.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (cfg.beta1, cfg.beta2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 2}
    assert "tok_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("norm.weight") for n in (names[id(p)] for p in no_decay["params"]))


def test_mfu_is_against_the_recorded_peak(tmp_path, monkeypatch):
    key = (device.cpu_model_name(), torch.get_num_threads(), "float32")
    monkeypatch.setitem(device.RECORDED_PEAKS, key, (1.25e11, "test figure"))
    result = train(tiny(tmp_path, max_steps=2, eval_interval=2), progress=False)
    assert result.peak_flops_source == "recorded: test figure"
    assert result.mfu == pytest.approx(flops_per_token(result.model.args, TINY.seq_len) * result.tokens_per_sec / 1.25e11)


def test_evaluate_untrained_model_is_near_log_vocab():
    data = prepare_data(TINY)
    model = Llama(dataclasses.replace(TINY.model, vocab_size=data.tokenizer.vocab_size))
    val = evaluate(model, data.val_ids, data.val_chars, seq_len=32, batch_size=16)
    assert val["tokens"] == len(data.val_ids) - 1  # the whole split: every target once
    assert abs(val["loss"] - math.log(data.tokenizer.vocab_size)) < 0.05
    assert val["nats_per_char"] == pytest.approx(val["loss"])  # characters: one token per character
    assert val["bits_per_char"] == pytest.approx(val["loss"] / math.log(2))


def _interrupt_at(stop_step):
    def on_step(step, metrics):
        if step == stop_step:
            signal.raise_signal(signal.SIGINT)
    return on_step


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "cosine"), ("muon", "wsd")])
def test_resume_equals_uninterrupted_run(tmp_path, optimizer, schedule):
    torch.use_deterministic_algorithms(True)
    settings = dict(optimizer=optimizer, schedule=schedule)
    try:
        straight = train(tiny(tmp_path, "straight", **settings), progress=False)
        part1 = train(tiny(tmp_path, "resumed", **settings), progress=False, on_step=_interrupt_at(3))  # not at an eval step
        part2 = train(tiny(tmp_path, "resumed", **settings), resume=tmp_path / "resumed", progress=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert part1.stopped and part1.step == 3 and part2.start_step == 3 and part2.step == 8
    assert straight.losses == part1.losses + part2.losses  # bit for bit, dropout and two samplers included
    for (name, a), b in zip(straight.model.state_dict().items(), part2.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.val["loss"] == part2.val["loss"]
    log = pd.read_csv(tmp_path / "resumed" / "metrics.csv")
    assert log.step.tolist() == pd.read_csv(tmp_path / "straight" / "metrics.csv").step.tolist()


def test_checkpoint_state_loads_weights_only_and_holds_every_state(tmp_path):
    result = train(tiny(tmp_path), progress=False)
    path = resolve_checkpoint(tmp_path / "run")
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 8 and state["tokens_seen"] == 8 * TINY.tokens_per_step
    assert len(state["sampler_states"]) == 2 and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 8
    model = Llama(result.model.args)
    cfg, _ = load_checkpoint(path, model)
    assert cfg.model == result.model.args
    for k, v in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert (tmp_path / "run" / "best" / "state.pt").exists()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(model=PRESETS["tiny"], seq_len=32)
    model = Llama(PRESETS["tiny"])
    save_checkpoint(tmp_path / "last", model, cfg, {"step": 1})
    good = _weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)

    def fail(*args, **kwargs):  # the weights are already written when this runs
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "last", model, cfg, {"step": 2})
    monkeypatch.undo()
    restored = Llama(PRESETS["tiny"])
    _, state = load_checkpoint(tmp_path / "last", restored)
    assert state["step"] == 1
    for k, v in good.items():
        assert torch.equal(restored.state_dict()[k], v)

    # killed between the two renames: last/ is gone, last.old/ is complete
    real_replace, calls = os.replace, []

    def die_on_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last", model, cfg, {"step": 3})
    monkeypatch.undo()
    assert not (tmp_path / "last").exists()
    assert resolve_checkpoint(tmp_path / "last").name == "last.old" and load_checkpoint(tmp_path / "last")[1]["step"] == 1
    save_checkpoint(tmp_path / "last", model, cfg, {"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and load_checkpoint(tmp_path)[1]["step"] == 4


def test_loading_into_another_shape_is_a_value_error(tmp_path):
    save_checkpoint(tmp_path / "last", Llama(PRESETS["tiny"]), TrainConfig(model=PRESETS["tiny"], seq_len=32), {"step": 0})
    other = dataclasses.replace(PRESETS["tiny"], dim=64, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"dim=32 \(checkpoint\) vs 64.*n_kv_heads=2 \(checkpoint\) vs 4"):
        load_checkpoint(tmp_path / "last", Llama(other))
    check_compatible(PRESETS["tiny"], dataclasses.replace(PRESETS["tiny"], dropout=0.5))  # dropout is not a shape


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    poison = {"on": False}
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * (math.inf if poison["on"] else 1.0))

    def on_step(step, metrics):
        poison["on"] = step == 4  # step 4 evaluated and saved; step 5 diverges

    with pytest.raises(FloatingPointError, match=r"step 5.*last good checkpoint"):
        train(tiny(tmp_path), progress=False, on_step=on_step)
    assert load_checkpoint(tmp_path / "run")[1]["step"] == 4


def test_config_from_args_overrides_every_field(tmp_path):
    cfg, resume, _ = config_from_args(["--preset", "tiny", "--dim", "64", "--n_layers", "3", "--lr", "2e-3",
                                       "--ffn-dim-multiplier", "1.5", "--no-tie-embeddings", "--compile",
                                       "--out-dir", str(tmp_path)])
    assert resume is None and (cfg.model.dim, cfg.model.n_layers, cfg.model.ffn_dim_multiplier) == (64, 3, 1.5)
    assert (cfg.lr, cfg.compile, cfg.model.tie_embeddings, cfg.batch_size) == (2e-3, True, False, TRAIN_PRESETS["tiny"].batch_size)
    with pytest.raises(ValueError, match="n_heads=4 must divide dim=66"):
        config_from_args(["--preset", "tiny", "--dim", "66"])


def test_cli_prints_results(tmp_path, capsys, monkeypatch):
    main(["--preset", "tiny", "--max-chars", "100000", "--max-steps", "4", "--out-dir", str(tmp_path / "cli"),
          "--no-progress"])
    out = capsys.readouterr().out
    assert f"run written to {tmp_path / 'cli'}" in out
    assert "nats/token" in out and "nats/char" in out and "bits/char" in out and "sample:" in out
    metrics = pd.read_csv(tmp_path / "cli" / "metrics.csv")
    assert {"step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_sec", "mfu"} <= set(metrics.columns)
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["--preset", "tiny", "--out-dir", str(tmp_path / "cli")])
    assert config_from_args(["--preset", "tiny", "--out-dir", str(tmp_path / "cli"), "--overwrite"])[0].out_dir == str(tmp_path / "cli")
    monkeypatch.chdir(tmp_path)
    assert config_from_args(["--preset", "cpu"])[0].out_dir == "runs/cpu"  # the preset's folder, where chapter 12 looks


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "sig"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tinyllama.cli import main; main()", "--preset", "tiny", "--max-chars", "100000",
         "--max-steps", "100000", "--log-interval", "1", "--eval-interval", "100000", "--out-dir", str(run), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while not (run / "metrics.csv").exists() or len((run / "metrics.csv").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Resume with" in out and "--resume" in out
    step = load_checkpoint(run)[1]["step"]
    assert step >= 2
    cfg, resume, _ = config_from_args(["--resume", str(run), "--max-steps", str(step + 2)])
    assert resume == run / "last" and cfg.out_dir == str(run) and cfg.max_steps == step + 2
