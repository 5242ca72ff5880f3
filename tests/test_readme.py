"""The README's commands are the ones CI runs."""

from pathlib import Path

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
