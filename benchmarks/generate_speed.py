"""Decoding speed of the trained cpu checkpoint: tinyllama eager and compiled against transformers' generate, same weights.

    python benchmarks/generate_speed.py                                   # runs/cpu/best, one thread
    python benchmarks/generate_speed.py --checkpoint runs/cpu/best --new-tokens 200 --repeats 5 --json out.json
    python benchmarks/generate_speed.py --lengths 64 128 256              # also the KV cache against recomputation

CPU, greedy, decode tokens per second with the prefill excluded: (n - 1) / (time for n tokens - time for 1)
(`tinyllama.generate.decode_tokens_per_sec`), medians, the implementations taking turns so that a busy machine
slows all alike:

- tinyllama eager: `tinyllama.generate.generate_tokens`, the model's forward over the KV cache (chapter 12);
- tinyllama compiled: `tinyllama.speed.CompiledDecoder` with `greedy_chunk=8`, one `torch.compile`d graph that
  makes 8 greedy tokens a call over the pre-allocated cache with static shapes (appendix D); and the same decoder
  making one token a call;
- transformers: `LlamaForCausalLM.generate` on the same weights (`tinyllama.model.to_hf_llama`), with SDPA and with
  eager attention; the faster of the two is the reference.

Batch 1 (the target: >= 1,000 tokens/s and >= 3x transformers) and batch 8 (aggregate tokens/s over the 8 rows).
Before timing, every implementation's greedy tokens are compared with transformers': the comparison is only of the
same work. Needs a trained checkpoint (`tinyllama-train` writes runs/cpu/best); not a test: it prints numbers.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from tinyllama.generate import decode_tokens_per_sec, generate_tokens, time_per_token
from tinyllama.model import count_parameters, to_hf_llama
from tinyllama.speed import CompiledDecoder
from tinyllama.train import find_checkpoint, load_trained_model


def runners_for(model, hf_models: dict, prompt: torch.Tensor, decoders: dict[str, CompiledDecoder]) -> dict:
    "name -> generate(n) for every implementation, each making n greedy tokens after `prompt` (B, P)."
    rows = prompt.tolist()
    runners = {"tinyllama eager": lambda n: list(generate_tokens(model, rows, n))}
    for name, decoder in decoders.items():
        runners[name] = lambda n, decoder=decoder: list(decoder.generate_tokens(rows, n))
    for name, hf in hf_models.items():
        runners[name] = lambda n, hf=hf: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                     max_new_tokens=n, min_new_tokens=n)
    return runners


def same_tokens(runners: dict, prompt: torch.Tensor, n: int) -> dict:
    "How many of the first n greedy tokens of each implementation, row by row, equal transformers (SDPA)'s."
    reference = runners["transformers (sdpa)"](n)[:, prompt.shape[1]:].tolist()
    agree = {}
    for name, run in runners.items():
        out = run(n)
        ids = torch.stack(out, dim=1).tolist() if isinstance(out, list) else out[:, prompt.shape[1]:].tolist()
        agree[name] = min(sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], zip(a, b)))
                          for a, b in zip(ids, reference))
    return agree


def measure(runners: dict, n: int, repeats: int, rounds: int) -> dict:
    "Median decode tokens/s of each runner (one sequence), `rounds` rounds taking turns."
    rates = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            rates[name].append(decode_tokens_per_sec(run, n, repeats))
    return {name: statistics.median(r) for name, r in rates.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/cpu/best", help="checkpoint or run folder (default runs/cpu/best)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per timed generation (default 128)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timings per median inside one measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per implementation (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[], help="also time one step against length")
    parser.add_argument("--json", type=Path, help="also write the results here")
    a = parser.parse_args(argv)
    found = find_checkpoint(a.checkpoint)
    if found is None:
        sys.exit(f"generate_speed.py: error: no checkpoint at --checkpoint {a.checkpoint} (a folder with "
                 f"model.safetensors, or a run folder with best/ or last/); train one with `tinyllama-train` first")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, _, _ = load_trained_model(found)
    model.eval()
    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} thread(s); torch {torch.__version__}")
    print(f"checkpoint {found}: {count_parameters(model):,} parameters, dim {model.args.dim}, {model.args.n_layers} "
          f"layers, {model.args.n_heads} heads ({model.args.n_kv_heads} key/value), vocab {model.args.vocab_size}")
    hf_models = {"transformers (sdpa)": to_hf_llama(model, bos_token_id=1, eos_token_id=2, pad_token_id=3),
                 "transformers (eager)": to_hf_llama(model, bos_token_id=1, eos_token_id=2, pad_token_id=3)}
    hf_models["transformers (sdpa)"].set_attn_implementation("sdpa")
    hf_models["transformers (eager)"].set_attn_implementation("eager")
    for hf in hf_models.values():
        hf.generation_config.eos_token_id = None  # every run makes exactly n tokens, as ours do

    results = {"checkpoint": str(found), "threads": a.threads, "new_tokens": a.new_tokens, "batches": {}}
    for batch_size in a.batch_sizes:
        prompt = torch.randint(4, model.args.vocab_size, (batch_size, a.prompt_len))  # (B, P), no special ids
        t0 = time.perf_counter()
        decoders = {"tinyllama compiled": CompiledDecoder(model, batch_size, greedy_chunk=8),
                    "tinyllama compiled, 1 token a call": CompiledDecoder(model, batch_size)}
        runners = runners_for(model, hf_models, prompt, decoders)
        with torch.no_grad():
            agree = same_tokens(runners, prompt, a.new_tokens)
            compile_s = time.perf_counter() - t0
            rates = measure(runners, a.new_tokens, a.repeats, a.rounds)
        rates = {name: batch_size * rate for name, rate in rates.items()}  # aggregate over the rows
        best_hf = max((n for n in rates if n.startswith("transformers")), key=rates.get)
        print(f"\nbatch {batch_size}: decode tokens/s over all rows, {a.new_tokens} new tokens after a "
              f"{a.prompt_len}-token prompt, prefill excluded (compile and checks {compile_s:.0f} s)")
        for name, rate in rates.items():
            print(f"{name:>22}: {rate:9,.0f} tokens/s  {rate / rates[best_hf]:5.2f}x {best_hf}; "
                  f"greedy tokens identical to transformers (sdpa)'s: {agree[name]} of {a.new_tokens}")
        results["batches"][batch_size] = {"tokens_per_sec": rates, "identical_tokens": agree, "reference": best_hf,
                                          "ratio_compiled": rates["tinyllama compiled"] / rates[best_hf],
                                          "ratio_eager": rates["tinyllama eager"] / rates[best_hf]}
    if 1 in results["batches"]:
        r = results["batches"][1]
        print(f"\ntarget, batch 1: tinyllama compiled {r['tokens_per_sec']['tinyllama compiled']:,.0f} tokens/s "
              f"(>= 1,000) = {r['ratio_compiled']:.2f}x {r['reference']} (>= 3x)")
    if a.lengths:
        print("\ntime for the next token, batch 1: KV cache against recomputing the prefix")
        results["per_token"] = []
        for n in a.lengths:
            recompute = time_per_token(model, n, use_cache=False, repeats=a.repeats)
            cached = time_per_token(model, n, use_cache=True, repeats=a.repeats)
            results["per_token"].append({"seq_len": n, "no_cache_ms": 1e3 * recompute, "kv_cache_ms": 1e3 * cached})
            print(f"{n:>6} tokens: no cache {1e3 * recompute:7.2f} ms, KV cache {1e3 * cached:6.2f} ms")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        results.update(load_average=os.getloadavg()[0], torch=torch.__version__, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
