"""The main job as the README runs it, recorded: `tinyllama-train` (the cpu preset's ten-minute budget), one row a run.

    python benchmarks/main_job.py                      # appends to results/main_job.csv
    python benchmarks/main_job.py --out-dir runs/main-job --results results/main_job.csv

Runs the command in a fresh process, times it from start to exit, then reads what the run folder records (the
steps its budget fixed, the tokens, the validation loss on the whole split at the last step) and appends a row
with the kind of CPU: appendix A shows the rows. Not a test: it prints numbers.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def cpu_kind() -> str:
    flags = subprocess.run("lscpu | grep -o 'amx_bf16\\|avx512_bf16' | sort -u", shell=True, capture_output=True,
                           text=True).stdout.split()
    return "AMX (bfloat16 units)" if "amx_bf16" in flags else "AVX-512 bfloat16" if flags else "AVX2 only"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/main-job")
    parser.add_argument("--results", type=Path, default=Path("results/main_job.csv"))
    parser.add_argument("extra", nargs="*", help="more tinyllama-train options, after --")
    args = parser.parse_args()
    command = [sys.executable, "-c", "from tinyllama.cli import main; main()", "--out-dir", args.out_dir,
               "--overwrite", "--no-progress", *args.extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    config = json.loads((Path(args.out_dir) / "config.json").read_text())
    last = pd.read_csv(Path(args.out_dir) / "metrics.csv").dropna(subset=["val_loss"]).iloc[-1]
    row = {"time": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_kind(), "load_1min": round(os.getloadavg()[0], 2),
           "time_budget_min": config["time_budget"], "steps": config["max_steps"],
           "tokens": config["max_steps"] * config["batch_size"] * config["seq_len"] * config["grad_accum_steps"],
           "dtype": config["dtype"], "wall_min": round(wall / 60, 2), "val_nats_per_token": round(last.val_loss, 4),
           "val_nats_per_char": round(last.val_nats_per_char, 4), "val_bits_per_char": round(last.val_bits_per_char, 4)}
    print(row)
    new = not args.results.exists()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
