"""How a training step's speed holds up when another process keeps one of the two cores busy.

For each threading setting (OpenMP wait policy, spin count, thread count), a fresh process times training steps
of the cpu preset's model (float32, eager, batch 16 x 256), once on a quiet machine and once while a shell loop
keeps a core busy; settings and conditions take turns, and each figure is the median over rounds.

    python benchmarks/busy_core.py --json benchmarks/results/busy_core.json
"""
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

SETTINGS = {  # name -> environment of the measuring process, which imports tinyllama (and so sets its default) first
    "libgomp's default (GOMP_SPINCOUNT=300000)": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {},  # tinyllama's own setting (tinyllama/__init__.py)
    "1 thread": {"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "300000"},
}
STEP = """
import tinyllama  # before torch: it sets GOMP_SPINCOUNT unless the environment has it
import dataclasses, statistics, time, torch
from tinyllama.model import Llama
from tinyllama.recipe import TRAIN_PRESETS, configure_optimizer, train_step
cfg = dataclasses.replace(TRAIN_PRESETS["cpu"], batch_size=16)
torch.manual_seed(0)
model = Llama(dataclasses.replace(cfg.model, dropout=0.0))
optimizer = configure_optimizer(model, cfg)
x = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len))
batch = [(x, x)]
for _ in range(2):
    train_step(model, optimizer, batch, cfg.grad_clip, None)
times = []
for _ in range({steps}):
    t0 = time.perf_counter(); train_step(model, optimizer, batch, cfg.grad_clip, None); times.append(time.perf_counter() - t0)
print(cfg.batch_size * cfg.seq_len / statistics.median(times))
"""


def tokens_per_sec(env: dict, steps: int) -> float:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", STEP.format(steps=steps)], env={**base, **env},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rates = {(name, busy): [] for name in SETTINGS for busy in (False, True)}
    for _ in range(args.rounds):
        for busy in (False, True):
            loop = subprocess.Popen(["sh", "-c", "while :; do :; done"]) if busy else None
            try:
                for name, env in SETTINGS.items():
                    rates[name, busy].append(tokens_per_sec(env, args.steps))
            finally:
                if loop:
                    loop.kill()
    default_quiet = statistics.median(rates[next(iter(SETTINGS)), False])
    rows = []
    for name in SETTINGS:
        quiet, busy = statistics.median(rates[name, False]), statistics.median(rates[name, True])
        rows.append({"setting": name, "quiet tokens/s": round(quiet), "busy tokens/s": round(busy),
                     "slowdown when busy": round(quiet / busy, 2), "quiet vs default": round(quiet / default_quiet, 3)})
        print(f"{name:26} quiet {quiet:7,.0f}  busy {busy:7,.0f}  slowdown {quiet / busy:4.2f}x  quiet vs default {quiet / default_quiet:.3f}")
    cpu = subprocess.run("lscpu | grep -o 'amx_bf16\\|avx512_bf16' | sort -u", shell=True, capture_output=True, text=True).stdout.split()
    result = {"time": time.strftime("%Y-%m-%d %H:%M"), "cpu": "AMX (bfloat16 units)" if cpu else "AVX2 only",
              "rounds": args.rounds, "steps": args.steps, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
