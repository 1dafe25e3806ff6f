"""README.md tells the truth: its Python examples run, and CI runs its test command verbatim."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def _quick_start_commands():
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_examples():
    assert _python_blocks()


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_python_examples_run(index):
    exec(compile(_python_blocks()[index], f"README.md block {index}", "exec"), {})


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python -m nbgn")
    assert "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_demo_command_runs():
    """The first quick-start command's job, on a small tensor."""
    result = subprocess.run(
        [sys.executable, "-m", "nbgn", "--shape", "4", "16", "16", "16", "--repeat", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "Standard Deviation" in result.stdout
    assert "nbgn in place" in result.stdout
    assert "numpy baseline" in result.stdout
