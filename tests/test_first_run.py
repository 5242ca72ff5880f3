"""Tests for benchmarks/first_run.py and the blob count it reports, in-process on a tiny run folder."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.errors import UsageError
from ddpm_mnist.hub import save_training_run
from ddpm_mnist.image_utils import SAMPLE_GRID_UPSCALE, digit_grid
from ddpm_mnist.metrics.quality import blob_mask
from tests.utils import tiny_unet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "first_run.py"


def digits_with_background(background: list[float]) -> torch.Tensor:
    """One stroke per digit (a bright bar in the middle) on a flat background of each given level."""
    images = torch.tensor(background).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).clone()
    images[:, :, 6:22, 12:16] = 1.0
    return images


def test_a_grey_background_is_a_blob_and_a_black_one_is_not():
    images = digits_with_background([0.0, 0.05, 0.2, 0.5])
    images[0, :, 0, 7:21] = 1.0  # a stroke that touches the top edge, as a few real digits do, is no blob
    assert blob_mask(images).tolist() == [False, False, True, True]


def test_no_real_test_digit_is_a_blob(real_mnist):
    from ddpm_mnist.data import load_x_0

    test_digits = (load_x_0(real_mnist, "test", None) + 1) / 2
    assert not blob_mask(test_digits).any()


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """The script's functions, loaded without running it."""
    return SimpleNamespace(**runpy.run_path(str(SCRIPT)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as train.py leaves it: a tiny pipeline, its training record and a grid of 2 blobs in 6 digits."""
    folder = tmp_path_factory.mktemp("run")
    pipeline = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=10))
    record = {"images_seen": 1600, "training_time": "0.1 minutes", "hardware": "1 x CPU"}
    (folder / "samples").mkdir()
    digit_grid(digits_with_background([0, 0.5, 0, 0, 0.3, 0]), upscale=SAMPLE_GRID_UPSCALE).save(
        folder / "samples" / "step-0000100.png"
    )
    save_training_run(pipeline, folder, "run", dataset_name="ylecun/mnist", training=record)
    return folder


def test_scores_each_sampler_and_counts_the_blobs_of_the_last_grid(bench, run_dir, mnist_folder, capsys):
    torch.set_num_threads(1)
    argv = [str(run_dir), "--samplers", "ddpm:2", "ddim:3", "--num_samples", "8", "--json"]
    bench.main([*argv, "--dataset_name", str(mnist_folder)])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    (run,) = result["runs"]
    assert (run["grid"], run["grid_blobs"], run["grid_digits"]) == ("step-0000100.png", 2, 6)  # 2 rows of 3
    assert run["images_seen"] == 1600 and run["hardware"] == "1 x CPU"
    assert [entry["sampler"] for entry in run["samplers"]] == ["ddpm:2", "ddim:3"]
    for entry in run["samplers"]:
        assert 0 <= entry["readable"] <= 1 and 0 <= entry["blobs"] <= 8
        assert entry["fid_vs_floor"] == pytest.approx(entry["fid"] / result["floor"]["fid"])
    assert "| run | images | sampler | readable |" in out and "real floor, 8 training digits" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samplers", "ddpm"], "is not NAME:STEPS"),
        (["--samplers", "euler:4"], "is not NAME:STEPS"),
        (["--samplers", "ddpm:11"], "num_inference_steps 11 is outside 1..10"),
    ],
)
def test_bad_samplers_are_refused_before_any_sampling(bench, run_dir, mnist_folder, argv, message, capsys):
    with pytest.raises((SystemExit, UsageError)) as error:
        bench.main([str(run_dir), *argv, "--num_samples", "8", "--dataset_name", str(mnist_folder)])
    assert message in (str(error.value) + capsys.readouterr().err)


def test_a_folder_without_a_training_record_is_refused(bench, tmp_path):
    with pytest.raises(UsageError, match="has no training.json; pass the output folder of a finished train.py run"):
        bench.main([str(tmp_path)])
