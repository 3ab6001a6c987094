"""Training throughput and MFU of tinyllama's training step against chapter 13's GPT-2 of the same size and shape.

    python benchmarks/train_throughput.py                       # the cpu preset's shape, bfloat16 autocast, 2 threads
    python benchmarks/train_throughput.py --dtype float32 --repeats 7 --json benchmarks/results/train_fp32.json
    python benchmarks/train_throughput.py --preset gpu --device cuda

Four runners take full optimiser steps (forward, cross-entropy, backward, clipping, AdamW) on random tokens,
with `tinyllama.recipe.configure_optimizer` and `tinyllama.recipe.train_step`, the code the training loop runs:

- tinyllama: `tinyllama.model.Llama` at the preset's shape, eager and `torch.compile`d;
- GPT-2: `tinyllama.gpt2.GPT2` (chapter 13) at the same width, depth, heads, vocabulary and context, biases and
  dropout off: LayerNorm, learned positions, a GELU MLP of 4 x dim (2% fewer weights than the SwiGLU block),
  eager and compiled.

The runners take turns (`tinyllama.speed.median_times`), so a busy machine slows all alike; each number is a
median. The targets (issue 12) compare each tinyllama mode with the GPT-2 in *its* faster mode:
eager >= 1.0x, compiled >= 1.2x. MFU is against a stable peak: the one recorded for this CPU and thread count in
`tinyllama.speed.RECORDED_PEAKS` (measured once, with its method), a datasheet figure for a known GPU, or else a
peak measured now (said so). Not a test: it prints numbers.
"""
import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from tinyllama.device import pick_device, synchronize
from tinyllama.gpt2 import GPT2, GPT2Args
from tinyllama.model import Llama, count_parameters, flops_per_token
from tinyllama.device import stable_peak
from tinyllama.speed import median_times
from tinyllama.recipe import TRAIN_PRESETS, configure_optimizer, train_step


def build_models(preset: str, seed: int = 0) -> tuple[dict, object, object]:
    "The preset's Llama and the GPT-2 of the same shape (no dropout, no biases), and both args."
    args = dataclasses.replace(TRAIN_PRESETS[preset].model, dropout=0.0)
    gpt_args = GPT2Args(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                        norm_eps=args.norm_eps, max_seq_len=args.max_seq_len, dropout=0.0, bias=False)
    torch.manual_seed(seed)
    return {"tinyllama": Llama(args), "GPT-2": GPT2(gpt_args)}, args, gpt_args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(TRAIN_PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per timing (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per runner; the median is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU (default 2)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TRAIN_PRESETS[a.preset]
    device = pick_device(a.device)
    models, args, gpt_args = build_models(a.preset)
    batch_size, seq_len = a.batch_size or cfg.batch_size, cfg.seq_len
    autocast = torch.bfloat16 if a.dtype == "bfloat16" else None
    fpt = {"tinyllama": flops_per_token(args, seq_len), "GPT-2": flops_per_token(gpt_args, seq_len)}
    peak, peak_source = stable_peak(device, a.dtype, torch.get_num_threads())

    batches = []
    for _ in range(4):
        tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len + 1))  # (B, T+1)
        batches.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    runners = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = configure_optimizer(model, cfg)
        for mode in a.modes:
            stepper = torch.compile(model) if mode == "compiled" else model  # the same parameters either way
            def run(stepper=stepper, optimizer=optimizer, counter=[0]):
                for _ in range(a.steps):
                    counter[0] += 1
                    train_step(stepper, optimizer, [batches[counter[0] % len(batches)]], cfg.grad_clip, autocast)
                synchronize(device)
            runners[f"{name} {mode}"] = run
    t0 = time.perf_counter()
    for run in runners.values():  # compile and warm up before any timing
        run()
    warm_s = time.perf_counter() - t0
    seconds = median_times(runners, repeats=a.repeats, warmup=1)

    tokens = batch_size * seq_len * a.steps
    print(f"load average {os.getloadavg()[0]:.2f}; device {device} ({torch.get_num_threads()} threads), "
          f"autocast {a.dtype}; batch {batch_size} x {seq_len}; median of {a.repeats} x {a.steps} steps; "
          f"compile and warm-up {warm_s:.0f} s")
    print(f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})")
    rows = {}
    for name, s in seconds.items():
        model_name = name.split()[0]
        rate = tokens / s
        rows[name] = {"parameters": count_parameters(models[model_name]), "ms_per_step": 1e3 * s / a.steps,
                      "tokens_per_sec": rate, "mfu": fpt[model_name] * rate / peak}
        print(f"{name:>20}: {rows[name]['parameters']:>9,} params {rows[name]['ms_per_step']:8.1f} ms/step "
              f"{rate:>9,.0f} tokens/s  MFU {100 * rows[name]['mfu']:5.1f}%")
    gpt_best = max((n for n in rows if n.startswith("GPT-2")), key=lambda n: rows[n]["tokens_per_sec"])
    ratios = {}
    for mode in a.modes:
        ours = rows[f"tinyllama {mode}"]["tokens_per_sec"]
        ratios[mode] = {"vs GPT-2 in its faster mode": ours / rows[gpt_best]["tokens_per_sec"],
                        "vs GPT-2 in the same mode": ours / rows[f"GPT-2 {mode}"]["tokens_per_sec"]}
        target = {"eager": 1.0, "compiled": 1.2}[mode]
        print(f"tinyllama {mode} / {gpt_best}: {ratios[mode]['vs GPT-2 in its faster mode']:.2f}x (target >= {target}x); "
              f"/ GPT-2 {mode}: {ratios[mode]['vs GPT-2 in the same mode']:.2f}x")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"preset": a.preset, "dtype": a.dtype, "threads": torch.get_num_threads(),
                                      "batch": [batch_size, seq_len], "repeats": a.repeats, "steps": a.steps,
                                      "peak_flops": peak, "peak_source": peak_source, "rows": rows,
                                      "gpt2_faster_mode": gpt_best, "ratios": ratios,
                                      "load_average": os.getloadavg()[0], "torch": torch.__version__,
                                      "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
