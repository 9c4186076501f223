"""The docs: a short README that links every page of the MkDocs site, and a site that builds with `--strict`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).with_name("mkdocs")
README_MAX_LINES = 250  # a README that fits on a few screens (STYLE.md, "Docs like httpx and Typer")
LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Build:
    returncode: int
    output: str
    site: Path


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The site, built once for this module with the virtualenv's mkdocs into a temporary directory."""
    assert MKDOCS.exists(), f"{MKDOCS} is missing: install the test extra (.venv/bin/pip install -e '.[test]')"
    site = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's end-of-life notice, not about this site
    proc = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return Build(proc.returncode, proc.stdout + proc.stderr, site)


def pages() -> list[Path]:
    """The site's own pages (docs/results is bench/results, linked in: reports, not pages of the site's own)."""
    return sorted(DOCS.glob("*.md"))


def readme_links() -> list[str]:
    return LINK.findall(README.read_text(encoding="utf-8"))


def test_the_site_builds_with_strict(build: Build) -> None:
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.output}"
    assert (build.site / "index.html").is_file(), build.output


def test_the_readme_fits_on_a_few_screens() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_the_readme_links_every_page_of_the_docs() -> None:
    assert pages(), "docs/ holds no page"
    linked = {link.split("#", 1)[0] for link in readme_links()}
    missing = [f"docs/{page.name}" for page in pages() if f"docs/{page.name}" not in linked]
    assert not missing, f"README.md links none of {missing}"


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [page.name for page in pages() if not re.search(rf":\s*{re.escape(page.name)}\s*$", nav, re.M)]
    assert not missing, f"mkdocs.yml's nav lacks {missing}"


def test_the_readmes_links_lead_somewhere(build: Build) -> None:
    """Every relative link of the README names a file that exists, and a `docs/PAGE.md#anchor` one a heading the
    built site has (mkdocs checks the links inside docs/, not the README's)."""
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.output}"
    broken = []
    for link in readme_links():
        if re.match(r"[a-z]+:", link):
            continue  # an absolute URL: not checked offline
        path, _, anchor = link.partition("#")
        if path and not (ROOT / path).exists():
            broken.append(link)
        elif anchor:
            target = path or "README.md"
            if target == "README.md":
                headings = README.read_text(encoding="utf-8")
                slugs = {_github_slug(h) for h in re.findall(r"^#+ (.+)$", headings, re.M)}
                if anchor not in slugs:
                    broken.append(link)
                continue
            page = Path(target).relative_to("docs").with_suffix("")
            html = build.site / ("index.html" if page.name == "index" else f"{page}/index.html")
            if f'id="{anchor}"' not in html.read_text(encoding="utf-8"):
                broken.append(link)
    assert not broken, f"README.md links that lead nowhere: {broken}"


def _github_slug(heading: str) -> str:
    """How GitHub names a heading's anchor (lower case, punctuation dropped, spaces as hyphens)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# -- the promise register (docs/promises.md) ---------------------------------------------------------------------------

PROMISES = DOCS / "promises.md"
TEST_REF = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def _test_functions(path: Path) -> set[str]:
    """The test functions a test module defines (in classes too), by name: parametrised ones without their ids."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


def test_every_promise_names_tests_that_exist_or_why_only_a_real_boot_shows_it() -> None:
    lines = [line for line in PROMISES.read_text(encoding="utf-8").splitlines() if line.startswith("- ")]
    assert len(lines) >= 50, "the register lists the promises one per line, as '- ...'"
    known: dict[str, set[str]] = {}
    problems = []
    for line in lines:
        refs = TEST_REF.findall(line)
        if not refs:
            problems.append(f"no test named: {line[:100]}")
        if "real-boot only" in line and not re.search(r"real-boot only: [^`]+`tests/", line):
            problems.append(f"a real-boot only promise needs its reason and its VM test: {line[:100]}")
        for file, name in refs:
            path = ROOT / file
            if file not in known:
                known[file] = _test_functions(path) if path.is_file() else set()
            if name not in known[file]:
                problems.append(f"{file}::{name} does not exist (renamed or deleted?)")
    assert not problems, "docs/promises.md:\n" + "\n".join(problems)
