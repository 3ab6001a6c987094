"""The reading map: every chapter in one line, with its words, the minutes to read it and the minutes to run it in full.

    python tools/reading_map.py time [NOTEBOOK ...]   run chapters in full, one after another, and record each one's
                                                      minutes in results/chapter_minutes.csv (resumable: without
                                                      names, only the chapters that have no row yet)
    python tools/reading_map.py render                write the map into README.md and nbs/index.ipynb
    python tools/reading_map.py check                 exit 1 when the README's or the home page's map is stale

Words are the prose of a notebook's markdown cells (math aside), read at 200 words a minute. Minutes to run are
measured: `jupyter nbconvert --execute` on the notebook as a reader would run it (not the shrunken test mode), into a
scratch copy so the committed notebook is untouched, with the machine's kind and load recorded beside them.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, MINUTES_CSV, MAP_CSV = ROOT / "nbs", ROOT / "results" / "chapter_minutes.csv", ROOT / "results" / "reading_map.csv"
WORDS_PER_MINUTE = 200
PARTS = {"00": "Part I: text", "02": "Part II: the model", "07": "Part III: training it",
         "13": "Part IV: is it better?", "17": "Part V: a chat model", "A": "Appendices: skip any of them"}
IDEAS = {  # the chapter in one line
    "00_data": "a verified download, contiguous splits, batches of shifted windows",
    "01_tokenizer": "SentencePiece BPE with byte fallback; bits per character",
    "02_norm": "normalising by the root mean square alone",
    "03_rope": "positions as rotations, so scores depend on distance only",
    "04_swiglu": "a gated feed-forward layer",
    "05_attention": "causal grouped-query attention with a KV cache",
    "06_model": "the whole LLaMA, logit for logit against `transformers`",
    "07_recipe": "a twenty-line loop whose loss falls, grown into `TrainConfig`, schedules, AdamW and Muon",
    "08_measure": "bits per character on a whole split, throughput and MFU, a metrics file",
    "09_checkpoints": "atomic saves, a manifest, exact resume, a clean stop, one run per folder",
    "10_devices": "CPU or GPU, bfloat16 where it pays, `torch.compile`, several processes",
    "11_train": "the loop a real run needs, exported as `train()`; the main job",
    "12_generate": "sampling, batched and streaming generation with the KV cache",
    "13_gpt2": "what LLaMA replaced, checked against `GPT2LMHeadModel`",
    "14_sweep": "a named grid of runs, one resumable command, a committed CSV",
    "15_evaluate": "LLaMA against GPT-2 with paired seeds; windows and length",
    "16_scaling": "Chinchilla's law fitted to our runs; a run predicted before it trained",
    "17_posttrain": "chat markers, supervised fine-tuning on the reply only",
    "18_dpo": "preferences against the frozen SFT model: what they buy and cost",
    "A_tuning": "one change at a time on a development split: how the main job was chosen",
    "B_cli": "`tinyllama-train`: presets, one flag per field, a report",
    "C_export": "Hugging Face and llama.cpp files, checked without tinyllama; quantization",
    "D_speed": "`torch.profiler`, one change at a time, a compiled decoder, a busy machine",
    "E_speculative": "a draft proposes, the target verifies; output exactly the target's",
    "F_hybrid": "LLaMA with one of GPT-2's parts put back: which changes pay",
    "G_grpo": "a reward written as code; GRPO against the SFT model; reward hacking",
    "H_batching": "many clients, one model: requests decoded in batches, each row with its own settings",
    "I_serve": "`tinyllama-serve`: OpenAI's API over appendix H's batcher, a chat page",
}
COLUMNS = ["notebook", "minutes", "kind", "cores", "load_before", "load_after", "finished"]
BEGIN, END = "<!-- reading map: tools/reading_map.py render -->", "<!-- end of reading map -->"


def chapters() -> list[Path]:
    "The core path (00-18) then the appendices (A-H): the reading order."
    return sorted(NBS.glob("[0-9][0-9]_*.ipynb")) + sorted(NBS.glob("[A-Z]_*.ipynb"))


def prose_words(nb: Path) -> int:
    "Words of prose in the notebook's markdown cells, math aside (as ../shared/tools/reader_check.py counts them)."
    cells = json.loads(nb.read_text())["cells"]
    return sum(len(re.findall(r"[A-Za-z]+", re.sub(r"\$[^$]*\$", " ", "".join(c["source"]))))  # cell by cell: a
               for c in cells if c["cell_type"] == "markdown")  # stray $ in one cell must not swallow the next


def title(nb: Path) -> str:
    first = next(c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "markdown")
    return re.match(r"#\s+(.+)", "".join(first["source"]).strip()).group(1).strip()


def cpu_kind() -> str:
    "'AMX' (Intel, fast bfloat16), 'AVX-512 BF16', or 'AVX2' (no fast bfloat16), from the CPU's flags."
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2"


def read_minutes() -> dict[str, dict]:
    "The last recorded full run of each notebook."
    if not MINUTES_CSV.exists():
        return {}
    with MINUTES_CSV.open(newline="") as f:
        return {row["notebook"]: row for row in csv.DictReader(f)}


def append_row(row: dict):
    "One row, appended and flushed to disk: a killed timing loses only the chapter it was running."
    new = not MINUTES_CSV.exists()
    with MINUTES_CSV.open("a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def time_chapter(nb: Path) -> dict:
    "Run `nb` in full (into a scratch copy, from nbs/ as a reader would) and return its row."
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "MPLBACKEND")}
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                               "--ExecutePreprocessor.timeout=-1", "--output-dir", scratch, str(nb)],
                              cwd=NBS, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{nb.name} failed in full:\n{done.stderr[-2000:]}")
    return {"notebook": nb.stem, "minutes": round((time.perf_counter() - t0) / 60, 1), "kind": cpu_kind(),
            "cores": os.cpu_count(), "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def map_table(link_prefix: str) -> str:
    "The reading map as a markdown table, linking to the notebooks at `link_prefix` + name."
    timed, rows, words = read_minutes(), [], {"core": 0, "appendix": 0}
    rows.append("| | chapter | the idea | words | read (min) | run in full (min) |")
    rows.append("|---|---|---|---:|---:|---:|")
    for nb in chapters():
        label = nb.stem.split("_")[0]
        if label in PARTS:
            rows.append(f"| | **{PARTS[label]}** | | | | |")
        n = prose_words(nb)
        words["appendix" if label.isalpha() else "core"] += n
        run = timed.get(nb.stem)
        busy = run and float(run["load_before"]) > int(run["cores"])  # it started with more work than cores
        run_cell = f"{float(run['minutes']):g}{'*' if busy else ''} ({run['kind']})" if run else "not yet timed"
        rows.append(f"| {label} | [{title(nb)}]({link_prefix}{nb.name}) | {IDEAS[nb.stem]} | {n:,} | "
                    f"{math.ceil(n / WORDS_PER_MINUTE)} | {run_cell} |")
    core, appendix = words["core"], words["appendix"]
    return "\n".join(rows) + (f"\n\nThe core path is {core:,} words (about {round(core / WORDS_PER_MINUTE / 60, 1)} hours "
                              f"of reading); the appendices, {appendix:,}. Minutes to run are wall-clock on a 2-core CPU of the kind "
                              f"named; * marks a run that started while the machine had more work than cores (other runs), so it is "
                              f"an upper bound.")


def map_csv() -> str:
    "The map's figures as a CSV (results/reading_map.csv), so every figure the map quotes has a file behind it."
    timed, lines = read_minutes(), ["notebook,words,read_minutes,run_minutes,kind"]
    for nb in chapters():
        n, run = prose_words(nb), timed.get(nb.stem, {})
        lines.append(f"{nb.stem},{n},{math.ceil(n / WORDS_PER_MINUTE)},{run.get('minutes', '')},{run.get('kind', '')}")
    core = sum(prose_words(nb) for nb in chapters() if nb.stem[0].isdigit())
    lines.append(f"core path,{core},{math.ceil(core / WORDS_PER_MINUTE)},,")
    lines.append(f"appendices,{sum(prose_words(nb) for nb in chapters()) - core},,,")
    return "\n".join(lines) + "\n"


def render_into(text: str, link_prefix: str) -> str:
    "`text` with the map between its markers replaced by the current one."
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + map_table(link_prefix) + "\n" + text[end:]


def home_cells() -> tuple[dict, int]:
    home = json.loads((NBS / "index.ipynb").read_text())
    i = next(i for i, c in enumerate(home["cells"]) if BEGIN in "".join(c["source"]))
    return home, i


def stale() -> list[str]:
    "The files whose map differs from the current one."
    out = [] if MAP_CSV.exists() and MAP_CSV.read_text() == map_csv() else [str(MAP_CSV.relative_to(ROOT))]
    readme = (ROOT / "README.md").read_text()
    if render_into(readme, "nbs/") != readme:
        out.append("README.md")
    home, i = home_cells()
    text = "".join(home["cells"][i]["source"])
    if render_into(text, "") != text:
        out.append("nbs/index.ipynb")
    return out


def render():
    MAP_CSV.write_text(map_csv())
    readme = ROOT / "README.md"
    readme.write_text(render_into(readme.read_text(), "nbs/"))
    home, i = home_cells()
    lines = render_into("".join(home["cells"][i]["source"]), "").split("\n")
    home["cells"][i]["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    (NBS / "index.ipynb").write_text(json.dumps(home, indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str]):
    command, names = (argv or ["check"])[0], argv[1:]
    if command == "time":
        todo = [NBS / (n if n.endswith(".ipynb") else n + ".ipynb") for n in names] or \
               [nb for nb in chapters() if nb.stem not in read_minutes()]
        for nb in todo:
            print(f"{nb.name}: running in full ...", flush=True)
            try:
                row = time_chapter(nb)
            except RuntimeError as e:  # a chapter that fails records nothing; the others still run
                print(e, flush=True)
                continue
            append_row(row)
            print(f"{nb.name}: {row['minutes']} min ({row['kind']}, load {row['load_before']} -> {row['load_after']})", flush=True)
    elif command == "render":
        render()
    elif command == "check":
        if bad := stale():
            sys.exit(f"reading map out of date in {', '.join(bad)}: run `python tools/reading_map.py render`")
    else:
        sys.exit(f"unknown command {command!r}; use time, render or check")


if __name__ == "__main__":
    main(sys.argv[1:])
