"Two processes under torchrun (gloo) train exactly like one process that accumulates two micro-batches."
import dataclasses
import os
import subprocess
import sys

import pandas as pd
import torch
from torch.testing import assert_close

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
