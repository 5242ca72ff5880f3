"""Tests for `ddpm_mnist.evaluation` on a tiny saved pipeline and a small MNIST-layout folder, and for the image
helpers of `ddpm_mnist.image_utils` that the editing commands read their input with."""

import functools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, ImagePipelineOutput
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.data import decode_labels, load_image_stream, load_x_0
from ddpm_mnist.evaluation import (
    QualityReference,
    generate_digits,
    guidance_sweep,
    load_pipeline,
    load_test_digits,
    nll_bound,
    scheduler_steps,
)
from ddpm_mnist.image_utils import digit_grid, keep_half, load_image, to_pil_images
from ddpm_mnist.metrics.quality import balanced_class_labels
from tests.utils import tiny_unet

T = 10


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny pipeline with a 10-step schedule, fixed_large so that a lost setting would show."""
    folder = tmp_path_factory.mktemp("pipeline")
    scheduler = DDPMMnistScheduler(num_train_timesteps=T, variance_type="fixed_large")
    DDPMMnistPipeline(tiny_unet(), scheduler).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny class-conditional pipeline (10 digits and the null class) with a 10-step schedule."""
    folder = tmp_path_factory.mktemp("conditional")
    DDPMMnistPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return str(folder)


@functools.cache
def real_digits_by_class(real_mnist: Path) -> list[torch.Tensor]:
    """Four real MNIST test digits of each class 0-9, by their dataset labels, in [0, 1]."""
    x_0 = load_x_0(str(real_mnist), "test", 200)
    labels = decode_labels(load_image_stream(str(real_mnist), "test", label_column="label"))[:200]
    return [(x_0[labels == digit][:4] + 1) / 2 for digit in range(10)]


def draw_real_digits(monkeypatch: pytest.MonkeyPatch, real_mnist: Path, shift: int = 0) -> list[dict]:
    """Make `DDPMMnistPipeline` draw, for each class label, a real MNIST digit of class (label + shift) % 10.

    Returns the list that records the arguments of every call: a stand-in for a perfectly (shift 0) or wrongly
    (shift 1) conditioned model, so that class accuracy is known without a trained one.
    """
    digits, calls = real_digits_by_class(real_mnist), []

    def call(pipe: DDPMMnistPipeline, batch_size=None, class_labels=None, guidance_scale=1.0, **kwargs):
        calls.append({"batch_size": batch_size, "class_labels": class_labels, "guidance_scale": guidance_scale})
        drawn = Counter()
        images = []
        for label in torch.as_tensor(class_labels).tolist():
            digit = (label + shift) % 10
            images.append(digits[digit][drawn[digit] % len(digits[digit])])
            drawn[digit] += 1
        return ImagePipelineOutput(images=torch.stack(images))

    monkeypatch.setattr(DDPMMnistPipeline, "__call__", call)
    return calls


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
    with pytest.raises(ValueError, match="at least one digit"):
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
def test_bad_arguments_are_value_errors_naming_the_argument(pipeline_dir, call, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace(".", r"\.")):
        call(load_pipeline(pipeline_dir))


def test_load_pipeline_refuses_bad_input_in_one_line(pipeline_dir, tmp_path):
    for args, error_type, message in [
        ((tmp_path / "nothing",), FileNotFoundError, "is not a folder"),
        ((pipeline_dir, "cpu", "int8"), ValueError, "dtype 'int8' is not one of fp32, bf16, fp16"),
        ((pipeline_dir, "tpu9"), ValueError, "device 'tpu9' is not a torch device"),
        (("someone/no-such-model",), OSError, "cannot load the pipeline 'someone/no-such-model'"),
    ]:
        with pytest.raises(error_type, match=message) as error:
            load_pipeline(*args)
        assert "\n" not in str(error.value)


def test_the_floor_is_computed_once_per_count_and_checked_before_sampling(mnist_folder):
    reference = QualityReference(mnist_folder, 16, progress=False)
    assert reference.num_images == 16
    floor = reference.floor(8)
    assert floor.num_images == 8 and reference.floor(8) is floor
    assert np.isfinite(floor.fid) and 0 <= floor.precision <= 1
    with pytest.raises(ValueError, match="which holds 96"):
        reference.floor(97)
    with pytest.raises(ValueError, match="num_samples must be at least 4"):
        reference.score(torch.rand(3, 1, 28, 28))


def unet_labels(pipe: DDPMMnistPipeline) -> list[list[int]]:
    """Record the class labels of every UNet call of `pipe` (None for a call without labels)."""
    seen = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)  # unet(sample, timestep, class_labels)
        seen.append(None if labels is None else labels.tolist())

    pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def test_generate_digits_hands_each_batch_its_labels_and_the_guidance_scale(conditional_dir):
    pipe = load_pipeline(conditional_dir)
    seen = unet_labels(pipe)
    labels = [3, 1, 4, 1, 5]
    plain = generate_digits(pipe, 5, num_inference_steps=1, batch_size=3, class_labels=labels, progress=False)
    assert seen == [[3, 1, 4], [1, 5]]  # one step, two batches, no null batch without guidance
    seen.clear()
    guided = generate_digits(
        pipe, 5, num_inference_steps=1, batch_size=3, class_labels=labels, guidance_scale=3.0, progress=False
    )
    assert seen == [[3, 1, 4, 10, 10, 10], [1, 5, 10, 10]]  # each batch with its null batch (class 10)
    assert guided.shape == plain.shape == (5, 1, 28, 28) and not torch.equal(guided, plain)
    seen.clear()
    generate_digits(pipe, 2, num_inference_steps=1, progress=False)
    assert seen == [None]  # no labels: any digit


@pytest.mark.parametrize(
    ("conditional", "kwargs", "message"),
    [
        (False, {"class_labels": [1, 2]}, "class_labels were given to an unconditional model"),
        (True, {"class_labels": [1, 10]}, "class_labels must be digits between 0 and 9"),
        (True, {"class_labels": [1]}, "got 1 class_labels for num_samples 2"),
        (True, {"class_labels": [1, 2], "guidance_scale": 0.5}, "guidance_scale must be a number of at least 1"),
        (True, {"guidance_scale": 2.0}, "guidance_scale > 1 needs class_labels"),
    ],
)
def test_bad_class_inputs_are_value_errors_before_any_sampling(
    pipeline_dir, conditional_dir, conditional, kwargs, message
):
    pipe = load_pipeline(conditional_dir if conditional else pipeline_dir)
    seen = unet_labels(pipe)
    with pytest.raises(ValueError, match=message) as error:
        generate_digits(pipe, 2, num_inference_steps=1, progress=False, **kwargs)
    assert "\n" not in str(error.value) and seen == []


def test_class_accuracy_is_scored_against_the_labels_asked_for(conditional_dir, real_mnist, monkeypatch):
    reference = QualityReference(real_mnist, 20, progress=False)
    pipe = load_pipeline(conditional_dir)
    labels = balanced_class_labels(20)
    for shift, accuracy in [(0, 1.0), (1, 0.0)]:
        calls = draw_real_digits(monkeypatch, real_mnist, shift)
        samples = generate_digits(pipe, 20, batch_size=8, class_labels=labels, guidance_scale=2.0, progress=False)
        assert [call["class_labels"].tolist() for call in calls] == [labels[i : i + 8].tolist() for i in (0, 8, 16)]
        scores = reference.score_conditional(samples, labels)
        assert scores.accuracy.accuracy == accuracy and scores.accuracy.per_class == [accuracy] * 10
        result = scores.as_dict()
        assert result["class_accuracy"] == accuracy and result["class_accuracy_per_digit"] == [accuracy] * 10
        assert result["fid"] == scores.quality.fid == reference.score(samples).fid and result["num_images"] == 20


def test_a_guidance_sweep_scores_each_scale_on_the_same_balanced_labels(
    pipeline_dir, conditional_dir, real_mnist, monkeypatch
):
    reference = QualityReference(real_mnist, 20, progress=False)
    pipe = load_pipeline(conditional_dir)
    calls = draw_real_digits(monkeypatch, real_mnist)
    sweep = guidance_sweep(pipe, reference, 20, (1.0, 2.5), num_inference_steps=2, progress=False)
    assert list(sweep) == [1.0, 2.5]
    assert [call["guidance_scale"] for call in calls] == [1.0, 2.5]
    assert all(call["class_labels"].tolist() == balanced_class_labels(20).tolist() for call in calls)
    assert all(scores.accuracy.accuracy == 1.0 and math.isfinite(scores.quality.fid) for scores in sweep.values())
    calls.clear()
    with pytest.raises(ValueError, match="guidance_scale must be a number of at least 1"):
        guidance_sweep(pipe, reference, 20, (2.0, 0.5))
    with pytest.raises(ValueError, match="needs a class-conditional pipeline"):
        guidance_sweep(load_pipeline(pipeline_dir), reference, 20)
    assert calls == []  # every scale was checked before the first draw


def test_keep_half_keeps_the_named_half():
    rows, cols = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    expected = {"top": rows < 14, "bottom": rows >= 14, "left": cols < 14, "right": cols >= 14}
    for region, kept in expected.items():
        assert torch.equal(keep_half(region), kept.float()[None, None])
    with pytest.raises(ValueError, match="region 'middle' is not one of top, bottom, left, right"):
        keep_half("middle")


def test_editing_inputs_load_from_png_files_and_test_digit_indexes(mnist_folder, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    image = load_image(tmp_path / "digit.png")
    assert image.mode == "L" and np.array_equal(np.asarray(image), np.asarray(Image.fromarray(pixels).convert("L")))
    (tmp_path / "notes.png").write_text("not an image")
    for path, error_type, message in [
        ("nothing.png", FileNotFoundError, "nothing.png' is not a file"),
        ("notes.png", ValueError, "cannot be read as an image"),
    ]:
        with pytest.raises(error_type, match=f"--image_a '.*{message}"):
            load_image(tmp_path / path, "--image_a")

    def ids(x_0: torch.Tensor) -> list[int]:  # the fixture writes example i's index into its top-left pixel
        return ((x_0[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()

    assert ids(load_test_digits(mnist_folder, [5, 2])) == [5, 2]
    with pytest.raises(ValueError, match="cannot read test digit 40: .*which holds 32"):
        load_test_digits(mnist_folder, [1, 40])
    with pytest.raises(ValueError, match="negative index"):
        load_test_digits(mnist_folder, [-1])
