"""Every code block of the README and of the documentation runs, in an empty directory,
as a reader would run it, block after block.

- ```python blocks run in one namespace per page, in order, except those whose first
  line is `# file: NAME`, which are written to NAME (a script the page then runs);
- ```c blocks whose first line is `/* file: NAME */` are written to NAME;
- ```sh lines that start with `python -m kvmpy` or `python NAME.py` run (with this
  interpreter); a trailing `# exit status N` says the status they must end with (default
  0). Other ```sh blocks (installing kvmpy, building wheels) are what CI itself runs
  (.ci/run).
- blocks in other languages (```text) are output shown to the reader.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .support import ROOT

PAGES = [
    page
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    if "```" in page.read_text()
]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, code, line number) of each fenced block of `page`."""
    text = page.read_text()
    return [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in BLOCK.finditer(text)
    ]


def run_kvmpy_line(line: str, cwd: Path, where: str) -> None:
    command, _, comment = line.partition("#")
    status = re.search(r"exit status (\d+)", comment)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "kvmpy"] or argv[1].endswith(".py"), where
    done = subprocess.run(
        [sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    expected = int(status.group(1)) if status else 0
    assert done.returncode == expected, f"{where}: {line}\n{done.stdout}{done.stderr}"


def run_page(page: Path, cwd: Path) -> int:
    """Runs the blocks of `page` in `cwd`; returns how many ran."""
    namespace: dict[str, object] = {"__name__": "doc_example"}
    ran = 0
    for lang, code, line in blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        script = re.match(r"# file: (\S+)\n", code)
        if lang == "python" and script:
            (cwd / script.group(1)).write_text(code)
        elif lang == "python":
            exec(compile(code, where, "exec"), namespace)
        elif lang == "c":
            name = re.match(r"/\* file: (\S+) \*/\n", code)
            assert name, f"{where}: a C block starts with /* file: NAME */"
            (cwd / name.group(1)).write_text(code)
        elif lang == "sh":
            lines = [
                ln
                for ln in code.splitlines()
                if ln.startswith("python -m kvmpy") or re.match(r"python \S+\.py\b", ln)
            ]
            for ln in lines:
                run_kvmpy_line(ln, cwd, where)
            if not lines:
                continue
        else:
            assert lang == "text", f"{where}: a block without a language"
            continue
        ran += 1
    return ran


@pytest.mark.kvm
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_code_block_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty directory: nothing from the repository
    assert run_page(page, tmp_path) >= 1


def test_the_readme_has_its_examples_and_exactly_two_commands() -> None:
    readme = blocks(ROOT / "README.md")
    assert sum(lang == "python" for lang, _, _ in readme) >= 5
    text = (ROOT / "README.md").read_text()
    two = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = [code for lang, code, _ in blocks_of(two) if lang == "sh"]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/python -m kvmpy demo\n",
        "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest\n",
    ]


def blocks_of(text: str) -> list[tuple[str, str, int]]:
    return [(m.group(1), m.group(2), 0) for m in BLOCK.finditer(text)]
