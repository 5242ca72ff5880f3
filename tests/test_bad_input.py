"""Bad input on the loading side: a damaged or foreign pipeline folder is one line from `ddpm-mnist`, exit status 2.

(The training script's bad input is in tests/test_train.py.)
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import assert_usage_error

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "pretrained" / "ddpm-mnist-small"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
CLI = str(Path(sys.executable).parent / "ddpm-mnist")  # the console script of this environment


def truncate_weights(folder: Path) -> None:
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def unknown_unet_class(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = [index["unet"][0], "NoSuchUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))


def missing_weights(folder: Path) -> None:
    (folder / WEIGHTS).unlink()


DAMAGE = {
    "truncated safetensors": (truncate_weights, "diffusion_pytorch_model.safetensors"),
    "unknown class in model_index.json": (unknown_unet_class, "NoSuchUNet"),
    "missing weights": (missing_weights, "diffusion_pytorch_model.safetensors"),
}


@pytest.mark.parametrize("damage, named", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_pipeline_folder_is_one_line_naming_the_problem(tmp_path, damage, named):
    folder = shutil.copytree(RELEASE, tmp_path / "pipeline")
    damage(folder)
    command = [CLI, "sample", str(folder), "--num_samples=1"]
    command += ["--num_inference_steps=2", f"--output_dir={tmp_path / 'out'}"]
    assert_usage_error(command, "ddpm-mnist sample", named)
    assert not (tmp_path / "out").exists()


def test_more_sampling_steps_than_training_steps_is_refused(tmp_path):
    command = [CLI, "sample", str(RELEASE), "--num_inference_steps=1001"]
    process = subprocess.run(command + [f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert "1001" in process.stderr.strip().splitlines()[-1] and "1000" in process.stderr.strip().splitlines()[-1]
