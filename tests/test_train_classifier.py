"""`training/train_classifier.py`: train.py's flag names, and bad input refused in one line before any work."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_mnist.errors import UsageError

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_classifier.py"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_epochs", "0"], "--num_epochs, --train_batch_size and --learning_rate must be positive"),
        (["--train_batch_size", "-1"], "--num_epochs, --train_batch_size and --learning_rate must be positive"),
        (["--output_dir", __file__], "is a file; pass a folder"),
    ],
)
def test_bad_input_is_refused_before_loading_any_data(argv, message):
    script = runpy.run_path(str(SCRIPT))
    with pytest.raises(UsageError, match=message):
        script["main"](script["parse_args"]([*argv, "--dataset_name", "./no/such/mnist"]))


def test_the_command_line_exits_2_with_one_line():
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "--num_epochs", "0"], capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        "train_classifier.py: error: --num_epochs, --train_batch_size and --learning_rate must be positive."
    ]
