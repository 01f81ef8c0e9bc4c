"""The README and docs/ stay true to the tree, cheaply: every relative link (and #anchor) resolves, every repository
path and every ``timm_icl.name`` they cite exists, and every flag they give a recipe or ``timm-icl`` is one that
script's argparse parser accepts. Parsers are built in-process (``build_parser()``, or the parser a script's
``main()`` builds), nothing is run."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
RECIPE_CALL = re.compile(r"recipes/(\w+)\.py\b(.*)")
CLI_CALL = re.compile(r"\btimm-icl\s+(\w+)\b(.*)")
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")
REPO_PATH = re.compile(r"^(?:\.ci|benchmarks|docs|recipes|results|tests|timm_icl)/[\w./{},:-]*$")
DOTTED = re.compile(r"\btimm_icl(?:\.\w+)+")


def text_of(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The page without fenced code blocks."""
    return FENCE.sub("", text)


def inline_spans(text: str) -> list[str]:
    return [" ".join(span.split()) for span in INLINE.findall(prose(text))]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text_of(page)).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def command_lines(text: str) -> list[str]:
    """Shell command lines in code blocks and inline spans, continuation lines joined, comments dropped."""
    lines = []
    for block in [*code_blocks(text), *inline_spans(text)]:
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #", 1)[0])
    return lines


def flags_after(tail: str) -> list[str]:
    tail = re.split(r"&&|;|\||\)", tail, maxsplit=1)[0]
    return [m.group(0) for token in tail.split() if (m := FLAG.match(token.split("=", 1)[0]))]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def load_recipe(name: str):
    """Import recipes/NAME.py by its file path (recipes/ on sys.path for the recipes that import each other)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", "") == str(ROOT / "recipes" / f"{name}.py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def recipe_parser(name: str) -> argparse.ArgumentParser:
    module = load_recipe(name)
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture  # the parser the script's main() builds, caught before it parses
    try:
        try:
            module.main()
        except _Captured as caught:
            return caught.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"recipes/{name}.py: main() built no argparse parser")


@pytest.fixture(scope="module")
def parsers():
    """{'recipes/NAME.py': parser} for every recipe with a command line, {'timm-icl SUB': parser} per subcommand."""
    saved_path = list(sys.path)
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        out = {}
        for path in sorted((ROOT / "recipes").glob("*.py")):
            if "argparse" in path.read_text(encoding="utf-8"):
                out[f"recipes/{path.name}"] = recipe_parser(path.stem)
        from timm_icl import cli

        top = cli.build_parser()
        out["timm-icl"] = top
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.update({f"timm-icl {sub}": p for sub, p in action.choices.items()})
        yield out
    finally:
        sys.path[:] = saved_path


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    bad = []
    for target in LINK.findall(re.sub(INLINE, "", prose(text_of(page)))):
        if re.match(r"^[a-z][\w+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            bad.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links: {bad}"


def expand(path: str) -> list[str]:
    """``a_{b,c}.yaml`` -> [a_b.yaml, a_c.yaml]."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in expand(path[: m.start()] + alt + path[m.end() :])]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_paths_exist(page):
    text = text_of(page)
    words = [span.strip() for span in inline_spans(text)] + [w for line in command_lines(text) for w in line.split()]
    cited = {w for w in words if REPO_PATH.match(w)}
    bad = []
    for item in sorted(cited):
        path, _, test_name = item.partition("::")
        if path.startswith("results/runs/"):  # written by the runs, not part of the tree
            continue
        for p in expand(path):
            if not (ROOT / p).exists():
                bad.append(p)
            elif test_name and f"def {test_name}(" not in (ROOT / p).read_text(encoding="utf-8"):
                bad.append(item)
    assert not bad, f"{page.relative_to(ROOT)} cites paths that do not exist: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_names_exist(page):
    bad = []
    for dotted in sorted(set(DOTTED.findall(text_of(page)))):
        parts = dotted.split(".")
        obj, i = importlib.import_module(parts[0]), 1
        while i < len(parts):
            if hasattr(obj, parts[i]):
                obj = getattr(obj, parts[i])
            else:
                try:
                    obj = importlib.import_module(".".join(parts[: i + 1]))
                except ModuleNotFoundError:
                    bad.append(dotted)
                    break
            i += 1
    assert not bad, f"{page.relative_to(ROOT)} cites names timm_icl does not have: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_flags_exist(page, parsers):
    text = text_of(page)
    bad = []
    for line in command_lines(text):
        for m in RECIPE_CALL.finditer(line):
            parser = parsers.get(f"recipes/{m.group(1)}.py")
            if parser is None:
                if flags_after(m.group(2)):
                    bad.append(f"recipes/{m.group(1)}.py has no argparse parser: {line.strip()}")
                continue
            bad += [f"{flag} ({line.strip()})" for flag in flags_after(m.group(2)) if flag not in options(parser)]
        for m in CLI_CALL.finditer(line):
            parser = parsers.get(f"timm-icl {m.group(1)}")
            if parser is None:
                bad.append(f"timm-icl has no command {m.group(1)!r}: {line.strip()}")
                continue
            bad += [f"{flag} ({line.strip()})" for flag in flags_after(m.group(2)) if flag not in options(parser)]
    # a flag named on its own in the prose (`--constraint-weight`, `-j/--workers`) belongs to one of the parsers
    known = set().union(*(options(p) for p in parsers.values()))
    for span in inline_spans(text):
        if span.startswith("-"):
            words = [w.strip("[]()\"'") for part in span.split() for w in part.split("/")]
            bad += [f"{w} (`{span}`)" for w in words if FLAG.fullmatch(w) and w not in known]
    assert not bad, f"{page.relative_to(ROOT)} names flags no parser accepts: {bad}"


def test_readme_keeps_the_ci_command():
    """.ci/run runs the README's test command verbatim: the two must not drift apart."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip().startswith("bash .ci/setup &&")]
    assert commands and all(command in text_of(ROOT / "README.md") for command in commands), commands
    assert "bash .ci/setup && .venv/bin/python recipes/demo_fashion_mnist.py" in text_of(ROOT / "README.md")


def test_slug_matches_github():
    assert slug("The demo: `recipes/demo_fashion_mnist.py`") == "the-demo-recipesdemo_fashion_mnistpy"
    assert slug("Where does ICL help? By training-set size") == "where-does-icl-help-by-training-set-size"
    assert slug("Export and the Hub") == "export-and-the-hub"
