"""README.md and docs/*.md stay true to the code, wherever a test can tell.

Pure file reads, no servers. The README stays a front page that names the two
commands and links every docs page, as the index does; the settings table on
docs/settings.md is the one ``scripts/settings_table.py`` renders from
``app.settings``; every ``EAT_*`` name on any page is a setting; every relative
link reaches a file, and its anchor a heading there; the metrics table names
exactly the metrics ``app.metrics`` registers, with their types and labels;
every ``echo-at-time`` command shown names real subcommands and flags, and
those in shell blocks parse.
"""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from app import metrics
from tests.known import EAT_NAME, assert_known_command, assert_known_flags, assert_known_settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SETTINGS_SCRIPT = ROOT / "scripts" / "settings_table.py"

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
COMMAND = re.compile(r"^(?:\S*/)?echo-at-time\s+\S")


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def split_fences(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the lines outside fenced code blocks, [(info string, lines) of each block])."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    block: tuple[str, list[str]] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = (line.strip().strip("`~").strip(), [])
            else:
                blocks.append(block)
                block = None
            prose.append("")
        elif block is not None:
            block[1].append(line)
            prose.append("")
        else:
            prose.append(line)
    assert block is None, "a fenced code block is never closed"
    return prose, blocks


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: link text kept, lower case, punctuation dropped,
    spaces turned into hyphens (github-slugger)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    prose, _blocks = split_fences(read(page))
    seen: dict[str, int] = {}
    result = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_anchor(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(page: Path) -> list[str]:
    prose, _blocks = split_fences(read(page))
    text = CODE_SPAN.sub("", "\n".join(prose))
    return LINK.findall(text)


def code_spans(page: Path) -> list[str]:
    prose, _blocks = split_fences(read(page))
    return [match.group(2).strip() for match in CODE_SPAN.finditer("\n".join(prose))]


# ---------------------------------------------------------------------------
# The front page and the index


def test_readme_names_the_two_commands() -> None:
    text = read(README)
    assert "make run" in text
    assert "make test" in text


def test_readme_stays_a_front_page() -> None:
    lines = len(read(README).splitlines())
    assert lines < 150, f"README.md has {lines} lines: move reference material to docs/"


@pytest.mark.parametrize("index", [README, DOCS / "README.md"], ids=name)
def test_every_docs_page_is_linked_from_the_readme_and_the_index(index: Path) -> None:
    targets = {(index.parent / link.split("#")[0]).resolve() for link in links(index)}
    unlinked = [name(page) for page in PAGES[1:] if page != index and page not in targets]
    assert unlinked == [], f"{name(index)} does not link to {unlinked}"


# ---------------------------------------------------------------------------
# Settings


def test_the_settings_page_holds_the_table_the_code_renders() -> None:
    render = runpy.run_path(str(SETTINGS_SCRIPT))["render"]
    text = read(DOCS / "settings.md")
    assert render(text) == text, (
        "docs/settings.md's settings table differs from app/settings.py: "
        "run `.venv/bin/python scripts/settings_table.py` to rewrite it"
    )


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_eat_name_on_a_page_is_a_setting(page: Path) -> None:
    assert_known_settings(set(EAT_NAME.findall(read(page))), name(page))


# ---------------------------------------------------------------------------
# Links


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Guarantees, in plain words", "guarantees-in-plain-words"),
        ("`up`: the all-in-one local stack", "up-the-all-in-one-local-stack"),
        ("Backlog (B6)", "backlog-b6"),
        ("Chaos suite (`make chaos` runs it alone)", "chaos-suite-make-chaos-runs-it-alone"),
    ],
)
def test_anchors_are_made_as_github_makes_them(heading: str, anchor: str) -> None:
    assert github_anchor(heading) == anchor


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_relative_link_reaches_a_file_and_a_heading(page: Path) -> None:
    broken = []
    for link in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if ROOT not in target.parents and target != ROOT:
            broken.append(f"{link} (outside the repository)")
        elif not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {name(target)})")
    assert broken == [], f"{name(page)}: broken links {broken}"


# ---------------------------------------------------------------------------
# Metrics


def registered_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name (counters with _total) -> (type, label names), from app.metrics."""
    types = {family.name: family.type for family in metrics.REGISTRY.collect()}
    # Label names are not in a collected family until a child exists, so they come from
    # the metric objects: prometheus_client's keep them in _labelnames, ours in labelnames.
    labels: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels[value._name] = tuple(value._labelnames)
        elif isinstance(value, metrics.LoopCounter | metrics.LoopHistogram):
            labels[value.name] = value.labelnames
    assert labels.keys() == types.keys(), "every registered metric is a module-level name"
    return {
        family + ("_total" if kind == "counter" else ""): (kind, labels[family])
        for family, kind in types.items()
    }


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The table under deploy.md's "Metrics and health": name -> (type, label names)."""
    text = read(DOCS / "deploy.md")
    section = text.split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`(eat_[a-z_]+)(?:\{([a-z_,]*)\})?`", cells[0])
        if not names:
            continue
        kinds = [kind.strip() for kind in cells[1].split(",")]
        if len(kinds) == 1:
            kinds *= len(names)
        assert len(kinds) == len(names), f"deploy.md: one type, or one per metric: {line}"
        for (metric, label_text), kind in zip(names, kinds, strict=True):
            assert metric not in documented, f"deploy.md lists {metric} twice"
            documented[metric] = (kind, tuple(filter(None, label_text.split(","))))
    return documented


def test_the_metrics_table_names_exactly_the_registered_metrics() -> None:
    registered = registered_metrics()
    documented = documented_metrics()
    assert sorted(documented.keys() - registered.keys()) == [], "documented, not registered"
    assert sorted(registered.keys() - documented.keys()) == [], "registered, not documented"
    for metric, (kind, labels) in registered.items():
        assert documented[metric] == (kind, labels), metric


# ---------------------------------------------------------------------------
# Commands


def shell_commands(page: Path) -> list[list[str]]:
    """Each `echo-at-time ...` line of the page's shell blocks, as argv after the command."""
    _prose, blocks = split_fences(read(page))
    commands = []
    for info, lines in blocks:
        if info not in ("sh", "bash", "shell", "console"):
            continue
        for line in lines:
            line = line.strip().removeprefix("$ ")
            if COMMAND.match(line):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def synopses(page: Path) -> list[list[str]]:
    """Each inline `echo-at-time ...` code span, split on spaces (may hold [--flag ARG])."""
    return [span.split()[1:] for span in code_spans(page) if COMMAND.match(span)]


def test_the_docs_show_commands_to_check() -> None:
    assert sum(len(shell_commands(page)) for page in PAGES) >= 10
    assert sum(len(synopses(page)) for page in PAGES) >= 5


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_command_in_a_shell_block_parses(page: Path) -> None:
    for argv in shell_commands(page):
        assert_known_command(argv, f"{name(page)}: echo-at-time {shlex.join(argv)}")


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_inline_command_names_real_subcommands_and_flags(page: Path) -> None:
    for argv in synopses(page):
        assert_known_flags(argv, f"{name(page)}: echo-at-time {' '.join(argv)}")
