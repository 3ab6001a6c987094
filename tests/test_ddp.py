"Two processes under torchrun (gloo) train exactly like one process that accumulates two micro-batches; one killed, the run resumes."
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.testing import assert_close

from tinyllama.checkpoint import read_checkpoint
from tinyllama.train import TRAIN_PRESETS, load_checkpoint, load_trained_model, train

STEPS = 5
FLAGS = ["--preset", "tiny", "--max-chars", "100000", "--dropout", "0", "--max-steps", str(STEPS),
         "--eval-interval", str(STEPS), "--log-interval", "1", "--sample-tokens", "0", "--no-progress"]


def test_two_processes_equal_one_process_with_twice_the_accumulation(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nfrom tinyllama.cli import main\nmain(sys.argv[1:])\n")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *FLAGS,
         "--grad-accum-steps", "1", "--out-dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert launched.stdout.count("run written to") == 1  # only rank 0 reports

    tiny = TRAIN_PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, dropout=0.0), max_chars=100_000,
                              max_steps=STEPS, eval_interval=STEPS, log_interval=1, sample_tokens=0,
                              grad_accum_steps=2, out_dir=str(tmp_path / "single"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        single = train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)

    log = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert log.step.tolist() == list(range(1, STEPS + 1))  # one writer: no duplicated rows
    assert_close(torch.tensor(log.train_loss.values), torch.tensor(single.losses, dtype=torch.float64),
                 rtol=1e-5, atol=1e-6)
    ddp_model, _, _ = load_trained_model(tmp_path / "ddp")
    for name, weight in single.model.state_dict().items():
        assert_close(ddp_model.state_dict()[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    # the checkpoint holds both ranks' samplers in slot order, the same as the single process's two
    ddp_state, single_state = load_checkpoint(tmp_path / "ddp")[1], load_checkpoint(tmp_path / "single")[1]
    assert len(ddp_state["sampler_states"]) == 2 and ddp_state["world_size"] == 2
    for a, b in zip(ddp_state["sampler_states"], single_state["sampler_states"]):
        assert torch.equal(a, b)


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    "The process id of each torchrun worker of `launcher`, by rank (its children, with RANK in their environments)."
    pids = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if parent == launcher.pid:
            pids |= {int(kv[5:]): int(proc.name) for kv in environ if kv.startswith(b"RANK=")}
    return pids


def test_a_killed_rank_ends_the_run_and_it_resumes_exactly_on_two_processes_or_one(tmp_path, capsys):
    # constant learning rate after warm-up (min_lr_ratio 1): the schedule does not depend on max_steps,
    # so a run cut short, its resumptions and a reference run of any length follow the same one
    flags = ["--preset", "tiny", "--max-chars", "100000", "--dropout", "0", "--min-lr-ratio", "1", "--eval-interval", "4",
             "--log-interval", "1", "--sample-tokens", "0", "--no-progress"]
    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nfrom tinyllama.cli import main\nmain(sys.argv[1:])\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    env, run = {**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path / "run"
    launcher = subprocess.Popen([*torchrun, *flags, "--max-steps", "100000", "--out-dir", str(run)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
            time.sleep(0.02)
        os.kill(_rank_pids(launcher)[1], signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = launcher.communicate(timeout=60)  # the survivor must not wait in a collective
    finally:
        launcher.kill()
    ended_after = time.monotonic() - killed_at
    print(f"torchrun ended {ended_after:.1f} s after rank 1 was killed")
    assert launcher.returncode != 0 and "Signal 9 (SIGKILL)" in out and ended_after < 30, out[-3000:]
    step = read_checkpoint(run)[1]["step"]
    shutil.copytree(run, tmp_path / "run1")

    two = subprocess.run([*torchrun, *flags, "--resume", str(run), "--max-steps", str(step + 6)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    saved = load_checkpoint(tmp_path / "run1")[0]  # one process, from Python: the checkpoint's own configuration
    assert saved.grad_accum_steps == 1
    train(dataclasses.replace(saved, max_steps=step + 6, out_dir=str(tmp_path / "run1")), resume=tmp_path / "run1",
          progress=False)
    assert "grad_accum_steps=2 (not 1); every step draws the same batches" in capsys.readouterr().out

    cfg = dataclasses.replace(saved, max_steps=step + 6, grad_accum_steps=2, out_dir=str(tmp_path / "straight"))
    straight = torch.tensor(train(cfg, progress=False).losses, dtype=torch.float64)
    for resumed in (run, tmp_path / "run1"):
        log = pd.read_csv(resumed / "metrics.csv")
        assert log.step.tolist() == list(range(1, step + 7))
        assert_close(torch.tensor(log.train_loss.values), straight, rtol=1e-5, atol=1e-6, msg=str(resumed))
