"""The README's commands are the ones CI runs, they parse with the parsers of the tools they call, and its code runs."""

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser
from PIL import Image

from ddpm_mnist.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = "training/recipes/cpu-demo.json"
# The tools a README command may call, each with the function that parses its arguments.
TOOLS = {
    "training/train.py": "parse_args",
    "training/distill.py": "parse_args",
    "benchmarks/fault_campaign.py": "parse_args",
    "benchmarks/distillation.py": "parse_args",
}
COMMAND_STARTS = ("ddpm-mnist ", "accelerate launch ", "python training/", "python benchmarks/")


def readme_commands() -> list[str]:
    """The shell commands of the README's opening code block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    tests_command = readme_commands()[0]
    assert "pytest" in tests_command
    assert tests_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_trains_the_cpu_demo_recipe():
    assert readme_commands()[1].endswith(f"python training/train.py --config {DEMO_RECIPE}")


def test_the_cpu_demo_recipe_passes_the_training_scripts_checks_and_fits_in_15_minutes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its U-Net config relative to the repository root, as the README runs it
    train = runpy.run_path(str(ROOT / "training" / "train.py"))
    args = train["parse_args"](["--config", DEMO_RECIPE, "--output_dir", str(tmp_path / "demo")])
    train["check_args"](args)
    assert args.max_train_minutes <= 14 and args.max_train_steps is None and args.num_epochs is None
    assert args.dataset_name == "ylecun/mnist" and args.model_config_name_or_path is not None


def code_block(section: str, language: str) -> str:
    """The first `language` code block after the README heading `## section`."""
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {section}\n", 1)[1].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def run_beside_pretrained(code: str, folder: Path) -> str:
    """Run `code` in a fresh interpreter from a folder holding a link to `pretrained/`; its standard output."""
    (folder / "pretrained").symlink_to(ROOT / "pretrained")
    # One thread: on a busy machine, OpenMP threads that wait for each other can make sampling many times slower.
    env = {**os.environ, "HF_HOME": str(folder / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=folder, env=env, check=True, timeout=300, capture_output=True, text=True
    ).stdout


def test_the_sample_code_runs_as_pasted_and_writes_its_grid(tmp_path):
    run_beside_pretrained(code_block("Sample", "python"), tmp_path)
    assert Image.open(tmp_path / "grid.png").size == (4 * 28, 4 * 28)


def test_the_code_that_loads_without_the_package_runs_as_pasted(tmp_path):
    code = code_block("Load without the package", "python")
    assert "ddpm_mnist" not in code
    check = "\nimport sys\nprint(len(images), images[0].size, type(pipe.unet).__module__, 'ddpm_mnist' in sys.modules)"
    printed = run_beside_pretrained(code + check, tmp_path).split()
    assert printed == ["16", "(28,", "28)", "diffusers_modules.local.unet_ddpm_mnist", "False"]  # the folder's code


def test_the_conditional_code_runs_as_pasted(tmp_path):
    code = code_block("Ask for a digit, complete one, interpolate", "python")
    check = "\nprint(len(sevens), completed[0].size, len(row))"
    printed = run_beside_pretrained(code + check, tmp_path).split()
    assert printed == ["8", "(28,", "28)", "11"]  # one digit per lambda in 0, 0.1, ..., 1


def test_the_student_code_runs_as_pasted(tmp_path):
    code = code_block("Four steps: the distilled student", "python")
    check = "\nprint(len(images), images[0].size, type(pipe.scheduler).__name__)"
    printed = run_beside_pretrained(code + check, tmp_path).split()
    assert printed == ["16", "(28,", "28)", "DDIMScheduler"]


def tool_commands() -> list[str]:
    """Every command of the README and of the docs/ it links to that calls one of the project's tools: code-block
    lines and inline code."""
    text = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = [part.strip() for line in lines for part in line.split("&&")]
    return list(dict.fromkeys(command for command in commands if command.startswith(COMMAND_STARTS)))


def test_the_readme_calls_each_kind_of_tool():
    starts = {command.split()[0] + " " + command.split()[1] for command in tool_commands()}
    assert starts >= {"ddpm-mnist evaluate", "ddpm-mnist nll", "accelerate launch", "python training/train.py"}


def parse(command: str) -> None:
    """Parse `command`'s arguments with the parser of the tool it calls (and accelerate's, for `accelerate launch`)."""
    words = shlex.split(command)
    if words[0] == "ddpm-mnist":
        build_parser().parse_args(words[1:])
        return
    if words[0] == "accelerate":
        launch = launch_command_parser().parse_args(words[2:])
        words = [launch.training_script, *launch.training_script_args]
    else:
        words = words[1:]
    script, argv = words[0], words[1:]
    assert script in TOOLS, f"{command}: no parser known for {script}"
    runpy.run_path(str(ROOT / script))[TOOLS[script]](argv)


@pytest.mark.parametrize("command", tool_commands())
def test_each_readme_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        parse(command)
    except SystemExit as exit:  # argparse's way out: 0 after --help, 2 for arguments it refuses
        assert exit.code == 0, f"{command}: its tool refuses these arguments"
