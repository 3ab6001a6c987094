"""Serving under a bounded load: `tinyllama-serve` one request at a time against batched, tokens/s and latency.

    python benchmarks/serve_load.py                         # runs/cpu/best if there is one, else runs/tiny
    python benchmarks/serve_load.py --checkpoint runs/tiny --requests 64 --concurrency 8 --max-tokens 64

For each server setting it starts `tinyllama-serve` as a separate process on 127.0.0.1 (one torch thread, so that
this client process has the other core), waits until it answers, warms it up, and sends `--requests` completion
requests of `--max-tokens` tokens (temperature 0.8, top-p 0.95, no seed as most clients send none, or request i
with seed i under --seeded; the prompts are the first 40 characters of lines of the corpus) with
`tinyllama.batching.run_load` and `tinyllama.serve.completion_requests`:

- one by one: a server that does not batch (--max-batch-size 1), one request in flight: the baseline;
- queued, 8 at a time: the same server, --concurrency requests in flight (a queue, nothing more);
- batched, 8 at a time: a server that batches (--max-batch-size = --concurrency), --concurrency in flight;
- batched server, one at a time: that server, one in flight (what the batch window costs a lone request).

Aggregate tokens/s = completion tokens of all requests / wall time of the whole run; latency per request, from
sending it to the last byte of the answer. Every setting runs --repeats times, the settings taking turns so that a
busy machine slows all alike; the run with the median tokens/s is kept. Prints the table and writes it as CSV
(default benchmarks/results/serve_load.csv), with the checkpoint, the CPU, its load average and the settings.
Not a test. runs/tiny, if you have neither checkpoint:

    tinyllama-train --preset tiny --out-dir runs/tiny --max-seq-len 128   # the tiny preset with room for 64 new tokens
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tinyllama.data import load_corpus
from tinyllama.device import cpu_model_name
from tinyllama.batching import run_load
from tinyllama.model import count_parameters
from tinyllama.serve import completion_requests
from tinyllama.train import find_checkpoint, load_trained_model

ROOT = Path(__file__).resolve().parents[1]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def cpu_kind() -> str:
    "The CPU's name, whether it has bfloat16 instructions (AMX, AVX-512) or AVX2 only, and its cores."
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    bf16 = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    return f"{cpu_model_name()}, {', '.join(bf16) if bf16 else 'AVX2 only'}, {os.cpu_count()} cores"


def start_server(checkpoint: Path, max_batch_size: int, window_ms: float, log: Path) -> tuple[subprocess.Popen, str]:
    "`tinyllama-serve` on a free port of 127.0.0.1, its output in `log`; (process, base URL) once it answers."
    command = [sys.executable, "-c", "from tinyllama.serve import main; main()", "--checkpoint", str(checkpoint),
               "--port", "0", "--threads", "1", "--max-batch-size", str(max_batch_size),
               "--batch-window-ms", str(window_ms)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = next((l for l in log.read_text().splitlines() if l.startswith("serving ")), None)
        if line is not None:
            url = line.split("API ")[1].removesuffix("/v1")
            try:
                NO_PROXY.open(f"{url}/v1/models", timeout=5).read()
                return process, url
            except OSError:
                pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    sys.exit(f"serve_load.py: error: the server did not start:\n{log.read_text()[-2000:]}")


def stats(url: str) -> dict:
    return json.load(NO_PROXY.open(f"{url}/stats", timeout=30))


def measure(url: str, prompts: list[str], concurrency: int, max_tokens: int, seeded: bool) -> dict:
    "One run of the load, with the mean batch size the server formed during it."
    before = stats(url)
    row = run_load(completion_requests(url, prompts, max_tokens, seeded=seeded), len(prompts), concurrency)
    after = stats(url)
    row["mean_batch_size"] = (after["requests"] - before["requests"]) / max(after["batches"] - before["batches"], 1)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint or run folder (default runs/cpu/best, else runs/tiny)")
    parser.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight when batched (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="the batching server's window (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each setting; the median is kept (default 5)")
    parser.add_argument("--seeded", action="store_true", help="request i carries seed i (each seeded row draws alone)")
    parser.add_argument("--csv", type=Path, default=ROOT / "benchmarks/results/serve_load.csv")
    a = parser.parse_args(argv)
    candidates = [a.checkpoint] if a.checkpoint else [ROOT / "runs/cpu/best", ROOT / "runs/tiny"]
    checkpoint = next((found for c in candidates if (found := find_checkpoint(c)) is not None), None)
    if checkpoint is None:
        sys.exit(f"serve_load.py: error: no checkpoint in {', '.join(map(str, candidates))}; train one, e.g. "
                 f"`tinyllama-train --preset tiny --out-dir runs/tiny --max-seq-len 128`")
    model, tokenizer, _ = load_trained_model(checkpoint)
    lines = [line for line in load_corpus().split("\n") if len(line) > 20]
    prompts = [line[:40] for line in lines[:a.requests]]
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    if longest + a.max_tokens > model.args.max_seq_len:
        sys.exit(f"serve_load.py: error: prompts of up to {longest} tokens and --max-tokens {a.max_tokens} do not fit in "
                 f"the checkpoint's context of {model.args.max_seq_len} tokens")
    settings = [("one by one", 1, 1), (f"queued, {a.concurrency} at a time", 1, a.concurrency),
                (f"batched, {a.concurrency} at a time", a.concurrency, a.concurrency),
                ("batched server, one at a time", a.concurrency, 1)]
    load_average = os.getloadavg()[0]
    print(f"checkpoint {checkpoint}: {count_parameters(model):,} parameters, context {model.args.max_seq_len}; "
          f"{cpu_kind()}; load average {load_average:.2f}")
    runs = {name: [] for name, _, _ in settings}
    with tempfile.TemporaryDirectory() as logs:
        servers = {size: start_server(checkpoint, size, a.batch_window_ms, Path(logs) / f"serve{size}.log")
                   for size in sorted({size for _, size, _ in settings})}
        try:
            for size, (_, url) in servers.items():  # warm-up: first calls allocate and fill caches
                run_load(completion_requests(url, prompts, a.max_tokens), 2 * a.concurrency, a.concurrency)
            for repeat in range(a.repeats):
                for name, size, concurrency in settings:
                    runs[name].append(measure(servers[size][1], prompts, concurrency, a.max_tokens, a.seeded))
                    r = runs[name][-1]
                    print(f"  run {repeat + 1}, {name}: {r['tokens_per_s']:,.0f} tokens/s, p50 {r['p50_ms']:.0f} ms")
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    write_table(a, runs, settings, checkpoint, count_parameters(model), load_average)


def write_table(a, runs: dict, settings: list, checkpoint: Path, parameters: int, load_average: float):
    "The median run of each setting, printed and written to a.csv."
    rows = []
    for name, size, _ in settings:
        median = sorted(runs[name], key=lambda r: r["tokens_per_s"])[len(runs[name]) // 2]
        rows.append({"setting": name, "max_batch_size": size, **median})
    baseline = rows[0]["tokens_per_s"]
    try:
        shown = checkpoint.relative_to(ROOT)
    except ValueError:
        shown = checkpoint
    for row in rows:
        row.update(speedup=row["tokens_per_s"] / baseline, max_tokens=a.max_tokens, checkpoint=str(shown),
                   parameters=parameters, cpu=cpu_kind(), load_average=round(load_average, 2), threads=1,
                   batch_window_ms=a.batch_window_ms, seeded=a.seeded, repeats=a.repeats,
                   tokens_per_s_min=min(r["tokens_per_s"] for r in runs[row["setting"]]),
                   tokens_per_s_max=max(r["tokens_per_s"] for r in runs[row["setting"]]))
    print(f"\n{'setting':>32} {'batch':>5} {'in flight':>9} {'tokens/s':>9} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'mean batch':>10} {'speed-up':>8}")
    for r in rows:
        print(f"{r['setting']:>32} {r['max_batch_size']:>5} {r['concurrency']:>9} {r['tokens_per_s']:>9,.0f} "
              f"{r['p50_ms']:>7.0f} {r['p95_ms']:>7.0f} {r['mean_batch_size']:>10.2f} {r['speedup']:>7.2f}x")
    a.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(a.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwritten to {a.csv}; median of {a.repeats} runs each; speed-up against one by one "
          f"(target for batched: >= 3x): {rows[2]['speedup']:.2f}x")


if __name__ == "__main__":
    main()
