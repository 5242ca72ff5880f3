"""The fault campaign (`benchmarks/fault_campaign.py`) in its short form: one SIGKILL of each kind, one during a
checkpoint write and one inside a step.

The full campaign (the figures of benchmarks/README.md, "Faults") is `python benchmarks/fault_campaign.py --kills 20
--checkpoint_kills 4 --max_train_steps 40 --seed 1`.
"""

import json
import subprocess
import sys
from pathlib import Path

CAMPAIGN = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_campaign.py"


def test_killed_and_resumed_training_ends_bitwise_equal_and_never_sees_half_a_checkpoint(tmp_path, mnist_folder):
    # The first kill lands while checkpoint-3 is being written; the second (seed 0 draws step 4 of the window 1-4)
    # 0.08 s after the bar shows step 4, inside a step after checkpoint-3, so the last run resumes from that checkpoint.
    command = [
        sys.executable, str(CAMPAIGN), "--kills=2", "--checkpoint_kills=1", "--max_train_steps=10",
        "--checkpointing_steps=3", f"--dataset_name={mnist_folder}", f"--output_dir={tmp_path}",
    ]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, timeout=900)
    figures = json.loads(process.stdout.strip().splitlines()[-1])
    assert figures["kills"] == 2 and figures["kills_during_checkpoint_write"] == 1
    assert figures["damaged_checkpoints"] == [], "a checkpoint-N folder was left half-written"
    assert figures["training_weight_bytes_that_differ"] == 0 and figures["ema_weight_bytes_that_differ"] == 0
    assert figures["ema_files_identical"] and process.returncode == 0, process.stderr
    # The killed run reached the end of its budget.
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-10").is_dir()
