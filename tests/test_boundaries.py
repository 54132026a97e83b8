"""surgery/ and sessions/ stay usable with no UI installed: checked by importing them in a clean interpreter and
by the import-linter contract in pyproject.toml."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sessions
import surgery

ROOT = Path(__file__).parents[1]
UI_MODULES = ("textual", "typer", "plotext", "workbench", "themes", "click", "rich")


def headless_modules() -> list[str]:
    names = ["surgery", "sessions"]
    names += [m.name for m in pkgutil.walk_packages(surgery.__path__, prefix="surgery.")]
    names += [m.name for m in pkgutil.walk_packages(sessions.__path__, prefix="sessions.")]
    return names


@pytest.mark.parametrize("module", headless_modules())
def test_headless_module_imports_no_ui(module):
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {UI_MODULES!r}); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{module} pulled in UI modules: {result.stdout.strip()} {result.stderr[-500:]}"


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed (it is a dev dependency: pip install -e '.[dev]')")
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in result.stdout


def test_inspect_does_not_import_torch():
    """`workbench inspect` must answer in well under a second: torch alone takes longer to import."""
    code = "import sys, surgery; surgery.inspect; import surgery.inspect; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-500:]
