"""What the KV cache buys, and how tinyllama's decoding compares with transformers' generate on the same weights.

    python benchmarks/generate_speed.py                      # runs/cpu/best (or last) if it exists, else random weights
    python benchmarks/generate_speed.py --checkpoint runs/cpu/best --lengths 64 128 256 512 --repeats 9
    python benchmarks/generate_speed.py --threads 2 --new-tokens 256 --json speed.json

Two measurements, CPU, batch 1, greedy, medians over `--repeats`:

1. Time per generated token against the length of the sequence: one cached decode step at position n-1 (the cache
   already holds n-1 tokens) against a full forward pass over all n tokens, which is what generation without a cache
   does for every token (`tinyllama.generate.time_per_token`). The model is the checkpoint's with its RoPE tables
   extended to the longest length asked for (RoPE has no learnt positions, so the weights load unchanged).
2. Decode tokens per second of whole generations, prefill excluded: (n - 1) / (time for n tokens - time for 1)
   (`tinyllama.generate.decode_tokens_per_sec`), for tinyllama's `generate_tokens` and for
   `transformers.LlamaForCausalLM.generate` on the same weights (`tinyllama.model.to_hf_llama`), with its eager
   attention and with SDPA. The runs alternate between the implementations, so a busy machine slows all alike.

Not a test: it prints numbers and the ratios. Run it on a quiet machine (the load average is printed first).
"""
import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from tinyllama.generate import decode_tokens_per_sec, generate_tokens, time_per_token
from tinyllama.model import Llama, count_parameters, to_hf_llama
from tinyllama.train import TRAIN_PRESETS, load_trained_model


def find_checkpoint(path: str | Path) -> Path | None:
    "The checkpoint folder `path` means: itself, its best/ or its last/; None if there is none."
    path = Path(path)
    for candidate in (path, path / "best", path / "last"):
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


def load_model(checkpoint: str | None, max_seq_len: int) -> tuple[Llama, str]:
    "The checkpoint's model (or random weights of the cpu preset's shape) with RoPE tables of max_seq_len."
    found = find_checkpoint(checkpoint or os.environ.get("TINYLLAMA_CHECKPOINT", "runs/cpu"))
    if checkpoint and found is None:
        raise SystemExit(f"generate_speed.py: error: no checkpoint at {checkpoint}")
    if found is not None:
        trained, _, _ = load_trained_model(found)
        args, source = trained.args, f"checkpoint {found}"
    else:
        trained, args, source = None, TRAIN_PRESETS["cpu"].model, "random weights of TRAIN_PRESETS['cpu'] (no checkpoint found)"
    model = Llama(dataclasses.replace(args, max_seq_len=max(max_seq_len, args.max_seq_len), dropout=0.0)).eval()
    if trained is not None:
        model.load_state_dict(trained.state_dict())
    return model, source


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run folder (default: $TINYLLAMA_CHECKPOINT, "
                                                           "then runs/cpu; random weights if none)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 384, 512],
                        help="sequence lengths for the per-token timing")
    parser.add_argument("--repeats", type=int, default=7, help="timings per median (default 7)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per timed generation (default 128)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens for the generations (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, source = load_model(args.checkpoint, max(args.lengths + [args.prompt_len + args.new_tokens]))
    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} thread(s); torch {torch.__version__}")
    print(f"{source}: {count_parameters(model):,} parameters, dim {model.args.dim}, {model.args.n_layers} layers, "
          f"{model.args.n_heads} heads ({model.args.n_kv_heads} key/value), vocab {model.args.vocab_size}\n")

    rows = []
    for n in args.lengths:
        recompute = time_per_token(model, n, use_cache=False, repeats=args.repeats)
        cached = time_per_token(model, n, use_cache=True, repeats=args.repeats)
        rows.append({"seq_len": n, "no_cache_ms": 1e3 * recompute, "kv_cache_ms": 1e3 * cached,
                     "speedup": recompute / cached})
    print("time for the next token, batch 1 (median of", args.repeats, "repeats)")
    print(f"{'tokens':>8} {'no cache (ms)':>14} {'KV cache (ms)':>14} {'speed-up':>9}")
    for row in rows:
        print(f"{row['seq_len']:>8} {row['no_cache_ms']:>14.2f} {row['kv_cache_ms']:>14.2f} {row['speedup']:>8.1f}x")

    prompt = torch.randint(4, model.args.vocab_size, (1, args.prompt_len))  # (1, P), no special ids
    prompt_ids = prompt[0].tolist()
    hf_model = to_hf_llama(model, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    hf_sdpa = to_hf_llama(model, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    hf_sdpa.set_attn_implementation("sdpa")
    runners = {
        "tinyllama": lambda n: list(generate_tokens(model, [prompt_ids], n)),
        "transformers (eager)": lambda n: hf_model.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n),
        "transformers (sdpa)": lambda n: hf_sdpa.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n),
    }
    # identical greedy tokens first: otherwise the comparison would not be of the same work
    with torch.no_grad():
        ours = torch.cat(runners["tinyllama"](args.new_tokens)).tolist()
        for name in ("transformers (eager)", "transformers (sdpa)"):
            theirs = runners[name](args.new_tokens)[0, args.prompt_len:].tolist()
            same = sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(ours, theirs)))
            print(f"{name}: first {same} of {args.new_tokens} greedy tokens identical to tinyllama's")
        rates = {name: [] for name in runners}
        for _ in range(3):  # rounds alternate the implementations
            for name, run in runners.items():
                rates[name].append(decode_tokens_per_sec(run, args.new_tokens, args.repeats))
    rates = {name: statistics.median(r) for name, r in rates.items()}
    print(f"\ndecode tokens/s, {args.new_tokens} new tokens after a {args.prompt_len}-token prompt, prefill excluded")
    for name, rate in rates.items():
        print(f"{name:>22}: {rate:8.0f} tokens/s   ({rate / rates['tinyllama']:.2f}x tinyllama)")

    at_max = rows[-1]
    print(f"\nKV cache vs recomputation at {at_max['seq_len']} tokens: {at_max['speedup']:.1f}x faster")
    for name in ("transformers (eager)", "transformers (sdpa)"):
        print(f"tinyllama vs {name}: {rates['tinyllama'] / rates[name]:.2f}x the decode speed")
    if args.json:
        args.json.write_text(json.dumps({"source": source, "threads": args.threads, "per_token": rows,
                                         "decode_tokens_per_sec": rates, "load_average": os.getloadavg()[0],
                                         "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
