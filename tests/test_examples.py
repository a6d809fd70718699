"""Each script in examples/ runs, from an empty directory, and prints what its docstring
says under "Output:"."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .support import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def expected_output(script: Path) -> str:
    doc = ast.get_docstring(ast.parse(script.read_text()), clean=False) or ""
    assert "\nOutput:\n" in doc, f"{script.name}: its docstring ends with an Output: section"
    return textwrap.dedent(doc.split("\nOutput:\n", 1)[1]).strip() + "\n"


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.kvm
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_prints_what_it_promises(script: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_output(script)
