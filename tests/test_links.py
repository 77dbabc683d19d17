"""The documentation points at files that exist: every relative link in README.md and docs/*.md, and
every path of this repository's own folders that the text names (in prose, `code` or a code block)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target "title"); the target may be wrapped in <...>
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target (reference definitions)
REF = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
# a path inside one of the repository's own folders, e.g. scripts/demo.sh, ../results/x.md, recipes/*.yaml
REPO_PATH = re.compile(r"(?<![\w/.-])((?:\.\./)?(?:docs|results|scripts|recipes|tests|msrnn_train)/[\w./*{},-]*\w\}?)")


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def relative_links(text: str) -> list[str]:
    """The link targets of a markdown text that name a file of the repository (no scheme, no
    pure #anchor), without their #anchor."""
    found = LINK.findall(text) + REF.findall(text) + HTML.findall(text)
    out = []
    for target in found:
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith(("#", "//")):
            continue  # https:, mailto:, an anchor on the same page
        out.append(target.split("#", 1)[0].split("?", 1)[0])
    return [t for t in out if t]


def _expand_braces(path: str) -> list[str]:
    """`results/bench.{json,md}` -> both names (as a shell would)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def named_path_exists(base: Path, path: str) -> bool:
    """A path the text names exists: a glob matches something, a file or folder is there, or (an
    output prefix such as `--out results/retrieval_hybrid`) files named after it are."""
    for p in _expand_braces(path):
        if any(c in p for c in "*?["):
            if not any(base.glob(p)):
                return False
        elif not (base / p).exists() and not any(base.glob(p + ".*")):
            return False
    return True


@pytest.mark.parametrize("md", DOCS, ids=_ids(DOCS))
def test_every_relative_link_points_at_a_file(md):
    text = md.read_text(encoding="utf-8")
    broken = [t for t in relative_links(text) if not (md.parent / t).exists()]
    assert not broken, f"{md.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("md", DOCS, ids=_ids(DOCS))
def test_every_repository_path_the_text_names_exists(md):
    text = md.read_text(encoding="utf-8")
    missing = []
    for path in REPO_PATH.findall(text):
        base = md.parent if path.startswith("..") else ROOT  # prose names paths from the repository root
        if not named_path_exists(base, path.rstrip(".,")):
            missing.append(path)
    assert not missing, f"{md.relative_to(ROOT)} names files that do not exist: {sorted(set(missing))}"


def test_the_checks_find_broken_links_and_missing_paths(tmp_path):
    """The checks themselves, on a made-up page: what counts as a link, and what is missing."""
    text = ('[a](docs/recipes.md) [b](docs/recipes.md#budget) ![p](<results/nope.png> "plot") [w](https://x.y/z) '
            '[c](#anchor)\n[ref]: ../nowhere.md\n<img src="img/x.png">')
    assert relative_links(text) == ["docs/recipes.md", "docs/recipes.md", "results/nope.png", "../nowhere.md",
                                    "img/x.png"]
    assert named_path_exists(ROOT, "recipes/*.yaml") and not named_path_exists(ROOT, "recipes/*.toml")
    assert named_path_exists(ROOT, "results/bench_decode.{json,md}")
    assert not named_path_exists(ROOT, "results/bench_decode.{json,nope}")
    assert named_path_exists(ROOT, "results/bench_decode")  # an output prefix: bench_decode.md is there
    assert not named_path_exists(ROOT, "scripts/no_such_script.py")
    assert REPO_PATH.findall("run `python scripts/demo.sh` and see ../results/x.md.") == ["scripts/demo.sh",
                                                                                          "../results/x.md"]


# ----------------------------------------------------------------------------- commands the text shows
TEXTS = DOCS + sorted((ROOT / "msrnn_train").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def _command_lines(text: str, command: str) -> list[str]:
    """Each command line that starts with `command`, backslash continuations joined."""
    lines = text.replace("\\\\\n", "\\\n").split("\n")
    out = []
    for i, line in enumerate(lines):
        at = line.find(command)
        if at < 0:
            continue
        cmd = line[at:]
        while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd.rstrip()[:-1] + " " + lines[i]
        out.append(cmd)
    return out


def test_every_evaluate_flag_the_text_shows_exists():
    """`python -m msrnn_train.evaluate --flag` in the docs and docstrings names a flag of eval_cli."""
    from msrnn_train.eval_cli import build_parser

    known = set(build_parser()._option_string_actions)
    bad = []
    for path in TEXTS:
        for cmd in _command_lines(path.read_text(encoding="utf-8"), "python -m msrnn_train.evaluate"):
            cmd = cmd.split("`")[0].split("#")[0]
            bad += [f"{path.relative_to(ROOT)}: {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", cmd)
                    if flag not in known]
    assert not bad, f"flags python -m msrnn_train.evaluate does not have: {bad}"


def test_every_headline_arm_the_text_shows_exists():
    """`scripts/headline.py --arms a,b` in its docstring, the docs and the results names real arms."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("headline", ROOT / "scripts" / "headline.py")
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    bad = []
    for path in [*TEXTS, *sorted((ROOT / "results").glob("*.md"))]:
        for cmd in _command_lines(path.read_text(encoding="utf-8"), "scripts/headline.py"):
            for arms in re.findall(r"--arms[ =]([\w,-]+)", cmd):
                for arm in arms.split(","):
                    try:
                        headline.arm_overrides(arm, [16, 32, 64])
                    except SystemExit as err:
                        bad.append(f"{path.relative_to(ROOT)}: {err}")
    assert not bad, bad
