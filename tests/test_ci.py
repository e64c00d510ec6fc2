"""CI runs exactly the test command the README tells users to run."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.rstrip().endswith("pytest -q")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_test_command_is_what_ci_runs():
    command = readme_test_command()
    assert "pip install" in command and "-c constraints.txt" in command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines
