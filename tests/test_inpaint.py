"""Tests for `DDPMMnistInpaintPipeline` (RePaint): the known pixels, the jump schedule, inputs, guidance, schedulers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from PIL import Image

from ddpm_mnist import DDPMMnistInpaintPipeline, DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.data import decode_labels, load_image_stream, load_x_0
from ddpm_mnist.metrics.classifier import load_mnist_classifier
from ddpm_mnist.metrics.quality import classifier_outputs
from ddpm_mnist.pipeline_ddpm_mnist_inpaint import jump_schedule
from tests.utils import OracleUNet, tiny_unet

RELEASE = Path(__file__).resolve().parents[1] / "pretrained" / "ddpm-mnist-small"


@pytest.fixture
def inpaint() -> DDPMMnistInpaintPipeline:
    pipeline = DDPMMnistInpaintPipeline(**DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler()).components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def digits(n: int = 2, seed: int = 0) -> torch.Tensor:
    """n random digits x_0 (n, 1, 28, 28) in [-1, 1], on the 8-bit grid so that PIL images hold them exactly."""
    pixels = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    return pixels / 127.5 - 1


def keep_top_half() -> torch.Tensor:
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :14, :] = 1
    return mask


def complete(pipe: DDPMMnistInpaintPipeline, image, mask, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": 6, "jump_length": 2, "jump_n_sample": 2, "output_type": "pt", **kwargs}
    return pipe(image, mask, generator=torch.Generator().manual_seed(seed), **kwargs).images


class CountingOracle(OracleUNet):
    """`OracleUNet` (exact noise for one image) that also takes class labels and records the ones it is given."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor | None = None):
        self.labels = getattr(self, "labels", []) + [class_labels]
        return super().forward(sample, timestep)


def test_known_pixels_are_the_input_exactly_and_the_rest_is_filled_in(inpaint):
    x_0 = digits(3)
    images = complete(inpaint, x_0, keep_top_half())
    assert images.shape == (3, 1, 28, 28)
    assert torch.equal(images[..., :14, :], (x_0 / 2 + 0.5)[..., :14, :])
    assert not torch.allclose(images[..., 14:, :], (x_0 / 2 + 0.5)[..., 14:, :], atol=0.05)


def test_mask_keeping_everything_returns_the_input(inpaint):
    x_0 = digits(2)
    images = complete(inpaint, x_0, torch.ones(2, 1, 28, 28), output_type="np")
    np.testing.assert_array_equal(images, (x_0 / 2 + 0.5).permute(0, 2, 3, 1).numpy())


def test_jump_schedule_by_hand():
    # States 4..0 over timesteps 750, 500, 250, 0 and x_0 (-1); jump points 0 and 2, each left twice in all.
    assert jump_schedule([750, 500, 250, 0], 2, 2) == [[750, 500, 250], [750, 500, 250, 0, -1], [250, 0, -1]]
    # No resampling: one pass down the chain.
    assert jump_schedule([750, 500, 250, 0], 2, 1) == [[750, 500, 250, 0, -1]]
    # A jump as long as the chain: the whole chain three times.
    assert jump_schedule([750, 500, 250, 0], 4, 3) == [[750, 500, 250, 0, -1]] * 3
    # 5 steps, jump_length 2: jump points 0 and 2 (state 4 + 2 > 5), each left twice for 2 steps back, and the top
    # step taken once: 5 + 2 * 2 * 2 calls.
    passes = jump_schedule([800, 600, 400, 200, 0], 2, 3)
    assert passes[0] == [800, 600, 400, 200] and sum(len(p) - 1 for p in passes) == 13
    # 10 steps in stretches of 5 taken 4 times: 40 calls.
    assert sum(len(p) - 1 for p in jump_schedule(list(range(900, -1, -100)), 5, 4)) == 40


@pytest.mark.parametrize(
    ("steps", "jump_length", "jump_n_sample", "calls"),
    # By default jump_length is a fifth of the steps (at least 1): 2 of 10 (jump points 0, 2, 4, 6, 8), 1 of 4.
    [(6, 2, 2, 12), (6, 3, 1, 6), (5, 2, 3, 13), (4, 4, 3, 12), (10, None, 2, 20), (4, None, 3, 12)],
)
def test_the_unet_is_called_once_per_step_of_the_jump_schedule(steps, jump_length, jump_n_sample, calls):
    oracle = CountingOracle().set_target(torch.zeros(1, 1, 28, 28), DDPMMnistScheduler().alphas_cumprod)
    pipe = DDPMMnistInpaintPipeline(oracle, DDPMMnistScheduler())
    pipe.set_progress_bar_config(disable=True)
    seen = []
    complete(
        pipe,
        digits(1),
        keep_top_half(),
        num_inference_steps=steps,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        callback_on_step_end=lambda pipe, i, t, tensors: seen.append(i) or {},
    )
    assert len(oracle.inputs) == calls and seen == list(range(calls))


@pytest.mark.parametrize("scheduler_class", [DDPMMnistScheduler, DDPMScheduler, DDIMScheduler])
def test_an_oracle_for_the_whole_digit_completes_it(scheduler_class):
    """With the exact noise of a one-digit data set, the filled-in half must become that digit's other half."""
    x_0 = digits(1)
    oracle = CountingOracle().set_target(x_0, DDPMMnistScheduler().alphas_cumprod)
    pipe = DDPMMnistInpaintPipeline(oracle, scheduler_class.from_config(DDPMMnistScheduler().config))
    pipe.set_progress_bar_config(disable=True)
    images = complete(pipe, x_0, keep_top_half(), num_inference_steps=10)
    torch.testing.assert_close(images, x_0 / 2 + 0.5, atol=2e-3, rtol=0)


def test_pil_and_tensor_inputs_agree(inpaint):
    x_0 = digits(2)
    pil_digits = [Image.fromarray(((d[0] + 1) * 127.5).round().to(torch.uint8).numpy()) for d in x_0]
    pil_mask = Image.fromarray((keep_top_half()[0, 0] * 255).to(torch.uint8).numpy())
    from_tensors = complete(inpaint, x_0, keep_top_half(), output_type="np")
    from_pil = complete(inpaint, pil_digits, pil_mask, output_type="np")
    np.testing.assert_array_equal(from_tensors, from_pil)
    # PIL out: the kept pixels are the input's 8-bit values.
    out = complete(inpaint, pil_digits[0], pil_mask, output_type="pil")[0]
    assert out.mode == "L" and out.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(out)[:14], np.asarray(pil_digits[0])[:14])


def test_other_pil_modes_and_sizes_are_converted(inpaint):
    rgb = Image.new("RGB", (56, 56), (255, 255, 255))
    images = complete(inpaint, rgb, Image.new("L", (56, 56), 255))
    assert torch.equal(images, torch.ones(1, 1, 28, 28))


def test_generator_list_gives_each_image_its_single_image_result(inpaint):
    x_0 = digits(2)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    settings = {"num_inference_steps": 4, "jump_length": 2, "jump_n_sample": 2, "output_type": "pt"}
    batch = inpaint(x_0, keep_top_half(), generator=generators, **settings).images
    alone = inpaint(x_0[1:], keep_top_half(), generator=torch.Generator().manual_seed(4), **settings).images
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)


def test_padded_model_keeps_the_background_border_and_returns_28x28_digits():
    pipe = DDPMMnistInpaintPipeline(tiny_unet(sample_size=32, attention_resolutions=(16,)), DDPMMnistScheduler())
    pipe.set_progress_bar_config(disable=True)
    x_0 = digits(1)
    last = []
    images = complete(
        pipe, x_0, keep_top_half(), callback_on_step_end=lambda p, i, t, tensors: last.append(tensors) or {}
    )
    assert images.shape == (1, 1, 28, 28) and torch.equal(images[..., :14, :], (x_0 / 2 + 0.5)[..., :14, :])
    final = last[-1]["image"]  # x_0 at 32x32: the digit padded with the background, -1, as in training
    assert final.shape == (1, 1, 32, 32) and torch.equal(final[..., 2:16, 2:30], x_0[..., :14, :])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((final[0, 0][border] == -1).all())


def test_guidance_reaches_the_unet_with_the_labels_and_the_null_class():
    oracle = CountingOracle().set_target(torch.zeros(1, 1, 28, 28), DDPMMnistScheduler().alphas_cumprod)
    oracle.register_to_config(num_class_embeds=10)
    pipe = DDPMMnistInpaintPipeline(oracle, DDPMMnistScheduler())
    pipe.set_progress_bar_config(disable=True)
    complete(pipe, digits(2), keep_top_half(), class_labels=[3, 7], guidance_scale=2.0)
    assert len(oracle.labels) == 12 and all(labels.tolist() == [3, 7, 10, 10] for labels in oracle.labels)


def test_guidance_in_an_interval_reaches_the_unet_only_at_its_timesteps():
    oracle = CountingOracle().set_target(torch.zeros(1, 1, 28, 28), DDPMMnistScheduler().alphas_cumprod)
    oracle.register_to_config(num_class_embeds=10)
    pipe = DDPMMnistInpaintPipeline(oracle, DDPMMnistScheduler())
    pipe.set_progress_bar_config(disable=True)
    timesteps = []
    record = lambda pipe, i, t, tensors: timesteps.append(int(t)) or tensors  # noqa: E731
    kwargs = dict(class_labels=[3, 7], guidance_scale=2.0, guidance_interval=(300, 700), callback_on_step_end=record)
    complete(pipe, digits(2), keep_top_half(), **kwargs)
    assert len(oracle.labels) == len(timesteps) == 12 and 0 < sum(300 <= t <= 700 for t in timesteps) < 12
    for t, labels in zip(timesteps, oracle.labels, strict=True):
        assert labels.tolist() == ([3, 7, 10, 10] if 300 <= t <= 700 else [3, 7])


def test_guidance_runs_with_a_conditional_tiny_unet():
    pipe = DDPMMnistInpaintPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler())
    pipe.set_progress_bar_config(disable=True)
    x_0 = digits(2)
    guided = complete(pipe, x_0, keep_top_half(), class_labels=[3, 7], guidance_scale=3.0)
    plain = complete(pipe, x_0, keep_top_half(), class_labels=[3, 7])
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
    assert torch.equal(guided[..., :14, :], (x_0 / 2 + 0.5)[..., :14, :])


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_multistep_schedulers_are_refused_with_the_fix(inpaint, scheduler_class):
    inpaint.scheduler = scheduler_class.from_config(inpaint.scheduler.config)
    with pytest.raises(ValueError, match=r"DDPMMnistScheduler.from_config\(pipe.scheduler.config\)") as error:
        complete(inpaint, digits(1), keep_top_half())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("image", "mask", "kwargs", "match"),
    [
        (torch.zeros(1, 28, 28), torch.ones(1, 1, 28, 28), {}, r"image must be a tensor of shape"),
        (torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 28, 28), {}, r"image must be a tensor of shape"),
        (torch.full((1, 1, 28, 28), 255.0), torch.ones(1, 1, 28, 28), {}, r"image must lie in \[-1, 1\]"),
        (torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 2.0), {}, r"mask_image must lie in \[0, 1\]"),
        (torch.zeros(1, 1, 28, 28), torch.ones(1, 28, 28), {}, r"mask_image must be a tensor of shape"),
        (np.zeros((28, 28)), torch.ones(1, 1, 28, 28), {}, r"image must be a PIL image"),
        ([], torch.ones(1, 1, 28, 28), {}, r"image must be a PIL image"),
        (torch.zeros(3, 1, 28, 28), torch.ones(2, 1, 28, 28), {}, r"got 2 masks for 3 images"),
        (torch.zeros(2, 1, 28, 28), torch.ones(1, 1, 28, 28), {"class_labels": [1]}, r"class_labels were given"),
        (torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28), {"jump_length": 0}, r"jump_length must be"),
        (torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28), {"jump_length": 7}, r"jump_length must be"),
        (
            torch.zeros(1, 1, 28, 28),
            torch.ones(1, 1, 28, 28),
            {"jump_length": 2, "jump_n_sample": 0},
            r"jump_n_sample must be",
        ),
        (torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28), {"num_inference_steps": 0}, r"num_inference_steps"),
        (torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28), {"output_type": "jpg"}, r"output_type must be"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_sampling(inpaint, image, mask, kwargs, match):
    inpaint.unet.forward = None  # any UNet call would fail with another error
    with pytest.raises(ValueError, match=match) as error:
        inpaint(image, mask, num_inference_steps=kwargs.pop("num_inference_steps", 6), **kwargs)
    assert "\n" not in str(error.value)


def test_class_labels_must_match_the_images():
    pipe = DDPMMnistInpaintPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler())
    with pytest.raises(ValueError, match="got 1 class_labels for 2 images; pass one label per image"):
        pipe(digits(2), keep_top_half(), class_labels=[1])


def test_release_completes_the_top_half_of_test_digits_as_the_same_digit(real_mnist):
    """The trained release fills in the bottom half of real test digits so that the classifier reads the digit.

    An untrained UNet fills it with noise: its completions read as the original digit far less often (checked here).
    """
    count = 8
    x_0 = load_x_0(real_mnist, "test", count)
    labels = decode_labels(load_image_stream(real_mnist, "test", label_column="label"))[:count]
    release = DDPMMnistPipeline.from_pretrained(RELEASE)
    classifier = load_mnist_classifier()

    def accuracy(unet) -> float:
        pipe = DDPMMnistInpaintPipeline(unet, release.scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = complete(pipe, x_0, keep_top_half(), num_inference_steps=25, jump_length=5, jump_n_sample=2)
        return (classifier_outputs(images, classifier, progress=False).logits.argmax(1) == labels).float().mean().item()

    assert accuracy(release.unet) >= 6 / 8
    assert accuracy(tiny_unet()) <= 4 / 8


def test_the_inpainting_pipeline_loads_a_saved_pipeline_folder(tmp_path):
    DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler()).save_pretrained(tmp_path / "pipe")
    loaded = DDPMMnistInpaintPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is DDPMMnistInpaintPipeline
    assert type(DDPMMnistPipeline.from_pretrained(tmp_path / "pipe")) is DDPMMnistPipeline
