"""The decoding of `tinyllama-generate` against llama.cpp on the same weights, and what the command costs end to end.

    python benchmarks/generate_command.py --json benchmarks/results/generate_command.json

In one process, one thread, batch 1, greedy, the prefill excluded (`tinyllama.generate.decode_tokens_per_sec`):
the decoder the command builds with --compile (`tinyllama.speed.decoder_for_command`: a CompiledDecoder, eight
greedy steps a call), the command's default for a short generation (chapter 12's eager loop) and llama.cpp on the F32 GGUF export of the
same checkpoint (appendix C's `LlamaCppModel`), taking turns, medians over rounds; the greedy tokens are
compared first. Then the command itself, run as a user runs it: with --compile twice (the second finds
inductor's kernels in its cache), and by default: wall seconds from start to exit, compilation included. Needs the llamacpp
extra and a trained checkpoint (runs/cpu/best); not a test: it prints numbers.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinyllama.export import LlamaCppModel, export_gguf
from tinyllama.generate import decode_tokens_per_sec, generate_tokens
from tinyllama.speed import command_parser, decoder_for_command
from tinyllama.train import find_checkpoint, load_trained_model

PROMPT = "KING RICHARD III:\nNow is the"


def llama_cpp_decoder(llm: LlamaCppModel, prompt_ids: list[int]):
    "generate(n): prefill, then n - 1 greedy steps over llama.cpp's own KV cache (as appendix C times it)."
    def decode(n):
        llm.llm.reset()
        llm.llm.eval(prompt_ids)
        for _ in range(n - 1):
            llm.llm.eval([int(np.argmax(llm.llm.scores[llm.llm.n_tokens - 1]))])
    return decode


def command_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from tinyllama.speed import main; main()", *argv], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/cpu")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = find_checkpoint(args.checkpoint)
    model, tokenizer, _ = load_trained_model(checkpoint)
    prompt_ids = tokenizer.encode(PROMPT)
    command_args = command_parser().parse_args(["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--temperature", "0",
                                                  "--compile"])
    decoder = decoder_for_command(model, command_args)
    start = time.perf_counter()
    ours = torch.stack(list(decoder.generate_tokens([prompt_ids], args.new_tokens)), 1)[0].tolist()
    compile_s = time.perf_counter() - start
    llm = LlamaCppModel(export_gguf(checkpoint, Path(tempfile.mkdtemp()) / "gguf", "f32"), n_threads=1)
    assert ours == llm.greedy(prompt_ids, args.new_tokens), "the command's greedy tokens differ from llama.cpp's"
    runners = {"tinyllama-generate --compile": lambda n: list(decoder.generate_tokens([prompt_ids], n)),
               "tinyllama-generate (eager)": lambda n: list(generate_tokens(model, [prompt_ids], n)),
               "llama.cpp F32": llama_cpp_decoder(llm, prompt_ids)}
    rates = {name: [] for name in runners}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, run in runners.items():
                rates[name].append(decode_tokens_per_sec(run, args.new_tokens, repeats=3))
    decode = {name: statistics.median(r) for name, r in rates.items()}
    argv = ["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(args.new_tokens)]
    wall = {"--compile, first run": command_seconds(argv + ["--compile"]),
            "--compile, second run": command_seconds(argv + ["--compile"]), "default (eager)": command_seconds(argv)}
    cpu = subprocess.run("lscpu | grep -o 'amx_bf16\\|avx512_bf16' | sort -u", shell=True, capture_output=True,
                         text=True).stdout.split()
    result = {"time": time.strftime("%Y-%m-%d %H:%M"), "cpu": "AMX (bfloat16 units)" if cpu else "AVX2 only",
              "checkpoint": str(checkpoint), "new_tokens": args.new_tokens, "rounds": args.rounds,
              "greedy tokens identical to llama.cpp": True, "decode tokens/s": decode,
              "compiled vs llama.cpp": decode["tinyllama-generate --compile"] / decode["llama.cpp F32"],
              "compiling in this process (s)": compile_s, "command wall seconds": wall}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
