"""The built website, checked as a reader sees it: each page in headless Chromium.

Run by `.ci/run` after `tools/build_site.py`; point `TINYLLAMA_SITE` at the built folder (`_docs`).
"""
import functools, http.server, json, os, re, threading, urllib.error, urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("TINYLLAMA_SITE", ROOT / "_docs"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the networking flags Chromium keeps calling home, which a closed network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def notebook_title(nb: Path) -> str:
    "The `# Title` of a notebook's first markdown cell, which nbdev makes the page title."
    cells = json.loads(nb.read_text())["cells"]
    first = next(c for c in cells if c["cell_type"] == "markdown")
    return re.match(r"#\s+(.+)", "".join(first["source"]).strip()).group(1).strip()


CHAPTERS = sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")) + sorted((ROOT / "nbs").glob("[A-Z]_*.ipynb"))  # core, appendices
PAGES = [("index.html", notebook_title(ROOT / "nbs" / "index.ipynb"))] + [
    (nb.with_suffix(".html").name, notebook_title(nb)) for nb in CHAPTERS]


@pytest.fixture(scope="module")
def server():
    if not (SITE / "index.html").is_file():
        pytest.fail(f"TINYLLAMA_SITE={SITE} has no index.html: build the site with tools/build_site.py first")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    handler = functools.partial(Quiet, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium, or set CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def test_every_chapter_has_a_page():
    assert len(CHAPTERS) >= 2
    missing = [page for page, _ in PAGES if not (SITE / page).is_file()]
    assert not missing, f"pages not built: {missing}"


@pytest.mark.parametrize("page,title", PAGES, ids=[p for p, _ in PAGES])
def test_page(server, browser, page, title):
    url = urljoin(server, page)
    outside, failed = [], []
    tab = browser.new_page()
    tab.on("request", lambda r: None if urlparse(r.url).hostname in ("127.0.0.1", None) or r.url.startswith("data:")
           else outside.append(r.url))
    tab.on("requestfailed", lambda r: failed.append(r.url))
    tab.goto(url, wait_until="networkidle")

    assert title in tab.title(), f"{page}: title {tab.title()!r} does not name {title!r}"

    # The sidebar links to every chapter.
    sidebar = tab.eval_on_selector_all("#quarto-sidebar a[href]", "els => els.map(e => e.href)")
    linked = {urlparse(h).path.rsplit("/", 1)[-1] for h in sidebar}
    assert {p for p, _ in PAGES if p != "index.html"} <= linked, f"{page}: sidebar misses {set(p for p, _ in PAGES) - linked}"

    # Every image loaded; a chapter shows at least one plot.
    images = tab.eval_on_selector_all("main img", "els => els.map(e => [e.src, e.complete && e.naturalWidth > 0])")
    assert all(ok for _, ok in images), f"{page}: images that did not load: {[s for s, ok in images if not ok]}"
    if page != "index.html":
        assert images, f"{page}: no plot on the page"

    # Maths was typeset by KaTeX, served from the site itself.
    text = tab.inner_text("main")
    assert "\\(" not in text and "\\[" not in text, f"{page}: raw TeX delimiters left in the text"
    untypeset = tab.eval_on_selector_all(".math", "els => els.filter(e => !e.querySelector('.katex')).length")
    assert untypeset == 0, f"{page}: {untypeset} maths spans not rendered"
    assert not outside, f"{page}: requests left the site: {outside[:5]}"
    assert not failed, f"{page}: requests failed: {failed[:5]}"

    # No broken internal links: every same-site target exists, and so does its #anchor.
    hrefs = tab.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    tab.close()
    for href in sorted(set(hrefs)):
        if urlparse(href).hostname != "127.0.0.1": continue
        target, anchor = urldefrag(href)
        try:
            body = fetch(target)
        except urllib.error.HTTPError as e:
            pytest.fail(f"{page}: broken link {href} ({e.code})")
        if anchor and target.endswith(".html"):
            assert re.search(rf'id="{re.escape(anchor)}"', body), f"{page}: link {href} names a missing anchor"


@functools.lru_cache(maxsize=None)
def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode("utf-8", "replace")
