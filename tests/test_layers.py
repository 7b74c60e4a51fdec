"""The library's shape: imports run one way (import-linter's layers contract), the core loads no CLI
packages, and no relative import hides inside a function to dodge a cycle."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "minigpt"


def test_layers_contract_is_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_the_core_loads_no_cli_packages() -> None:
    code = ("import sys, minigpt.model, minigpt.checkpoint, minigpt.evaluate, minigpt.generate; "
            "assert 'typer' not in sys.modules and 'click' not in sys.modules, sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_relative_import_inside_a_function() -> None:
    hidden = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("minigpt")):
                        hidden.append(f"{path.name}:{inner.lineno}")
    assert not hidden, hidden


def test_utils_replaces_common() -> None:
    assert (PACKAGE / "utils.py").exists() and not (PACKAGE / "common.py").exists()
