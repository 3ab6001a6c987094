"The project's promises about itself: one module a notebook, the README's commands, the pinned torch."
import ast, importlib, importlib.util, json, re, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NBS = ROOT / "nbs"
CORE = sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))  # the numbered chapters: the path from text to a chat model
APPENDICES = sorted((ROOT / "nbs").glob("[A-Z]_*.ipynb"))  # lettered, read after the core path, skippable
CHAPTERS = CORE + APPENDICES  # the reading order


def default_exp(nb: Path) -> str | None:
    "The module a notebook exports, from its `#| default_exp` directive."
    for cell in json.loads(nb.read_text())["cells"]:
        m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), re.M)
        if m: return m.group(1)
    return None


def test_one_module_per_notebook():
    modules = [default_exp(nb) for nb in CHAPTERS]
    assert all(modules), f"chapters without default_exp: {[nb.name for nb, m in zip(CHAPTERS, modules) if not m]}"
    assert len(set(modules)) == len(modules), f"two notebooks export one module: {modules}"
    generated = {p.stem for p in (ROOT / "tinyllama").glob("*.py") if not p.stem.startswith("_")}
    assert generated == set(modules), f"modules without a notebook: {generated - set(modules)}; not exported: {set(modules) - generated}"


def test_torch_is_pinned_exactly():
    # A range would pull the multi-GB CUDA build instead of the CPU wheel.
    assert "torch==2.13.0" in PYPROJECT["project"]["dependencies"]


def test_readme_shows_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_CMD='(.+)'$", ci, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    assert command in readme.splitlines(), "README.md must show the exact test command that .ci/run runs"
    home = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])
    assert command in home, "the home page (nbs/index.ipynb) must show the same test command as the README"


def test_home_page_links_every_chapter():
    home = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])
    linked = set(re.findall(r"\]\(((?:\d\d|[A-Z])_\w+\.ipynb)\)", home))
    assert {nb.name for nb in CHAPTERS} == linked, f"home page links {sorted(linked)}, chapters are {[nb.name for nb in CHAPTERS]}"


def test_console_scripts_resolve():
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), f"{name} -> {target} is not callable"


def test_main_command_is_the_same_everywhere_and_exists():
    "The README's first command and the home page's are one line, and the console script it ends with is declared."
    readme_blocks = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
    home = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])
    home_blocks = re.findall(r"```bash\n(.+?)\n```", home, re.S)
    assert readme_blocks[:2] == home_blocks[:2], f"README {readme_blocks[:2]} vs home page {home_blocks[:2]}"
    script = readme_blocks[0].split()[-1].removeprefix(".venv/bin/")
    assert script in PYPROJECT["project"]["scripts"], f"{script} is not a console script of pyproject.toml"


def test_imports_run_down_the_chapter_order():
    "A module imports only modules of earlier chapters; the trainer is never imported by a model."
    order = {default_exp(nb): i for i, nb in enumerate(CHAPTERS)}
    for module, position in order.items():
        tree = ast.parse((ROOT / "tinyllama" / f"{module}.py").read_text())
        imported = {node.module.removeprefix("tinyllama.") for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and (node.level or node.module.startswith("tinyllama."))}
        later = {name for name in imported if order.get(name, -1) >= position}
        assert not later, f"tinyllama.{module} (chapter {CHAPTERS[position].stem}) imports later chapters' modules {later}"


THE_LOOP = ("train.py", "train")  # the one loop a chapter builds, exported as the reader saw it: read top to bottom


def test_functions_fit_on_a_screen():
    "No function or method of the package is longer than 60 lines; the training loop, 100."
    for path in sorted((ROOT / "tinyllama").glob("[!_]*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= (100 if (path.name, node.name) == THE_LOOP else 60), f"{path.name}: {node.name} is {length} lines"


NOISE = re.compile(r"Traceback \(most recent call last\)|Warning:|warnings\.warn|\d+%\|[^\n]*\|\s*\d+/\d+|USDT|STAGE:"
                   r"|Exception ignored|(?<![\w.])/(tmp|home|root|work)/")
PROJECT_TALK = re.compile(r"\b(the issue'?s?|issues? #?\d+|targets? of (the )?issue|this session|tickets?)\b", re.I)


def outputs_text(output: dict) -> str:
    data = output.get("data", {})
    return "".join("".join(part) for part in (output.get("text", ""), data.get("text/plain", ""),
                                              data.get("text/html", ""), output.get("traceback", [])))


def test_committed_outputs_are_what_a_reader_should_see():
    "No error outputs, tracebacks, warnings, progress-bar fragments, profiler lines or local paths in any notebook."
    problems = []
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            for output in cell.get("outputs", []):
                if output["output_type"] == "error" or (m := NOISE.search(outputs_text(output))):
                    problems.append(f"{nb.name} cell {i}: {output['output_type'] if output['output_type'] == 'error' else m.group()}")
    assert not problems, problems


def test_the_course_speaks_of_the_course_only():
    "The text a reader sees never speaks of how the project is managed (issues, targets, sessions)."
    texts = {nb.name: ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"]]
             for nb in sorted((ROOT / "nbs").glob("*.ipynb"))}
    texts["README.md"] = [(ROOT / "README.md").read_text()]
    found = [f"{name}: {m.group()!r}" for name, sources in texts.items() for text in sources
             for m in PROJECT_TALK.finditer(text)]
    assert not found, found


def test_sidebar_shows_every_chapter_once_in_its_part():
    "nbs/sidebar.yml (written by hand: custom_sidebar) lists each chapter exactly once, under a part, in reading order."
    listed = re.findall(r"^\s+- (\S+\.ipynb)$", (ROOT / "nbs" / "sidebar.yml").read_text(), re.M)
    assert listed == ["index.ipynb"] + [nb.name for nb in CHAPTERS]


FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d{2,}|\d*\.\d{3,})(?!\w)")  # 3+ significant digits
ARXIV_ID = re.compile(r"\d{4}\.\d{4,5}")
SOURCED_FIGURES = {  # figures from elsewhere, and the words naming their source that must stand in the same cell
    "1.4697": "nanoGPT's README",  # karpathy/nanoGPT's README: shakespeare_char's best validation loss
    "0.044715": "Hendrycks & Gimpel",  # the tanh approximation of GELU (arXiv:1606.08415)
    "50,257": "Radford et al. 2019",  # GPT-2's vocabulary
}


def _tracked(*patterns: str) -> list[Path]:
    "Files under git that match the patterns (a checkout without git: every file that matches)."
    import subprocess
    try:
        names = subprocess.run(["git", "ls-files", "--", *patterns], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
        return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()})


def _reader_text(output: dict) -> str:
    "What a reader sees of one output: streams, plain text, HTML without its tags."
    parts = ["".join(output.get("text", ""))]
    for kind, value in output.get("data", {}).items():
        value = "".join(value) if isinstance(value, list) else str(value)
        if kind == "text/html":
            parts.append(re.sub(r"<[^>]+>", " ", value))
        elif kind.startswith("text/"):
            parts.append(value)
    return "\n".join(parts)


def _figure_is_backed(figure: str, corpus: str) -> bool:
    "The figure, commas dropped, is in the corpus, or is a rounding of a number there (1.42 of 1.4227, 22,677 of 22677.4)."
    plain = figure.replace(",", "")
    if plain in corpus:
        return True
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    pattern = r"(?<![\d.])" + re.escape(plain.split(".")[0]) + (r"\.\d+" if decimals else r"(?:\.\d+)?")
    return any(round(float(m.group()), decimals) == float(plain) for m in re.finditer(pattern, corpus))


def test_every_figure_in_the_prose_is_backed():
    "A figure in the prose of a committed notebook or the README is in some committed output or results file, or its cell names its source."
    notebooks = {nb: json.loads(nb.read_text())["cells"] for nb in sorted(_tracked("nbs/*.ipynb"))}
    corpus = [_reader_text(o) for cells in notebooks.values() for c in cells for o in c.get("outputs", [])]
    corpus += [f.read_text(errors="replace") for f in _tracked("results/*", "benchmarks/results/*") if f.stat().st_size < 5_000_000]
    corpus = "\n".join(corpus).replace(",", "")
    texts = [(nb.name, i, "".join(c["source"])) for nb, cells in notebooks.items()
             for i, c in enumerate(cells) if c["cell_type"] == "markdown"]
    texts += [("README.md", i, section) for i, section in enumerate(re.split(r"(?m)^(?=## )", (ROOT / "README.md").read_text()))]
    unbacked = [f"{name} cell {i}: {figure}" for name, i, text in texts for figure in FIGURE.findall(text)
                if not ARXIV_ID.fullmatch(figure) and not _figure_is_backed(figure, corpus)
                and not (figure in SOURCED_FIGURES and SOURCED_FIGURES[figure] in text)]
    assert not unbacked, f"figures in the prose that no output or results file holds, and whose source is not named: {unbacked}"


def _reading_map():
    spec = importlib.util.spec_from_file_location("reading_map", ROOT / "tools" / "reading_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reading_map_is_current():
    "The README's and the home page's maps are what tools/reading_map.py renders from the notebooks and the timings."
    reading_map = _reading_map()
    assert [nb.name for nb in reading_map.chapters()] == [nb.name for nb in CHAPTERS]
    assert set(reading_map.IDEAS) == {nb.stem for nb in CHAPTERS}, "every chapter has its one line in the map"
    assert not reading_map.stale(), "run `python tools/reading_map.py render`"


def test_core_path_is_at_most_30000_words():
    "A reader can take the core path in an afternoon or two: at most 30,000 words of prose."
    words = {nb.name: _reading_map().prose_words(nb) for nb in CORE}
    assert sum(words.values()) <= 30_000, words


def test_references_name_chapters_that_exist():
    "Every 'chapter NN' names a core chapter, every 'appendix X' an appendix, every link to a notebook a notebook."
    core = {nb.name[:2] for nb in CORE}
    appendices = {nb.name[0] for nb in APPENDICES}
    texts = {nb.name: ("".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"]), NBS)
             for nb in sorted(NBS.glob("*.ipynb"))}
    texts["README.md"] = ((ROOT / "README.md").read_text(), ROOT)
    wrong = []
    for name, (text, base) in texts.items():
        wrong += [f"{name}: chapter {n}" for n in re.findall(r"\b[Cc]hapter (\d\d)\b", text) if n not in core]
        wrong += [f"{name}: appendix {a}" for a in re.findall(r"\b[Aa]ppendix ([A-Z])\b", text) if a not in appendices]
        wrong += [f"{name}: link {link}" for link in re.findall(r"\]\(([\w./-]+\.ipynb)\)", text) if not (base / link).exists()]
    assert not wrong, wrong
