"""`training/release.py` on a tiny finished run: the release folder, its pictures, its card, and its refusals."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.errors import UsageError
from ddpm_mnist.metrics.quality import SampleQuality
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
             "--num_inference_steps=5", "--nll_timesteps=3", "--device=cpu", *flags]
        )
    )  # fmt: skip


def test_the_release_folder_is_the_pushed_layout_with_pictures_and_results(
    release_module, finished_run, mnist_folder, tmp_path, capsys
):
    out, curve = tmp_path / "release", tmp_path / "curve.png"
    Image.new("RGB", (40, 30), "white").save(curve)
    flags = ["--note=Trained for a test.", f"--time_to_quality_image={curve}", "--dtype=bf16", "--extra_seeds=1"]
    release(release_module, finished_run, out, mnist_folder, *flags)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "model_index.json", "pipeline_ddpm_mnist.py", "samples/denoising.png", "samples/grid.png",
        "samples/loss.png", "samples/nll_terms.png", "samples/time_to_quality.png",
        "scheduler/scheduler_config.json", "scheduler/scheduling_ddpm_mnist.py",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/unet_ddpm_mnist.py",
    ])  # fmt: skip
    assert Image.open(out / "samples" / "grid.png").size == (8 * 28 * 3, 8 * 28 * 3)
    assert Image.open(out / "samples" / "denoising.png").size == (11 * 28 * 3, 28 * 3)
    assert Image.open(out / "samples" / "time_to_quality.png").size == (40, 30)
    card = (out / "README.md").read_text()
    for picture in ("grid", "denoising", "loss", "nll_terms", "time_to_quality"):
        assert f"](samples/{picture}.png)" in card, picture
    # The pipeline's own DDPM on 5 respaced steps is the recommended setting: scored first, and in the card's code.
    assert "| metric | DDPM, 5 steps (N=64) | real floor (N=64) | DDPM, 10 steps (N=64) | real floor (N=64) |" in card
    assert "num_inference_steps=5, generator=generator" in card and "on 5 evenly spaced timesteps of the 10" in card
    assert "**Targets** (at DDPM, 5 steps, N=64):" in card and "Trained for a test." in card
    assert "| optimizer steps | 3 |" in card
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    quality = result["results"]["DDPM, 5 steps"]["quality"]
    assert f"- mean classifier confidence {quality['mean_confidence']:.3f} (target >= 0.95): **" in card
    low, high = min(quality["class_histogram"]), max(quality["class_histogram"])
    assert f"- every digit's share between {low:.1%} and {high:.1%} (target 7% to 13%): **missed by" in card
    assert result["nll"]["exact"] is False and result["nll"]["num_timesteps"] == 3
    # One more seed of the recommended setting: other digits, shown as a range beside the card's seed.
    (spread,) = result["seed_spread"]
    assert spread["num_images"] == 64 and spread["fid"] != quality["fid"]
    low_fid, high_fid = sorted([quality["fid"], spread["fid"]])
    assert (
        f"Seed to seed: 64 samples from each of 2 seeds (the card's and the next 1) give FID {low_fid:.2f} to "
        f"{high_fid:.2f} (" in card
    )
    assert "unbiased estimate from 3 timesteps" in card and "with the U-Net in bf16" in card
    # The release holds the run's weights (fp32, though it sampled in bf16): the same digits for the same seed.
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
    with pytest.raises(UsageError, match=r"--num_samples must be at least 64 \(the card's 8x8 grid\), got 32"):
        release(release_module, finished_run, tmp_path / "new", mnist_folder, "--num_samples=32")
    with pytest.raises(UsageError, match=r"--extra_seeds must be 0 \(no spread\) or more, got -1"):
        release(release_module, finished_run, tmp_path / "new", mnist_folder, "--extra_seeds=-1")
    assert not (tmp_path / "new").exists()


def test_the_seed_spread_gives_ranges_and_counts_the_seeds_that_meet_every_target(release_module):
    def quality(confidence: float, rarest: float, fid: float) -> SampleQuality:
        shares = [rarest] + [(1 - rarest) / 9] * 9
        return SampleQuality(fid, 0.0, 0.0, 0.9, 0.9, confidence, 3.3, rarest, shares, 1000)

    floor = quality(0.98, 0.1, 20.0)
    # Seed 0 meets every target (1.95x); the next two miss the FID (2.5x) and the shares (6%).
    line = release_module["seed_spread_line"](
        quality(0.96, 0.08, 39.0), [quality(0.97, 0.09, 50.0), quality(0.955, 0.06, 30.0)], floor
    )
    assert line == (
        "Seed to seed: 1000 samples from each of 3 seeds (the card's and the next 2) give FID 30.00 to 50.00 "
        "(1.50 to 2.50x the floor, mean 1.98x), mean confidence 0.955 to 0.970 and a rarest digit at 6.0% to 9.0%; "
        "every target is met at 1 of these 3 seeds. The verdicts above are the card's seed alone, and every ratio uses "
        "the one floor above (itself one draw of real digits)."
    )
