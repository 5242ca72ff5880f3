"""Tests for the `ddpm-mnist` command line (run in-process through `main`)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.cli import build_parser, main
from ddpm_mnist.data import load_x_0
from ddpm_mnist.evaluation import SCHEDULERS
from tests.utils import tiny_unet

T = 10


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny pipeline with a 10-step schedule."""
    folder = tmp_path_factory.mktemp("pipeline")
    DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return str(folder)


def run(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI, expect success (exit status 0), return its stdout."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 0, capsys.readouterr().err
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
    args = ["sample", pipeline_dir, "--num_samples", 5, "--num_inference_steps", 3, "--scheduler", scheduler]
    out = run(capsys, *args, "--seed", 1, "--output_dir", tmp_path / "out", "--save-digits", "--batch-size", 2)
    assert out.startswith("device: cpu (CPU ")
    tiles = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    assert tiles.shape == (2 * 56, 3 * 56)  # 5 digits in a 3-column grid, the sixth tile black, upscaled 2x
    digits = sorted((tmp_path / "out" / "digits").glob("*.png"))
    assert len(digits) == 5
    fifth = np.asarray(Image.open(digits[4]))
    assert fifth.shape == (28, 28) and fifth.std() > 0
    np.testing.assert_array_equal(fifth.repeat(2, 0).repeat(2, 1), tiles[56:, 56:112])
    assert not tiles[56:, 112:].any()
    run(capsys, *args, "--seed", 1, "--output-dir", tmp_path / "again", "--upscale", 1, "--batch_size", 2)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again" / "grid.png")), tiles[::2, ::2])


def test_evaluate_prints_one_json_object_with_every_score(pipeline_dir, mnist_folder, capsys):
    out = run(
        capsys,
        *("evaluate", pipeline_dir, "--num-samples", 8, "--num_inference_steps", 2, "--scheduler", "ddim"),
        *("--dataset_name", mnist_folder, "--nll", "--nll-images", 2, "--nll_timesteps", 3, "--json", "--seed", 0),
    )
    result = json.loads(out.strip().splitlines()[-1])
    keys = ("fid", "kid", "precision", "recall", "mean_confidence", "class_entropy", "rarest_class_share")
    for key in keys:
        assert math.isfinite(result[key]) and math.isfinite(result["floor"][key])
    assert result["num_images"] == result["floor"]["num_images"] == 8
    assert result["nll"]["exact"] is False and result["nll"]["num_images"] == 2
    assert result["nll_bpd"] == result["nll"]["nll_bpd"] > 0


def test_evaluate_prints_a_table_beside_the_floor(pipeline_dir, mnist_folder, capsys):
    out = run(capsys, "evaluate", pipeline_dir, "--num_samples", 6, "--num-inference-steps", 2, "--dataset-name",
              mnist_folder, "--dtype", "bf16")  # fmt: skip
    assert "real floor" in out and "6 samples (ddpm, 2 steps) against 32 MNIST test" in out
    assert all(name in out for name in ("fid", "kid", "precision", "recall", "mean_confidence", "class_entropy"))


def test_the_earlier_dtype_spellings_still_work_with_a_one_line_warning(capsys):
    for old, new in [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")]:
        assert build_parser().parse_args(["sample", "pipe", "--dtype", old]).dtype == new
        assert capsys.readouterr().err == f"warning: --dtype {old} is deprecated; use --dtype {new}.\n"
    assert build_parser().parse_args(["sample", "pipe", "--dtype", "bf16"]).dtype == "bf16"
    assert capsys.readouterr().err == ""


def test_nll_prints_the_bound_and_its_terms(pipeline_dir, mnist_folder, capsys):
    args = ["nll", pipeline_dir, "--split", "test", "--nll_images", 3, "--dataset_name", mnist_folder]
    out = run(capsys, *args)
    assert "NLL bound on 3 test digits" in out and "exact: all T terms" in out
    assert "prior" in out and "diffusion" in out and "decoder" in out
    result = json.loads(run(capsys, *args, "--json").strip().splitlines()[-1])
    assert result["exact"] and len(result["terms_bpd"]) == T - 1
    assert sum(result["terms_bpd"]) == pytest.approx(result["diffusion_bpd"])
    parts = result["prior_bpd"] + result["diffusion_bpd"] + result["decoder_bpd"]
    assert result["nll_bpd"] == pytest.approx(parts)
    estimate = run(capsys, *args, "--nll-timesteps", 2)
    assert "unbiased estimate from sampled timesteps" in estimate


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "./no/such/pipeline"], "is not a folder"),
        (["sample", "someone/no-such-model"], "cannot load the pipeline 'someone/no-such-model'"),
        (["sample", "{pipe}", "--num_inference_steps", "11"], "num_inference_steps 11 is outside 1..10"),
        (["sample", "{pipe}", "--num-inference-steps", "0"], "num_inference_steps 0 is outside 1..10"),
        (["sample", "{pipe}", "--scheduler", "euler"], "invalid choice: 'euler'"),
        (["sample", "{pipe}", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["sample", "{pipe}", "--output_dir", "{pipe}/model_index.json"], "is a file; pass a folder"),
        (["sample", "{pipe}", "--device", "gpu0"], "is not a torch device"),
        (["sample", "{pipe}", "--batch_size", "0"], "--batch_size must be at least 1"),
        (["evaluate", "{pipe}", "--dataset_name", "{mnist}", "--num_samples", "2"], "num_samples must be at least 4"),
        (["evaluate", "{pipe}", "--dataset_name", "./no/such/mnist"], "dataset path './no/such/mnist' does not exist"),
        (["evaluate", "{pipe}", "--dataset_name", "{mnist}", "--num_samples", "97"], "which holds 96"),
        (["evaluate", "{pipe}", "--nll", "--nll_timesteps", "10"], "nll_timesteps 10 is outside 1..9"),
        (["nll", "{pipe}", "--split", "validation"], "invalid choice: 'validation'"),
        (["nll", "{pipe}", "--dataset_name", "{mnist}", "--nll_images", "33"], "which holds 32"),
    ],
)
def test_bad_input_is_a_one_line_error(pipeline_dir, mnist_folder, capsys, argv, message):
    line = fails(capsys, *(a.format(pipe=pipeline_dir, mnist=mnist_folder) for a in argv))
    assert line.startswith(("ddpm-mnist", "usage")) and message in line
