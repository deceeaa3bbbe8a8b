"""The benchmark scripts stay in step with the package: every name they import from cliprail
exists (they need the peers installed to run, so the suite cannot run them; a refactor broke
one's import once, found only when the benchmark was rerun)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_every_cliprail_name_a_benchmark_imports_exists(script):
    tree = ast.parse(script.read_text())
    names = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cliprail")
        for alias in node.names
    ]
    missing = [f"{mod}.{name}" for mod, name in names
               if not hasattr(importlib.import_module(mod), name)]  # fmt: skip
    assert not missing, missing
