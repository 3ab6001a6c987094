"The sweep command: a kill -9 in the middle, or a torn results file, loses nothing and repeats nothing."
import dataclasses
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tinyllama.checkpoint import MANIFEST, RunLock, RunLocked
from tinyllama.recipe import TRAIN_PRESETS
from tinyllama.sweep import COLUMNS, Run, append_row, read_results, register_grid, run_grid

SWEEP = [sys.executable, "-c", "from tinyllama.sweep import main; main()", "evaluate.lr", "--tiny"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: float32 results are then bit-reproducible


def sweep(tmp, name):
    return [*SWEEP, "--results", str(tmp / name / "results"), "--runs", str(tmp / name / "runs")]


def test_kill_9_then_rerun_equals_an_uninterrupted_sweep(tmp_path):
    subprocess.run(sweep(tmp_path, "straight"), env=ENV, check=True, capture_output=True, timeout=300)
    straight = read_results(tmp_path / "straight" / "results" / "evaluate.lr.csv")

    proc = subprocess.Popen(sweep(tmp_path, "killed"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_path = tmp_path / "killed" / "results" / "evaluate.lr.csv"
    deadline = time.time() + 240
    while not (csv_path.exists() and len(read_results(csv_path)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended or stalled before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    rows_at_kill = len(read_results(csv_path))
    assert 3 <= rows_at_kill < len(straight)
    subprocess.run(sweep(tmp_path, "killed"), env=ENV, check=True, capture_output=True, timeout=300)
    resumed = read_results(csv_path)

    assert sorted(resumed.name) == sorted(straight.name) and resumed.name.is_unique  # nothing lost, nothing twice
    merged = straight.merge(resumed, on="name", suffixes=("_straight", "_resumed"))
    assert (merged.status_straight == "ok").all() and (merged.status_resumed == "ok").all()
    pd.testing.assert_series_equal(merged.val_bits_per_char_straight, merged.val_bits_per_char_resumed, check_names=False)


def test_append_row_names_unknown_columns_and_keeps_the_file(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, {"grid": "g", "name": "a", "status": "ok"})
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"unknown result column\(s\) \['bits'\]"):
        append_row(path, {"grid": "g", "name": "b", "bits": 1.0})
    assert path.read_bytes() == before and list(read_results(path).columns) == list(COLUMNS)


def test_unknown_grid_is_named(capsys):
    with pytest.raises(SystemExit):
        from tinyllama.sweep import main
        main(["evaluate.nothing"])
    assert "no grid 'evaluate.nothing'" in capsys.readouterr().err


TINY = dataclasses.replace(TRAIN_PRESETS["tiny"], max_chars=100_000, split=(0.8, 0.1, 0.1), max_steps=4, eval_interval=4,
                          sample_tokens=0)
register_grid("faults.torn", lambda results_dir, tiny: [Run(f"lr{lr}", dataclasses.replace(TINY, lr=lr), final=lr == 3e-3)
                                                        for lr in (1e-3, 3e-3)])


def test_a_torn_last_row_is_moved_aside_and_its_run_scored_again_without_training(tmp_path, capsys):
    results, runs = tmp_path / "results", tmp_path / "runs"
    straight = run_grid("faults.torn", results, runs)
    assert straight.status.tolist() == ["ok", "ok"] and straight.test_bits_per_char[1] > 0
    path = results / "faults.torn.csv"
    whole = path.read_bytes()
    last_row = whole.rstrip(b"\r\n").rfind(b"\n") + 1  # the row of lr0.003, the final run
    saved_at = {p: p.stat().st_mtime_ns for p in runs.glob(f"faults.torn/*/last/{MANIFEST}")}
    after_status = last_row + whole[last_row:].index(b",ok,") + 4
    # inside the name; just after the status (read as a finished run with no numbers, before); inside a number;
    # without the line end; without its last character
    for cut in (last_row + 15, after_status, after_status + 20, len(whole) - 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="half-written row"):
            read_results(path)
        with pytest.raises(ValueError, match="half-written row"):
            append_row(path, {"grid": "faults.torn", "name": "x", "status": "ok"})  # never glued onto a fragment
        assert path.read_bytes() == whole[:cut]
        capsys.readouterr()
        repaired = run_grid("faults.torn", results, runs)
        assert "ended in a half-written row" in capsys.readouterr().out
        assert path.read_bytes().startswith(whole[:last_row])  # every complete row as it was
        for column in ("name", "status", "val_loss", "val_bits_per_char", "test_bits_per_char"):
            assert repaired[column].equals(straight[column]), (cut - last_row, column)
        assert {p: p.stat().st_mtime_ns for p in saved_at} == saved_at  # scored from last/, not trained again
    assert len(path.with_name(path.name + ".torn").read_text().splitlines()) == 5  # each fragment kept


def test_a_grid_that_another_sweep_is_running_is_refused(tmp_path):
    with RunLock(tmp_path / "runs" / "faults.torn"):  # as a sweep of this grid in another process holds it
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            run_grid("faults.torn", tmp_path / "results", tmp_path / "runs")
    assert not (tmp_path / "results").exists()
