"""The code base stays ruff-clean and mypy-strict-clean (the public API is typed: py.typed), and
every example in its docstrings runs."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import shutil
import subprocess
import sys

import pytest

import ddpseed
from helpers.procs import REPO


def test_ruff_clean() -> None:
    if shutil.which("ruff") is None:
        pytest.fail("ruff is part of the test extras: pip install -e '.[test]'")
    proc = subprocess.run(
        ["ruff", "check", "ddpseed", "benchmarks", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]


def test_mypy_strict_clean() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-5000:]


def test_package_ships_py_typed() -> None:
    assert (REPO / "ddpseed" / "py.typed").exists()


def _modules_with_examples() -> list[str]:
    """Every module of the package, subpackages included, whose docstrings hold an example."""
    found = []
    for m in pkgutil.walk_packages(ddpseed.__path__, "ddpseed."):
        path = REPO.joinpath(*m.name.split("."))
        source = path / "__init__.py" if m.ispkg else path.with_suffix(".py")
        if m.name != "ddpseed.__main__" and ">>>" in source.read_text():
            found.append(m.name)
    return sorted(found)


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0, result


def test_readme_layout_names_every_module_and_top_level_folder() -> None:
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    modules = {p.stem for p in (REPO / "ddpseed").glob("*.py")} - {"__init__", "__main__"}
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    folders = {path.split("/")[0] for path in tracked if "/" in path}
    missing = {m for m in modules if f"`{m}`" not in layout}
    missing |= {f for f in folders if f"`{f}/`" not in layout}
    assert not missing, f"README's Layout does not name {sorted(missing)}"
