"Faults a real user meets, produced for real: a second run into a live run's folder, a killed lock holder, a full disk."
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from tinyllama.checkpoint import RunLock, RunLocked, read_checkpoint
from tinyllama.train import TRAIN_PRESETS, load_trained_model, train

TRAIN = [sys.executable, "-c", "from tinyllama.cli import main; main()"]  # tinyllama-train
FLAGS = ["--preset", "tiny", "--max-chars", "100000", "--sample-tokens", "0", "--no-progress", "--log-interval", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the tests' own process: the same floats


def _wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 120):
    "Poll `condition` until it holds; fail if `proc` ends first or it takes longer than `seconds`."
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.02)


def _lock_pid(run) -> int | None:
    try:
        return json.loads((run / RunLock.FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_second_run_into_a_live_runs_folder_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([*TRAIN, *FLAGS, "--max-steps", "100000", "--eval-interval", "5", "--out-dir", str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        _wait_for(lambda: (run / "last").exists() and _lock_pid(run) == first.pid, first, "a checkpoint")
        holder = f"{run} is in use by another run: pid {first.pid} on host {socket.gethostname()}"
        second = subprocess.run([*TRAIN, *FLAGS, "--overwrite", "--max-steps", "3", "--out-dir", str(run)],
                                capture_output=True, text=True, env=ENV, timeout=120)
        assert second.returncode == 1 and holder in second.stderr and "Traceback" not in second.stderr, second.stderr
        cfg = load_trained_model(run)[2]
        with pytest.raises(RunLocked, match=re.escape(holder)):  # a resume from Python, in this process
            train(dataclasses.replace(cfg, out_dir=str(run)), resume=run, progress=False)
        assert first.poll() is None  # the live run goes on
        first.send_signal(signal.SIGINT)  # and stops cleanly
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0 and "Stopped at step" in out, out[-3000:]
    log = pd.read_csv(run / "metrics.csv")
    stopped_at = read_checkpoint(run)[1]["step"]
    assert log.step.tolist() == list(range(1, stopped_at + 1))  # one writer: no row of the refused runs
    assert not (run / RunLock.FILE).exists()  # a run that ends normally leaves no lock behind

    killed = subprocess.Popen([*TRAIN, *FLAGS, "--resume", str(run), "--max-steps", "100000"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        _wait_for(lambda: _lock_pid(run) == killed.pid, killed, "the lock")
    finally:
        killed.kill()  # SIGKILL: no handler runs, the lock file stays with its pid in it
        killed.wait()
    assert _lock_pid(run) == killed.pid
    step = read_checkpoint(run)[1]["step"]
    after = train(dataclasses.replace(cfg, out_dir=str(run), max_steps=step + 2), resume=run, progress=False)
    said = capsys.readouterr().out
    assert f"was left by pid {killed.pid}" in said and "takes the folder over" in said
    assert after.step == step + 2 and not (run / RunLock.FILE).exists()


@pytest.fixture
def small_disk(tmp_path):
    "A freshly mounted 4 MiB filesystem: tmpfs, else a loop-mounted ext4 image; skipped only where the OS refuses both."
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    image = tmp_path / "disk.img"
    attempts = [["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                ["sh", "-c", f"truncate -s 4M {image} && mkfs.ext4 -q -F {image} && mount -o loop {image} {mount_point}"]]
    refusals = []
    for command in attempts:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except FileNotFoundError as e:
            refusals.append(str(e))
            continue
        if done.returncode == 0:
            break
        refusals.append(f"{' '.join(command[:3])}: {done.stderr.strip()}")
    else:
        pytest.skip(f"this OS refuses to mount a small filesystem: {refusals}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_stops_the_run_with_a_message_and_the_resume_is_exact(tmp_path, small_disk):
    cfg = dataclasses.replace(TRAIN_PRESETS["tiny"], max_chars=100_000, sample_tokens=0, max_steps=12, eval_interval=4,
                              log_interval=1, out_dir=str(tmp_path / "straight"))
    straight = train(cfg, progress=False)  # the uninterrupted run, on a disk with room
    checkpoint_bytes = sum(p.stat().st_size for p in (straight.out_dir / "last").iterdir())

    # room for last/ and best/ of the first save and half a checkpoint more: the second save fills the disk
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * int(shutil.disk_usage(small_disk).free - 2.5 * checkpoint_bytes))
    run = small_disk / "run"
    full = subprocess.run([*TRAIN, *FLAGS, "--max-steps", "12", "--eval-interval", "4", "--out-dir", str(run)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
    assert "the disk is full" in full.stderr and f"that holds {run} to write last/" in full.stderr, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and "inline_container" not in full.stderr
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.json", "last", "metrics.csv"]  # no partial last.tmp/
    assert read_checkpoint(run)[1]["step"] == 4 and load_trained_model(run)[0] is not None  # the last good one loads

    filler.unlink()  # space freed
    resumed = train(dataclasses.replace(cfg, out_dir=str(run)), resume=run, progress=False)
    assert resumed.start_step == 4 and resumed.step == 12
    log = pd.read_csv(run / "metrics.csv")
    assert log.step.tolist() == list(range(1, 13))
    assert log.train_loss.tolist() == pd.read_csv(straight.out_dir / "metrics.csv").train_loss.tolist()  # bit for bit
