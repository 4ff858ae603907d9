"""The import-linter contracts in pyproject.toml hold the code's shape, and they bite.

Each case copies the packages into a scratch directory, adds one import that
bends the shape, and runs ``lint-imports`` there: the contract that forbids it
must fail, naming the import. The unmodified copy passes, so a broken contract
cannot hide behind one that always fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("app", "election", "workers", "tests")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_as_committed_keeps_every_contract(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "shown"),
    [
        (
            "election/promoter.py",
            "import workers.worker",
            "The scheduler (election) and the worker (workers) never import each other",
            "election.promoter -> workers.worker",
        ),
        (
            "workers/handlers.py",
            "import election.gate",
            "The scheduler (election) and the worker (workers) never import each other",
            "workers.handlers -> election.gate",
        ),
        (
            "app/store/codec.py",
            "import starlette.responses",
            "Storage knows no HTTP, ZooKeeper or operator tooling",
            "app.store.codec -> starlette",
        ),
        (
            "app/store/keys.py",
            "import app.http.wire",
            "Layers: the composition root",
            "app.store.keys -> app.http.wire",
        ),
        (
            "app/settings.py",
            "import app.store.keys",
            "Layers: the composition root",
            "app.settings -> app.store.keys",
        ),
        (
            "workers/worker.py",
            "import app.http.batcher",
            "Layers: the composition root",
            "workers.worker -> app.http.batcher",
        ),
        (
            "app/ops/stack.py",
            "import tests.aio",
            "The product never imports the tests' tooling",
            "app.ops.stack -> tests.aio",
        ),
    ],
)
def test_an_import_against_the_shape_fails_the_lint(
    tree: Path, module: str, line: str, contract: str, shown: str
) -> None:
    path = tree / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")
    result = lint(tree)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken
    assert shown in broken
