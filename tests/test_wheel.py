"""A wheel is a complete install: built, installed outside the checkout, it renders a card, pushes and runs its CLI."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run from the wheel's install: a tiny pipeline pushed to the Hub stand-in with its card (the template is package data).
PUSH = """
import os, sys
from pathlib import Path
import ddpm_mnist, ddpm_mnist.model_card
from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet

site = Path(sys.argv[1]).resolve()
assert Path(ddpm_mnist.__file__).resolve().is_relative_to(site), ddpm_mnist.__file__
template = Path(ddpm_mnist.model_card.CARD_TEMPLATE)
assert template.is_relative_to(site) and template.is_file() and not template.is_symlink(), template
pipe = DDPMMnistPipeline(DDPMMnistUNet.from_preset("tiny"), DDPMMnistScheduler(num_train_timesteps=10))
card = ddpm_mnist.model_card.render_model_card(pipe, "tester/from-wheel")
assert 'DDPMMnistPipeline.from_pretrained("tester/from-wheel")' in card.text
print(pipe.push_to_hub("from-wheel"))
"""


def test_a_wheel_installed_outside_the_checkout_renders_pushes_and_runs_its_cli(tmp_path, hub):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True)
    (wheel,) = wheels.glob("ddpm_mnist-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    # The dependencies come from this environment; the package only from the wheel's install (PYTHONPATH comes first).
    env = {**hub.client_env(tmp_path / "hf"), "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    away = tmp_path / "elsewhere"
    away.mkdir()
    pushed = subprocess.run(
        [sys.executable, "-c", PUSH, str(site)], env=env, cwd=away, capture_output=True, text=True, timeout=300
    )
    assert pushed.returncode == 0, pushed.stderr
    files = hub.files("tester/from-wheel")
    assert "library_name: diffusers" in files["README.md"].decode() and "unet/unet_ddpm_mnist.py" in files
    cli = subprocess.run(
        [str(site / "bin" / "ddpm-mnist"), "--help"], env=env, cwd=away, capture_output=True, text=True, timeout=300
    )
    assert cli.returncode == 0 and "sample" in cli.stdout and "evaluate" in cli.stdout, cli.stderr
