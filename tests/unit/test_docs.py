"""README.md and docs/*.md stay true to the code, wherever a test can tell.

Pure file reads, no servers. The README stays a front page that names the two
commands; the settings table on docs/settings.md is the one
``scripts/settings_table.py`` renders from ``app.settings``; every ``EAT_*`` name
on any page is a setting.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from tests.known import EAT_NAME, assert_known_settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SETTINGS_SCRIPT = ROOT / "scripts" / "settings_table.py"


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# The front page


def test_readme_names_the_two_commands() -> None:
    text = read(README)
    assert "make run" in text
    assert "make test" in text


def test_readme_stays_a_front_page() -> None:
    lines = len(read(README).splitlines())
    assert lines < 150, f"README.md has {lines} lines: move reference material to docs/"


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
