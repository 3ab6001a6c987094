"""Build the course website offline, without Quarto.

`nbdev-docs` is the way to build the site where Quarto is installed. Where it is not (CI, this
machine), this script does the same three steps with pure-Python parts:

1. nbdev's own preprocessing (`nbdev.yml`, `sidebar.yml`, and the processed notebooks in `_proc/`,
   with `show_doc` output and directives applied), exactly what `nbdev-docs` hands to Quarto;
2. smalldocs renders `_proc/` from the same `nbs/_quarto.yml` into `_docs/`;
3. the site asks nothing of other hosts, so it reads the same offline: KaTeX is served from the
   site itself instead of a CDN, from the npm package `katex` that `.ci/run` unpacks (pass its
   `dist/` folder as `--katex`), and the theme's web-font import is dropped for system fonts.
"""
import argparse, os, re, shutil, subprocess, sys
from pathlib import Path

CDN = re.compile(r"https://cdn\.jsdelivr\.net/npm/katex@[^/]+/dist")
REMOTE_IMPORT = re.compile(r"@import url\(['\"]?https?://[^)]*\);?")


def nbdev_preprocess(root: Path) -> Path:
    "Run nbdev's docs preprocessing (everything `nbdev-docs` does before it calls Quarto)."
    os.chdir(root)
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    import nbdev.doclinks
    cfg = get_config()
    refresh_quarto_yml()
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    return proc_nbs(cfg.nbs_path, n_workers=0, force=True)


def vendor_katex(site: Path, katex_dist: Path) -> int:
    "Copy KaTeX into the site and point every page at it with a path relative to that page."
    target = site / "site_libs" / "katex"
    shutil.copytree(katex_dist, target, dirs_exist_ok=True)
    pages = 0
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        if not CDN.search(html): continue
        rel = os.path.relpath(target, page.parent).replace(os.sep, "/")
        page.write_text(CDN.sub(rel, html), encoding="utf-8")
        pages += 1
    return pages


def drop_remote_fonts(site: Path) -> int:
    "Remove `@import url(https://...)` (the theme's Google Fonts) from the site's CSS files."
    changed = 0
    for css in site.rglob("*.css"):
        text = css.read_text(encoding="utf-8")
        if REMOTE_IMPORT.search(text):
            css.write_text(REMOTE_IMPORT.sub("", text), encoding="utf-8")
            changed += 1
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--katex", type=Path, required=True, help="the dist/ folder of the npm package katex")
    args = parser.parse_args(argv)
    katex = args.katex.resolve()
    if not (katex / "katex.min.js").is_file():
        raise FileNotFoundError(f"--katex={katex} has no katex.min.js; pass the dist/ folder of the npm package katex")
    root = Path(__file__).resolve().parent.parent
    cache = nbdev_preprocess(root)
    subprocess.run([sys.executable, "-m", "smalldocs.cli", "render", str(cache)], check=True)
    site = root / "_docs"
    shutil.rmtree(site, ignore_errors=True)
    shutil.move(str(cache / "_docs"), site)
    pages, fonts = vendor_katex(site, katex), drop_remote_fonts(site)
    print(f"site: {site}: {len(list(site.rglob('*.html')))} pages, KaTeX served locally for {pages}, web fonts dropped from {fonts} CSS files")


if __name__ == "__main__":
    main()
