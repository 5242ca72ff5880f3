"""The README's commands are the ones CI runs."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The shell commands of the README's opening code block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    tests_command = readme_commands()[0]
    assert "pytest" in tests_command
    assert tests_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_training_command_launches_the_training_script():
    assert "accelerate launch training/train.py" in readme_commands()[1]


def test_the_quickstart_runs_as_pasted_and_writes_its_grid(tmp_path):
    """The first Python block of the README, run in a fresh interpreter from a folder beside `pretrained/`."""
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "pretrained").symlink_to(ROOT / "pretrained")
    subprocess.run([sys.executable, "-c", quickstart], cwd=tmp_path, check=True, timeout=300)
    assert Image.open(tmp_path / "grid.png").size == (4 * 28, 4 * 28)
