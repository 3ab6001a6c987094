"The sweep command: a kill -9 in the middle loses nothing and repeats nothing; rows match an uninterrupted sweep."
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tinyllama.sweep import COLUMNS, append_row, read_results

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
