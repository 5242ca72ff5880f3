"""Tests for `ddpm_mnist.evaluation` on a tiny saved pipeline and a small MNIST-layout folder."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.errors import UsageError
from ddpm_mnist.evaluation import (
    QualityReference,
    digit_grid,
    generate_digits,
    load_pipeline,
    nll_bound,
    scheduler_steps,
    to_pil_images,
)
from tests.utils import tiny_unet

T = 10


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny pipeline with a 10-step schedule, fixed_large so that a lost setting would show."""
    folder = tmp_path_factory.mktemp("pipeline")
    scheduler = DDPMMnistScheduler(num_train_timesteps=T, variance_type="fixed_large")
    DDPMMnistPipeline(tiny_unet(), scheduler).save_pretrained(folder)
    return str(folder)


def test_grid_tiles_row_by_row_with_black_spare_tiles_and_upscales_by_whole_pixels():
    digits = torch.rand(5, 1, 28, 28)
    grid = np.asarray(digit_grid(digits))
    assert grid.shape == (2 * 28, 3 * 28)
    expected = [np.asarray(image) for image in to_pil_images(digits)]
    np.testing.assert_array_equal(grid[28:, 28:56], expected[4])  # the fifth digit: row 2, column 2
    np.testing.assert_array_equal(expected[4], (digits[4, 0].numpy() * 255).round())
    assert not grid[28:, 56:].any()
    large = np.asarray(digit_grid(digits, cols=5, upscale=3))
    assert large.shape == (3 * 28, 5 * 3 * 28)
    np.testing.assert_array_equal(large, np.hstack(expected).repeat(3, 0).repeat(3, 1))
    with pytest.raises(UsageError, match="at least one digit"):
        digit_grid(digits[:0])


def test_each_scheduler_runs_on_the_saved_noise_schedule_for_the_call_only(pipeline_dir):
    pipe = load_pipeline(pipeline_dir)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, inputs: seen.append(type(pipe.scheduler)))
    first = generate_digits(pipe, 3, scheduler="ddim", num_inference_steps=2, seed=4, batch_size=2, progress=False)
    assert seen == [DDIMScheduler] * 4  # 2 batches x 2 steps
    assert type(pipe.scheduler) is DDPMMnistScheduler and pipe.scheduler.config.variance_type == "fixed_large"
    assert first.shape == (3, 1, 28, 28) and first.dtype == torch.float32 and 0 <= first.min() < first.max() <= 1
    again = generate_digits(pipe, 3, scheduler="ddim", num_inference_steps=2, seed=4, batch_size=2, progress=False)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    other = generate_digits(pipe, 3, scheduler="ddim", num_inference_steps=2, seed=5, batch_size=2, progress=False)
    assert not torch.equal(other, first)
    assert scheduler_steps(pipe, "ddpm") == T and scheduler_steps(pipe, "unipc") == T  # 50 capped at T


def test_load_pipeline_passes_the_dtype_through(pipeline_dir):
    pipe = load_pipeline(pipeline_dir, "cpu", "bf16")
    assert pipe.unet.dtype == torch.bfloat16
    digits = generate_digits(pipe, 2, num_inference_steps=2, progress=False)
    assert digits.dtype == torch.float32 and digits.shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda pipe: scheduler_steps(pipe, "euler"), "scheduler 'euler' is not one of ddpm, ddim, dpm++, unipc"),
        (lambda pipe: scheduler_steps(pipe, "ddim", T + 1), f"num_inference_steps {T + 1} is outside 1..{T}"),
        (lambda pipe: generate_digits(pipe, 0), "num_samples and batch_size must be at least 1"),
        (lambda pipe: nll_bound(pipe, torch.zeros(1, 1, 28, 28), nll_timesteps=T), f"is outside 1..{T - 1}"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_argument(pipeline_dir, call, message):
    with pytest.raises(UsageError, match=message.replace("+", r"\+").replace(".", r"\.")):
        call(load_pipeline(pipeline_dir))


def test_load_pipeline_refuses_bad_input_in_one_line(pipeline_dir, tmp_path):
    for args, message in [
        ((tmp_path / "nothing",), "is not a folder"),
        ((pipeline_dir, "cpu", "int8"), "dtype 'int8' is not one of fp32, bf16, fp16"),
        ((pipeline_dir, "tpu9"), "is not a torch device"),
    ]:
        with pytest.raises(UsageError, match=message) as error:
            load_pipeline(*args)
        assert "\n" not in str(error.value)


def test_the_floor_is_computed_once_per_count_and_checked_before_sampling(mnist_folder):
    reference = QualityReference(mnist_folder, 16, progress=False)
    assert reference.num_images == 16
    floor = reference.floor(8)
    assert floor.num_images == 8 and reference.floor(8) is floor
    assert np.isfinite(floor.fid) and 0 <= floor.precision <= 1
    with pytest.raises(UsageError, match="which holds 96"):
        reference.floor(97)
    with pytest.raises(UsageError, match="num_samples must be at least 4"):
        reference.score(torch.rand(3, 1, 28, 28))
