"""Training throughput and MFU of tinyllama's training step, next to a plain PyTorch transformer of the same shape.

    python benchmarks/train_throughput.py                      # the cpu preset's shape, dtype and compilation
    python benchmarks/train_throughput.py --preset gpu --dtype bfloat16 --device cuda
    python benchmarks/train_throughput.py --dim 256 --n-layers 4 --n-heads 4 --batch-size 16 --repeats 7

Both models take full optimiser steps (forward, cross-entropy, backward, clipping, AdamW) on random tokens:

- ours: `tinyllama.model.Llama` stepped by `tinyllama.train.train_step`, the code the training loop runs;
- reference: `torch.nn.TransformerEncoder` (pre-norm, causal mask, GELU MLP, no biases) with a token
  embedding, learned positions and a tied output head: the same width, depth, heads and context, and an
  MLP of 1.5x the SwiGLU hidden size so that both feed-forward blocks have the same weights and FLOPs.
  PyTorch's encoder has no grouped-query attention, so its key/value projections are full size.

Each model's FLOPs per token are 6N + 12 n_layers dim T with its own N (weights in matrix multiplies,
output head included), so MFU compares like with like even where the shapes differ slightly. Timings are
medians over `--repeats` measurements of `--steps` steps each, the two models alternating so that a busy
machine slows both alike. Not a test: it prints numbers.
"""
import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyllama.device import peak_flops, pick_device, resolve_dtype, synchronize
from tinyllama.model import Llama, ModelArgs, count_parameters, flops_per_token
from tinyllama.train import TRAIN_PRESETS, configure_optimizer, train_step


class ReferenceLM(nn.Module):
    "A GPT-style decoder built from torch.nn.TransformerEncoder with a causal mask."
    def __init__(self, args: ModelArgs, ffn_dim: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.dim)
        layer = nn.TransformerEncoderLayer(args.dim, args.n_heads, dim_feedforward=ffn_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True, bias=False)
        self.encoder = nn.TransformerEncoder(layer, args.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(args.dim, bias=False)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens):  # (B, T) -> (B, T, vocab_size)
        seq_len = tokens.shape[1]
        h = self.tok_embeddings(tokens) + self.pos_embeddings.weight[:seq_len]  # (B, T, dim)
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=tokens.device)  # (T, T)
        h = self.encoder(h, mask=mask, is_causal=True)  # (B, T, dim)
        return self.output(self.norm(h)).float()


def reference_flops_per_token(model: ReferenceLM, args: ModelArgs, seq_len: int) -> float:
    "6N + 12 n_layers dim T, N = weights in matrix multiplies (encoder + head; not the lookups)."
    n = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embeddings" not in name)
    return 6.0 * (n + args.dim * args.vocab_size) + 12.0 * args.n_layers * args.dim * seq_len


def time_steps(model, optimizer, batches, dtype, steps, device) -> float:
    "Seconds per optimiser step, averaged over `steps` steps."
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(model, optimizer, [batches[i % len(batches)]], 1.0, dtype)
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(TRAIN_PRESETS))
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "batch_size", "seq_len"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both models (default: as the preset trains)")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per model; the median is reported")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = TRAIN_PRESETS[a.preset]
    args = dataclasses.replace(cfg.model, dropout=0.0, **{k: getattr(a, k) for k in
                               ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size") if getattr(a, k) is not None})
    batch_size, seq_len = a.batch_size or cfg.batch_size, a.seq_len or cfg.seq_len
    args = dataclasses.replace(args, max_seq_len=max(args.max_seq_len, seq_len))
    device = pick_device(a.device)
    dtype_name = resolve_dtype(a.dtype or cfg.dtype, device)  # the preset's 'auto' becomes what training would use
    autocast = torch.bfloat16 if dtype_name == "bfloat16" else None
    peak, source = peak_flops(device, dtype_name, threads=torch.get_num_threads())

    torch.manual_seed(0)
    ours = Llama(args).to(device)
    reference = ReferenceLM(args, ffn_dim=3 * args.hidden_dim // 2).to(device)
    models = {"tinyllama": ours, "reference": reference}
    fpt = {"tinyllama": flops_per_token(args, seq_len), "reference": reference_flops_per_token(reference, args, seq_len)}
    optimizers = {name: configure_optimizer(m, cfg) for name, m in models.items()}
    compiled = cfg.compile if a.compile is None else a.compile
    steppers = {name: torch.compile(m) if compiled else m for name, m in models.items()}  # same parameters
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len + 1))  # (B, T+1)
        batches.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    for name in models:  # warm-up: allocator, kernels, AdamW state
        time_steps(steppers[name], optimizers[name], batches, autocast, 2, device)
    seconds = {name: [] for name in models}
    for _ in range(a.repeats):
        for name in models:
            seconds[name].append(time_steps(steppers[name], optimizers[name], batches, autocast, a.steps, device))

    print(f"device {device} ({torch.get_num_threads()} threads), {dtype_name}, {'compiled' if compiled else 'eager'}; peak {peak / 1e9:,.0f} GFLOP/s ({source})")
    print(f"shape: dim={args.dim} n_layers={args.n_layers} n_heads={args.n_heads} n_kv_heads={args.n_kv_heads} "
          f"hidden_dim={args.hidden_dim} vocab_size={args.vocab_size}; batch {batch_size} x {seq_len} tokens; "
          f"median of {a.repeats} x {a.steps} steps")
    tokens_per_sec = {}
    for name, model in models.items():
        median = statistics.median(seconds[name])
        tokens_per_sec[name] = batch_size * seq_len / median
        mfu = fpt[name] * tokens_per_sec[name] / peak
        print(f"{name:>10}: {count_parameters(model) if name == 'tinyllama' else sum(p.numel() for p in model.parameters()):>10,} "
              f"params, {fpt[name] / 1e6:7.1f} MFLOP/token, {median * 1e3:8.1f} ms/step, "
              f"{tokens_per_sec[name]:>9,.0f} tokens/s, MFU {100 * mfu:5.1f}%")
    ratio = tokens_per_sec["tinyllama"] / tokens_per_sec["reference"]
    mfu_ratio = ratio * fpt["tinyllama"] / fpt["reference"]
    print(f"ratio tinyllama / reference: {ratio:.2f}x tokens/s, {mfu_ratio:.2f}x MFU")


if __name__ == "__main__":
    main()
