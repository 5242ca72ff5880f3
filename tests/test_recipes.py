"""Every file in training/recipes is usable as it stands: U-Net configs build, run configs name real flags."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_mnist import DDPMMnistUNet

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "training" / "recipes").glob("*.json"))
UNET_CONFIGS = [p for p in RECIPES if "_class_name" in json.loads(p.read_text())]
RUN_CONFIGS = [p for p in RECIPES if p not in UNET_CONFIGS]


@pytest.mark.parametrize("path", UNET_CONFIGS, ids=lambda p: p.stem)
def test_unet_config_builds_and_denoises_a_digit_shaped_batch(path):
    unet = DDPMMnistUNet.from_config(DDPMMnistUNet.load_config(path))
    x_t = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        eps = unet(x_t, torch.tensor([10, 900])).sample
    assert eps.shape == x_t.shape


@pytest.fixture(scope="module")
def script_flags() -> dict[str, set[str]]:
    """The flags of each training script, from its --help."""
    flags = {}
    for script in ("train.py", "distill.py"):
        help_text = subprocess.run(
            [sys.executable, f"training/{script}", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        flags[script] = set(re.findall(r"--([a-z0-9_]+)", help_text))
    return flags


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_run_config_uses_its_scripts_flags_and_existing_unet_configs(path, script_flags):
    config = json.loads(path.read_text())
    script = "distill.py" if "pretrained_teacher_model" in config else "train.py"  # a distillation names its teacher
    assert set(config) <= script_flags[script], set(config) - script_flags[script]
    if "model_config_name_or_path" in config:
        assert (ROOT / config["model_config_name_or_path"]) in UNET_CONFIGS
    assert config["output_dir"].startswith("runs/")  # an ignored folder


def test_round2_script_parses_and_runs_every_round2_arm_and_only_those():
    script_path = ROOT / "training" / "recipes" / "round2.sh"
    subprocess.run(["bash", "-n", script_path], check=True)
    script = script_path.read_text()
    default_arms = re.search(r"arms=\((r2-[^)]*)\)", script).group(1).split()
    assert sorted(default_arms) == sorted(p.stem for p in RUN_CONFIGS if p.stem.startswith("r2-"))
    for arm in default_arms:
        assert json.loads((ROOT / "training" / "recipes" / f"{arm}.json").read_text())["output_dir"] == (
            f"runs/round2/seed0/{arm}"
        )
