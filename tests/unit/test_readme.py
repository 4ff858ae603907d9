"""The README is the operator's manual: its settings table must match the code."""

from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_setting_with_its_default() -> None:
    text = README.read_text(encoding="utf-8")
    for variable, default, doc in Settings.documentation():
        assert f"| `{variable}` | `{default}` | {doc} |" in text, variable


def test_readme_names_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make run" in text
    assert "make test" in text
