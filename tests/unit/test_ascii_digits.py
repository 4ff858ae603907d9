"""Numbers from outside are read in ASCII digits only, everywhere.

``\\d`` in a Python regex, ``str.isdigit()``, ``isnumeric()`` and ``isdecimal()``
accept the digits of every script (Arabic-Indic, fullwidth, mathematical, superscript),
and ``int()`` reads most of them: a cursor of two Arabic-Indic ones passed the API's
check and Redis refused it (a 503 and an error in the log). The code spells digits
``[0-9]`` (or checks ``isascii()`` first); this keeps it so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = ("app", "election", "workers", "bench", "scripts", "tests")
LOOSE = re.compile(r"\\d|\.isdigit\(|\.isnumeric\(|\.isdecimal\(")
# ``s.isascii() and s.isdigit()`` is exact (an ASCII digit is 0-9) and faster than a regex.
GUARDED = re.compile(r"\.isascii\(\) and [\w.]+\.isdigit\(\)")
THIS = Path(__file__).resolve()


def sources() -> list[Path]:
    files = [p for tree in TREES for p in (ROOT / tree).rglob("*.py")]
    files += [p for p in (ROOT / "scripts").iterdir() if p.is_file() and not p.suffix]
    return sorted(p for p in files if p.resolve() != THIS)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_digits_are_matched_as_ascii_only(path: Path) -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if LOOSE.search(GUARDED.sub("", line.split("#", 1)[0]))  # comments may name it
    ]
    assert not hits, "use [0-9] (or a [0-9] regex), not \\d or str.isdigit():\n" + "\n".join(hits)
