"""`training/release.py` on a tiny finished run: the release folder, its pictures, its card, and its refusals."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.errors import UsageError
from tests.test_train import train

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "training" / "release.py"


@pytest.fixture(scope="module")
def release_module() -> dict:
    return runpy.run_path(str(RELEASE))


@pytest.fixture(scope="module")
def finished_run(mnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step tiny run with T = 10, so that 1000-step-DDPM stands in as 10-step DDPM."""
    process, output_dir, _ = train(
        tmp_path_factory.mktemp("run"), mnist_folder, "run", "--max_train_steps=3", "--ddpm_num_steps=10"
    )
    assert process.returncode == 0, process.stderr
    return output_dir


def release(module: dict, run: Path, out: Path, data: Path, *flags: str) -> None:
    module["main"](
        module["parse_args"](
            [str(run), f"--output_dir={out}", "--hub_model_id=tester/released", f"--dataset_name={data}",
             "--num_samples=64", "--ddpm_samples=64", "--reference_images=32", "--nll_images=8", "--batch_size=64",
             "--num_inference_steps=5", "--device=cpu", *flags]
        )
    )  # fmt: skip


def test_the_release_folder_is_the_pushed_layout_with_pictures_and_results(
    release_module, finished_run, mnist_folder, tmp_path, capsys
):
    out = tmp_path / "release"
    release(release_module, finished_run, out, mnist_folder, "--note=Trained for a test.")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "model_index.json", "pipeline_ddpm_mnist.py",
        "samples/denoising.png", "samples/grid.png", "samples/loss.png",
        "scheduler/scheduler_config.json", "scheduler/scheduling_ddpm_mnist.py",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/unet_ddpm_mnist.py",
    ])  # fmt: skip
    assert Image.open(out / "samples" / "grid.png").size == (8 * 28 * 3, 8 * 28 * 3)
    assert Image.open(out / "samples" / "denoising.png").size == (11 * 28 * 3, 28 * 3)
    card = (out / "README.md").read_text()
    assert "](samples/grid.png)" in card and "](samples/denoising.png)" in card and "](samples/loss.png)" in card
    assert "| metric | DDIM, 5 steps (N=64) | real floor (N=64) | DDPM, 10 steps (N=64) | real floor (N=64) |" in card
    assert "**Quality bar**" in card and "Trained for a test." in card and "| optimizer steps | 3 |" in card
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    quality = result["results"]["DDIM, 5 steps"]["quality"]
    assert f"{quality['mean_confidence']:.4f}" in card and result["nll"]["exact"] is True
    # The release holds the run's weights: the same digits for the same seed.
    released, trained = DDPMMnistPipeline.from_pretrained(out), DDPMMnistPipeline.from_pretrained(finished_run)
    draws = [
        p(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
        for p in (released, trained)
    ]
    torch.testing.assert_close(*draws, rtol=0, atol=0)


def test_an_existing_release_or_an_unfinished_run_is_refused_before_any_work(
    release_module, finished_run, mnist_folder, tmp_path
):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="exists; pass a new folder"):
        release(release_module, finished_run, tmp_path / "taken", mnist_folder)
    with pytest.raises(UsageError, match="model_index.json is missing; pass the output_dir of a finished"):
        release(release_module, tmp_path, tmp_path / "new", mnist_folder)
    assert not (tmp_path / "new").exists()
