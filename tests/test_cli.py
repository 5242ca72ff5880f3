"""Tests for the `ddpm-mnist` command line (run in-process through `main`)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.cli import SCHEDULERS, build_parser, main
from ddpm_mnist.data import load_x_0
from tests.utils import tiny_unet

T = 10


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny pipeline with a 10-step schedule."""
    folder = tmp_path_factory.mktemp("pipeline")
    DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return str(folder)


def run(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI, expect success, return its stdout."""
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def fails(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI, expect exit status 2, return the last line of stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_digits_for_the_metrics_are_the_first_ones_or_a_seeded_subset(mnist_folder):
    def ids(x_0: torch.Tensor) -> list[int]:  # the fixture writes example i's index into its top-left pixel
        return ((x_0[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()

    assert ids(load_x_0(str(mnist_folder), "train", 5)) == [0, 1, 2, 3, 4]
    subset = ids(load_x_0(str(mnist_folder), "train", 40, seed=1))
    assert subset == sorted(set(subset)) and len(subset) == 40 and subset != list(range(40))
    assert ids(load_x_0(str(mnist_folder), "train", 40, seed=1)) == subset
    assert ids(load_x_0(str(mnist_folder), "train", 40, seed=2)) != subset
    padded = load_x_0(str(mnist_folder), "test", sample_size=32)
    assert padded.shape == (32, 1, 32, 32) and (padded[..., :2, :] == -1).all()


def test_every_option_of_every_command_is_explained(capsys):
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"sample", "evaluate", "nll"}
    for name, parser in subparsers.choices.items():
        for action in parser._actions:
            assert action.help, f"`{name} {'/'.join(action.option_strings) or action.dest}` has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "PIPELINE" in capsys.readouterr().out


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_sample_writes_a_grid_and_the_digits(pipeline_dir, tmp_path, capsys, scheduler):
    grid = tmp_path / "out" / "grid.png"
    args = ["sample", pipeline_dir, "--num-images", 5, "--steps", 3, "--scheduler", scheduler, "--seed", 1]
    run(capsys, *args, "--out", grid, "--images-dir", tmp_path / "digits", "--batch-size", 2)
    tiles = np.asarray(Image.open(grid))
    assert tiles.shape == (2 * 28, 3 * 28)  # 5 digits in a 3-column grid, the sixth tile black
    digits = sorted((tmp_path / "digits").glob("*.png"))
    assert len(digits) == 5
    np.testing.assert_array_equal(np.asarray(Image.open(digits[4])), tiles[28:, 28:56])
    assert not tiles[28:, 56:].any()
    run(capsys, *args, "--out", tmp_path / "again.png", "--batch-size", 2)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), tiles)


def test_evaluate_prints_one_json_object_with_every_score(pipeline_dir, mnist_folder, capsys):
    out = run(
        capsys,
        *("evaluate", pipeline_dir, "--num-samples", 8, "--steps", 2, "--scheduler", "ddim", "--seed", 0),
        *("--dataset", mnist_folder, "--nll", "--nll-images", 2, "--nll-timesteps", 3, "--json"),
    )
    result = json.loads(out.strip().splitlines()[-1])
    keys = ("fid", "kid", "precision", "recall", "mean_confidence", "class_entropy", "rarest_class_share")
    for key in keys:
        assert math.isfinite(result[key]) and math.isfinite(result["floor"][key])
    assert result["num_images"] == result["floor"]["num_images"] == 8
    assert result["nll"]["exact"] is False and result["nll"]["num_images"] == 2
    assert result["nll_bpd"] == result["nll"]["nll_bpd"] > 0


def test_evaluate_prints_a_table_beside_the_floor(pipeline_dir, mnist_folder, capsys):
    out = run(capsys, "evaluate", pipeline_dir, "--num-samples", 6, "--steps", 2, "--dataset", mnist_folder)
    assert "real floor" in out and "6 samples (ddpm, 2 steps) against 32 MNIST test digits" in out
    assert all(name in out for name in ("fid", "kid", "precision", "recall", "mean_confidence", "class_entropy"))


def test_nll_prints_the_bound_and_its_terms(pipeline_dir, mnist_folder, capsys):
    args = ["nll", pipeline_dir, "--split", "test", "--num-images", 3, "--dataset", mnist_folder]
    out = run(capsys, *args)
    assert "NLL bound on 3 test digits" in out and "exact: all T terms" in out
    assert "prior" in out and "diffusion" in out and "decoder" in out
    result = json.loads(run(capsys, *args, "--json").strip().splitlines()[-1])
    assert result["exact"] and len(result["terms_bpd"]) == T - 1
    assert sum(result["terms_bpd"]) == pytest.approx(result["diffusion_bpd"])
    parts = result["prior_bpd"] + result["diffusion_bpd"] + result["decoder_bpd"]
    assert result["nll_bpd"] == pytest.approx(parts)
    estimate = run(capsys, *args, "--timesteps", 2)
    assert "unbiased estimate from sampled timesteps" in estimate


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "./no/such/pipeline"], "is not a folder"),
        (["sample", "someone/no-such-model"], "cannot load the pipeline 'someone/no-such-model'"),
        (["sample", "{pipe}", "--steps", "11"], "--steps 11 exceeds the pipeline's 10 training timesteps"),
        (["sample", "{pipe}", "--steps", "0"], "expected an integer >= 1, got '0'"),
        (["sample", "{pipe}", "--scheduler", "euler"], "invalid choice: 'euler'"),
        (["sample", "{pipe}", "--out", "grid.txt"], "must be an image file name"),
        (["sample", "{pipe}", "--device", "gpu0"], "is not a torch device"),
        (["evaluate", "{pipe}", "--num-samples", "2"], "expected an integer >= 4, got '2'"),
        (["evaluate", "{pipe}", "--dataset", "./no/such/mnist"], "dataset path './no/such/mnist' does not exist"),
        (["evaluate", "{pipe}", "--dataset", "{mnist}", "--num-samples", "97"], "which holds 96"),
        (["evaluate", "{pipe}", "--nll", "--nll-timesteps", "10"], "exceeds the 9 diffusion terms"),
        (["nll", "{pipe}", "--split", "validation"], "invalid choice: 'validation'"),
        (["nll", "{pipe}", "--dataset", "{mnist}", "--num-images", "33"], "which holds 32"),
    ],
)
def test_bad_input_is_a_one_line_error(pipeline_dir, mnist_folder, capsys, argv, message):
    line = fails(capsys, *(a.format(pipe=pipeline_dir, mnist=mnist_folder) for a in argv))
    assert line.startswith(("ddpm-mnist", "usage")) and message in line
