"""Tests for the `ddpm-mnist` command line (run in-process through `main`)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_mnist import DDPMMnistInpaintPipeline, DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet, cli
from ddpm_mnist.cli import build_parser, main
from ddpm_mnist.data import load_x_0
from ddpm_mnist.schedulers import SCHEDULERS
from tests.test_evaluation import draw_real_digits
from tests.utils import tiny_unet

T = 10


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny pipeline with a 10-step schedule."""
    folder = tmp_path_factory.mktemp("pipeline")
    DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny class-conditional pipeline with a 10-step schedule."""
    folder = tmp_path_factory.mktemp("conditional")
    DDPMMnistPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def digit_png(tmp_path) -> tuple[str, np.ndarray]:
    """A PNG of a 28x28 greyscale "digit" (random pixels) and its pixels."""
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    return str(tmp_path / "digit.png"), pixels


def spy(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[dict]:
    """Record the keyword arguments of every call of `owner.name`, which still runs."""
    calls, original = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def tiles(path, count: int) -> list[np.ndarray]:
    """The `count` 28x28 tiles of a one-row picture written with --upscale 1."""
    row = np.asarray(Image.open(path))
    assert row.shape == (28, 28 * count)
    return [row[:, 28 * i : 28 * (i + 1)] for i in range(count)]


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
    assert set(subparsers.choices) == {"sample", "evaluate", "nll", "inpaint", "interpolate"}
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
    assert result["class_conditional"] is False and result["guidance_scale"] == 1.0 and "class_accuracy" not in result


def test_evaluate_prints_a_table_beside_the_floor(pipeline_dir, mnist_folder, capsys):
    out = run(capsys, "evaluate", pipeline_dir, "--num_samples", 6, "--num-inference-steps", 2, "--dataset-name",
              mnist_folder, "--dtype", "bf16")  # fmt: skip
    assert "real floor" in out and "6 samples (ddpm, 2 steps) against 32 MNIST test" in out
    assert all(name in out for name in ("fid", "kid", "precision", "recall", "mean_confidence", "class_entropy"))


def test_sample_asks_a_conditional_pipeline_for_the_labels_one_column_each(
    conditional_dir, tmp_path, capsys, monkeypatch
):
    calls = spy(monkeypatch, DDPMMnistPipeline, "__call__")
    args = ["sample", conditional_dir, "--num_inference_steps", 1, "--upscale", 1, "--output_dir", tmp_path]
    run(capsys, *args, "--num_samples", 5, "--class_labels", 3, 7, "--guidance_scale", 2, "--batch_size", 4)
    assert [call["class_labels"] for call in calls] == [[3, 7, 3, 7], [3]]  # repeated in order, batch by batch
    assert [call["guidance_scale"] for call in calls] == [2.0, 2.0]
    assert [call["guidance_interval"] for call in calls] == [None, None]
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (3 * 28, 2 * 28)  # a column per label
    calls.clear()
    run(capsys, *args, "--num_samples", 2, "--class_labels", 3, "--guidance_scale", 2, "--guidance_interval", 2, 6)
    assert calls[0]["guidance_interval"] == [2, 6]
    calls.clear()
    run(capsys, *args, "--num_samples", 12, "--class-labels", "all")
    assert [call["class_labels"] for call in calls] == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]]
    assert calls[0]["guidance_scale"] == 1.0
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (2 * 28, 10 * 28)


def test_evaluate_scores_a_conditional_pipeline_on_balanced_labels_with_its_class_accuracy(
    conditional_dir, real_mnist, capsys, monkeypatch
):
    args = ["evaluate", conditional_dir, "--num_samples", 20, "--reference_images", 20, "--dataset_name", real_mnist]
    calls = draw_real_digits(monkeypatch, real_mnist)  # the digit asked for, always
    result = json.loads(run(capsys, *args, "--guidance_scale", 2.5, "--json").strip().splitlines()[-1])
    assert [call["class_labels"].tolist() for call in calls] == [[digit for digit in range(10) for _ in (0, 1)]]
    assert calls[0]["guidance_scale"] == result["guidance_scale"] == 2.5 and result["class_conditional"] is True
    assert result["class_accuracy"] == 1.0 and result["class_accuracy_per_digit"] == [1.0] * 10
    assert math.isfinite(result["fid"]) and result["num_images"] == result["floor"]["num_images"] == 20
    draw_real_digits(monkeypatch, real_mnist, shift=1)  # the next digit, always
    table = run(capsys, *args)
    assert "Each digit asked for equally often, guidance scale 1" in table
    assert "class_accuracy                0.0000" in table
    assert "accuracy per digit 0-9: " + " ".join(["0.000"] * 10) in table
    # --null_class scores the same pipeline without labels, as an unconditional model; guidance then has no digit.
    monkeypatch.undo()  # the pipeline samples again
    calls = spy(monkeypatch, DDPMMnistPipeline, "__call__")
    result = json.loads(run(capsys, *args, "--null_class", "--num_inference_steps", 2, "--json").splitlines()[-1])
    assert len(calls) == 1 and calls[0].get("class_labels") is None
    assert result["class_conditional"] is False and "class_accuracy" not in result and result["num_images"] == 20
    assert "--null_class draws without labels" in fails(capsys, *args, "--null_class", "--guidance_scale", 2)
    assert "--null_class draws without labels" in fails(capsys, *args, "--null_class", "--guidance_interval", 1, 2)


def test_inpaint_writes_the_digit_its_kept_part_and_the_completions(
    pipeline_dir, conditional_dir, mnist_folder, digit_png, tmp_path, capsys, monkeypatch
):
    calls = spy(monkeypatch, DDPMMnistInpaintPipeline, "__call__")
    path, pixels = digit_png
    mask = np.zeros((28, 28), dtype=np.uint8)
    mask[:, :14] = 255  # keep the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = run(capsys, "inpaint", conditional_dir, "--image", path, "--mask", tmp_path / "mask.png", "--num_images", 3,
              "--class_labels", 2, "--guidance_scale", 1.5, "--num_inference_steps", 2, "--seed", 1, "--upscale", 1,
              "--output", tmp_path / "out" / "row.png")  # fmt: skip
    assert "wrote the digit, its kept part and 3 completions" in out
    assert calls[0]["class_labels"] == [2, 2, 2] and calls[0]["guidance_scale"] == 1.5
    assert calls[0]["num_inference_steps"] == 2
    digit, kept, *completions = tiles(tmp_path / "out" / "row.png", 5)
    np.testing.assert_array_equal(digit, pixels)
    np.testing.assert_array_equal(kept[:, :14], pixels[:, :14])
    assert not kept[:, 14:].any()
    for completion in completions:  # the kept pixels come back as they were; the rest is drawn anew
        np.testing.assert_array_equal(completion[:, :14], pixels[:, :14])
    assert not np.array_equal(completions[0][:, 14:], completions[1][:, 14:])

    run(capsys, "inpaint", pipeline_dir, "--test-digit", 3, "--keep", "bottom", "--dataset_name", mnist_folder,
        "--num_images", 1, "--num_inference_steps", 2, "--upscale", 1, "--output", tmp_path / "test.png")  # fmt: skip
    assert calls[1]["class_labels"] is None and calls[1]["guidance_scale"] == 1.0
    digit, kept, completion = tiles(tmp_path / "test.png", 3)
    assert digit[0, 0] == 3  # the fixture writes test digit i's index into its top-left pixel
    assert not kept[:14].any() and np.array_equal(kept[14:], digit[14:])
    np.testing.assert_array_equal(completion[14:], digit[14:])


def test_interpolate_writes_a_row_from_one_digit_to_the_other(
    pipeline_dir, conditional_dir, mnist_folder, digit_png, tmp_path, capsys, monkeypatch
):
    calls = spy(monkeypatch, cli, "interpolate")
    path_a, pixels_a = digit_png
    pixels_b = 255 - pixels_a
    Image.fromarray(pixels_b).save(tmp_path / "b.png")
    out = run(capsys, "interpolate", pipeline_dir, "--image_a", path_a, "--image-b", tmp_path / "b.png", "--t", 3,
              "--lambdas", 0, 0.5, 1, "--upscale", 1, "--output", tmp_path / "row.png")  # fmt: skip
    assert "wrote the two digits and 3 interpolations at t=3" in out
    assert calls[0]["t"] == 3 and calls[0]["lambdas"] == [0, 0.5, 1] and calls[0]["class_labels"] is None
    row = tiles(tmp_path / "row.png", 5)
    np.testing.assert_array_equal(row[0], pixels_a)
    np.testing.assert_array_equal(row[4], pixels_b)

    run(capsys, "interpolate", conditional_dir, "--test_digits", 4, 1, "--dataset_name", mnist_folder, "--t", 2,
        "--lambdas", 0.5, 0.25, "--class_labels", 6, "--guidance_scale", 2, "--upscale", 1, "--output",
        tmp_path / "test.png")  # fmt: skip
    assert calls[1]["class_labels"] == [6, 6] and calls[1]["guidance_scale"] == 2.0
    assert calls[1]["num_inference_steps"] is None
    row = tiles(tmp_path / "test.png", 4)
    assert row[0][0, 0] == 4 and row[3][0, 0] == 1


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
        (
            ["evaluate", "{pipe}", "--dataset_name", "./no/such/mnist"],
            "--dataset_name './no/such/mnist' does not exist",
        ),
        (["evaluate", "{pipe}", "--dataset_name", "{mnist}", "--num_samples", "97"], "which holds 96"),
        (["evaluate", "{pipe}", "--nll", "--nll_timesteps", "10"], "nll_timesteps 10 is outside 1..9"),
        (["nll", "{pipe}", "--split", "validation"], "invalid choice: 'validation'"),
        (["nll", "{pipe}", "--dataset_name", "{mnist}", "--nll_images", "33"], "which holds 32"),
        (["sample", "{pipe}", "--class_labels", "3"], "class_labels were given to an unconditional model"),
        (["sample", "{cond}", "--class_labels", "3", "10"], "'10' is not a digit 0-9 or `all`"),
        (["sample", "{cond}", "--class_labels", "all", "3"], "--class_labels all stands alone"),
        (["sample", "{cond}", "--class_labels", "3", "--guidance_scale", "0.5"], "must be a number of at least 1"),
        (["sample", "{pipe}", "--guidance_scale", "2"], "--guidance_scale > 1 needs --class_labels"),
        (["evaluate", "{pipe}", "--guidance_scale", "2"], "--guidance_scale above 1 needs a class-conditional"),
        (["evaluate", "{cond}", "--num_samples", "8"], "num_samples 8 cannot hold every digit 0-9"),
        (["evaluate", "{cond}", "--guidance_interval", "600", "100"], "0 <= low <= high <= 10, got (600, 100)"),
        (["sample", "{cond}", "--class_labels", "3", "--guidance_interval", "5"], "expected 2 arguments"),
        (["inpaint", "{cond}", "--image", "./no/such.png", "--keep", "top"], "--image './no/such.png' is not a file"),
        (["inpaint", "{cond}", "--image", "{pipe}/model_index.json", "--keep", "top"], "cannot be read as an image"),
        (["inpaint", "{cond}", "--test_digit", "0"], "one of the arguments --mask --keep is required"),
        (["inpaint", "{cond}", "--test_digit", "0", "--keep", "middle"], "invalid choice: 'middle'"),
        (
            "inpaint {cond} --test_digit 0 --keep top --num_inference_steps 11".split(),
            "num_inference_steps 11 is outside",
        ),
        (["inpaint", "{cond}", "--test_digit", "0", "--keep", "top", "--num_images", "0"], "--num_images must be"),
        (["inpaint", "{cond}", "--test_digit", "0", "--keep", "top", "--output", "{pipe}"], "not an image file name"),
        (["inpaint", "{pipe}", "--test_digit", "0", "--keep", "top", "--class_labels", "1"], "unconditional model"),
        (
            "inpaint {cond} --test_digit 32 --keep top --dataset_name {mnist} --num-inference-steps 2".split(),
            "cannot read test digit 32: asked for 33 digits of the 'test' split, which holds 32",
        ),
        (["interpolate", "{cond}", "--image_a", "{pipe}/a.png"], "pass two digits: --image_a A.png --image_b B.png"),
        (["interpolate", "{cond}", "--test_digits", "0", "1", "--image_b", "b.png"], "pass two digits"),
        (["interpolate", "{cond}", "--test_digits", "0", "1", "--dataset_name", "{mnist}"], "t must be an integer"),
        (
            "interpolate {cond} --test_digits 0 1 --dataset_name {mnist} --t 5 --lambdas 0 1.5".split(),
            "lambdas must be a non-empty sequence of numbers in [0, 1]",
        ),
        (["interpolate", "{pipe}", "--test_digits", "0", "1", "--guidance_scale", "2"], "needs --class_labels"),
    ],
)
def test_bad_input_is_a_one_line_error_before_any_sampling(
    pipeline_dir, conditional_dir, mnist_folder, capsys, monkeypatch, argv, message
):
    monkeypatch.setattr(DDPMMnistUNet, "forward", lambda *args, **kwargs: pytest.fail("sampled despite bad input"))
    line = fails(capsys, *(a.format(pipe=pipeline_dir, cond=conditional_dir, mnist=mnist_folder) for a in argv))
    assert line.startswith(("ddpm-mnist", "usage")) and message in line
