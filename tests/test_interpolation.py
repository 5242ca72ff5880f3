"""Tests for `ddpm_mnist.interpolate`: the DDPM paper's interpolation through x_t (section 4.4)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, interpolate
from tests.utils import tiny_unet


@pytest.fixture
def pipe() -> DDPMMnistPipeline:
    pipeline = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def two_digits() -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.rand(2, 1, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return a, b


def decode_alone(pipe: DDPMMnistPipeline, x_0: torch.Tensor, noise: torch.Tensor, t: int, timesteps, state):
    """x_t ~ q(x_t | x_0) with the given noise (eq. 4), decoded over `timesteps` by a generator in `state`."""
    alpha_bar = pipe.scheduler.alphas_cumprod[t]
    x_t = alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise
    x_0 = pipe.denoise(x_t, timesteps, generator=torch.Generator().set_state(state))
    return pipe.postprocess(x_0, "pt")


@pytest.mark.parametrize(("t", "num_inference_steps", "start"), [(7, None, 7), (130, 10, 100)])
def test_the_ends_are_each_digit_decoded_alone_with_the_same_noise(pipe, t, num_inference_steps, start):
    a, b = two_digits()
    row = interpolate(
        pipe,
        a,
        b,
        t=t,
        lambdas=[0.0, 0.5, 1.0],
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    # The documented draws: the encoder noise of both digits first, then the reverse process's.
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 1, 28, 28, generator=generator)
    state = generator.get_state()
    pipe.scheduler.set_timesteps(num_inference_steps or 1000)
    timesteps = pipe.scheduler.timesteps[pipe.scheduler.timesteps <= start]
    assert int(timesteps[0]) == start
    torch.testing.assert_close(row[0:1], decode_alone(pipe, a, noise[0:1], start, timesteps, state), atol=1e-5, rtol=0)
    torch.testing.assert_close(row[2:3], decode_alone(pipe, b, noise[1:2], start, timesteps, state), atol=1e-5, rtol=0)
    assert not torch.allclose(row[1], row[0], atol=1e-3) and not torch.allclose(row[1], row[2], atol=1e-3)


def test_the_row_changes_only_with_lambda(pipe):
    """Equal lambdas give equal images: the reverse noise is the same for every image of the row."""
    a, b = two_digits()
    row = interpolate(pipe, a, b, t=5, lambdas=[0.3, 0.3, 0.7], generator=torch.Generator().manual_seed(2)).images
    assert np.array_equal(np.asarray(row[0]), np.asarray(row[1]))
    assert not np.array_equal(np.asarray(row[0]), np.asarray(row[2]))


def test_one_image_per_lambda_in_every_output_type(pipe):
    a, b = two_digits()
    default = interpolate(pipe, a, b, t=3, generator=torch.Generator().manual_seed(0)).images
    assert len(default) == 11 and all(isinstance(image, Image.Image) and image.size == (28, 28) for image in default)
    arrays = interpolate(pipe, a, b, t=3, lambdas=[0, 1], output_type="np").images
    assert arrays.shape == (2, 28, 28, 1)


def test_pil_and_tensor_inputs_agree(pipe):
    pixels = torch.randint(0, 256, (2, 28, 28), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    a, b = (Image.fromarray(p.numpy()) for p in pixels)
    kwargs = {"t": 4, "lambdas": [0.0, 0.4], "output_type": "np"}
    from_pil = interpolate(pipe, a, b, generator=torch.Generator().manual_seed(0), **kwargs).images
    tensors = pixels[:, None, None] / 127.5 - 1
    from_tensors = interpolate(pipe, *tensors, generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(from_pil, from_tensors)


def test_ddim_and_class_labels_with_guidance_run():
    pipe = DDPMMnistPipeline(tiny_unet(num_class_embeds=10), DDIMScheduler.from_config(DDPMMnistScheduler().config))
    pipe.set_progress_bar_config(disable=True)
    a, b = two_digits()
    row = interpolate(pipe, a, b, t=400, lambdas=[0, 1], num_inference_steps=10, class_labels=3, guidance_scale=2.0)
    assert len(row.images) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"t": 1000}, r"t must be an integer timestep between 0 and 999"),
        ({"t": -1}, r"t must be an integer timestep between 0 and 999"),
        ({"t": 2.5}, r"t must be an integer timestep"),
        ({"lambdas": [0.0, 1.5]}, r"lambdas must be a non-empty sequence of numbers in \[0, 1\]"),
        ({"lambdas": []}, r"lambdas must be a non-empty sequence"),
        ({"lambdas": ["a"]}, r"lambdas must be a non-empty sequence"),
        ({"image_b": torch.zeros(2, 1, 28, 28)}, r"must be one digit each, got 3 digits"),
        ({"image_b": torch.full((1, 1, 28, 28), 3.0)}, r"image_b must lie in \[-1, 1\]"),
        ({"class_labels": 3}, r"class_labels were given to an unconditional model"),
        ({"num_inference_steps": 0}, r"num_inference_steps must be"),
        ({"output_type": "jpg"}, r"output_type must be"),
        ({"generator": [torch.Generator()]}, r"generator must be one torch.Generator"),
    ],
)
def test_bad_input_is_refused_in_one_line(pipe, kwargs, match):
    a, b = two_digits()
    kwargs = {"image_a": a, "image_b": b, **kwargs}
    pipe.unet.forward = None  # any UNet call would fail with another error
    with pytest.raises(ValueError, match=match) as error:
        interpolate(pipe, **kwargs)
    assert "\n" not in str(error.value)


def test_multistep_scheduler_is_refused(pipe):
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"DDPMMnistScheduler.from_config"):
        interpolate(pipe, *two_digits())
