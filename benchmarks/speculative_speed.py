"""Speculative decoding against plain cached decoding: acceptance, tokens/s and speed-up for k = 1..8 (appendix E).

    python benchmarks/speculative_speed.py                         # runs/cpu/best as target, runs/draft/best as draft
    python benchmarks/speculative_speed.py --train-draft           # train the draft first if runs/draft has none (1-2 min)
    python benchmarks/speculative_speed.py --temperatures 0 0.8 --repeats 7 --json speculative.json

Batch 1, one thread by default, 4 prompts from the validation text, `--new-tokens` each. Every repeat runs plain
decoding (chapter 12's `generate_tokens`) and speculative decoding for each k in turn, so a busy machine slows all
alike; the tokens/s are medians over the repeats (`tinyllama.speculative.measure_speculative`). Greedy speculative
output is checked to be identical to plain greedy output first. Not a test: run it on a quiet machine
(under `flock /tmp/cpu.lock` on a shared one); the load average is printed.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from tinyllama.data import load_corpus, split_text
from tinyllama.generate import generate_tokens
from tinyllama.model import count_parameters
from tinyllama.speculative import check_same_tokenizer, draft_config, measure_speculative, speculative_decode
from tinyllama.train import load_trained_model, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="runs/cpu/best", help="the target's checkpoint (default runs/cpu/best)")
    parser.add_argument("--draft", default="runs/draft", help="the draft's checkpoint or run folder (default runs/draft)")
    parser.add_argument("--train-draft", action="store_true",
                        help="if --draft holds no checkpoint, train one there (draft_config: width 64, 2 layers, 800 steps)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(range(1, 9)), help="draft tokens per round")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8], help="0 is greedy")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts from the validation text (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per median (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    target, tokenizer, target_cfg = load_trained_model(args.target)
    draft_dir = Path(args.draft)
    if not any((draft_dir / sub / "model.safetensors").is_file() for sub in ("", "best", "last")):
        if not args.train_draft:
            raise SystemExit(f"speculative_speed.py: error: no draft checkpoint in {draft_dir}; pass --train-draft")
        cfg = draft_config(target_cfg, dim=64, n_layers=2, n_heads=4, max_steps=800, lr=3e-3, eval_batches=20,
                           out_dir=draft_dir)
        result = train(cfg, progress=False)
        print(f"trained the draft in {result.elapsed_s:.0f} s, validation loss {result.val['loss']:.3f} nats/token")
    draft, draft_tokenizer, _ = load_trained_model(draft_dir)
    check_same_tokenizer(tokenizer, draft_tokenizer)

    val_text = split_text(load_corpus()[:target_cfg.max_chars], target_cfg.split)["val"]
    step = len(val_text) // args.prompts
    prompts = [tokenizer.encode(val_text[i:i + 60]) for i in range(100, 100 + step * args.prompts, step)]
    for ids in prompts[:2]:  # the comparison is only fair if both make the same tokens
        plain = torch.cat(list(generate_tokens(target, [ids], args.new_tokens))).tolist()
        assert speculative_decode(target, draft, ids, args.new_tokens, k=4)[0] == plain, "greedy outputs differ"

    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} thread(s); torch {torch.__version__}")
    print(f"target {args.target}: {count_parameters(target):,} parameters, {target.args.n_layers} layers of width "
          f"{target.args.dim}; draft {draft_dir}: {count_parameters(draft):,} parameters, {draft.args.n_layers} layers "
          f"of width {draft.args.dim}")
    print(f"{len(prompts)} prompts x {args.new_tokens} new tokens, batch 1, medians of {args.repeats} repeats\n")
    all_rows, start = [], time.perf_counter()
    for temperature in args.temperatures:
        rows = measure_speculative(target, draft, prompts, args.new_tokens, args.ks, temperature, args.repeats)
        label = "greedy" if temperature == 0 else f"sampled, temperature {temperature}"
        print(label)
        print(f"{'k':>3} {'acceptance':>11} {'tokens/pass':>12} {'tokens/s':>9} {'speed-up':>9}")
        for row in rows:
            name = "plain" if row["k"] == 0 else str(row["k"])
            acceptance = "" if row["k"] == 0 else f"{row['acceptance']:.3f}"
            print(f"{name:>5} {acceptance:>9} {row['tokens per target pass']:>12.2f} {row['tokens/s']:>9.0f} "
                  f"{row['speed-up']:>8.2f}x")
        print()
        all_rows += [row | {"temperature": temperature} for row in rows]
    print(f"measured in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "draft": str(draft_dir), "threads": args.threads,
                                         "rows": all_rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))


if __name__ == "__main__":
    main()
