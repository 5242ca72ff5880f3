"""Tests for `DDPMMnistPipeline`: outputs, determinism, scheduler swaps, save/load and bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from tests.utils import OracleUNet, tiny_unet

SWAPPED_SCHEDULERS = [
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
]


@pytest.fixture
def pipe() -> DDPMMnistPipeline:
    pipeline = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipe: DDPMMnistPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs = {"batch_size": 2, "num_inference_steps": 5, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_output_types(pipe):
    pil = sample(pipe, output_type="pil")
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.mode == "L" for im in pil)
    assert pil[0].size == (28, 28)
    np_images = sample(pipe)
    assert np_images.shape == (2, 28, 28, 1) and np_images.dtype == np.float32
    assert 0.0 <= np_images.min() and np_images.max() <= 1.0
    pt = sample(pipe, output_type="pt")
    assert pt.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_images[0, :, :, 0] * 255).round().astype(np.uint8))
    (images,) = pipe(batch_size=1, num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (1, 28, 28, 1)


def test_same_seed_same_images_different_seed_different_images(pipe):
    np.testing.assert_array_equal(sample(pipe, seed=3), sample(pipe, seed=3))
    assert not np.allclose(sample(pipe, seed=3), sample(pipe, seed=4))


def test_generator_list_gives_each_image_its_single_image_result(pipe):
    seeds = [11, 12, 13]
    batch = pipe(
        batch_size=3,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=5,
        output_type="np",
    ).images
    for i, seed in enumerate(seeds):
        np.testing.assert_allclose(batch[i : i + 1], sample(pipe, seed=seed, batch_size=1), atol=1e-5)


def test_step_end_callback_sees_every_step_and_can_replace_the_image(pipe):
    seen = []

    def record(pipeline, i, t, tensors):
        seen.append((i, int(t), tensors["image"].clone()))
        return {}

    final = sample(pipe, output_type="pt", callback_on_step_end=record)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(pipe.scheduler.timesteps.tolist()))
    # After the last step the callback holds x_0 in [-1, 1]; the output is that image mapped to [0, 1].
    torch.testing.assert_close(final, (seen[-1][2].clamp(-1, 1) + 1) / 2)
    # What the callback returns replaces the image for the next step: zeroing x_t at the last step gives grey digits.
    zeroed = sample(pipe, callback_on_step_end=lambda p, i, t, x: {"image": torch.zeros_like(x["image"])})
    np.testing.assert_allclose(zeroed, 0.5)


def test_progress_bar_is_configurable(pipe, capsys):
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    sample(pipe, num_inference_steps=3)
    assert "denoising" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler_class", [DDPMMnistScheduler, *SWAPPED_SCHEDULERS])
def test_every_compatible_scheduler_recovers_x0_with_an_oracle_denoiser(scheduler_class):
    """With the exact noise of a one-image data set, any correct scheduler must land on that image.

    This fails if the pipeline skips `scale_model_input` (Euler, Heun) or misuses `step`.
    """
    scheduler = scheduler_class.from_config(DDPMMnistScheduler().config)
    x_0 = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = OracleUNet().set_target(x_0, DDPMMnistScheduler().alphas_cumprod)
    pipe = DDPMMnistPipeline(oracle, scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="pt")
    expected = (x_0 / 2 + 0.5).clamp(0, 1).expand(4, -1, -1, -1)
    torch.testing.assert_close(images.images, expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("scheduler_class", [DDPMMnistScheduler, *SWAPPED_SCHEDULERS])
def test_every_scheduler_starts_the_network_from_unit_variance_noise(scheduler_class):
    """x_T must be scaled by `init_noise_sigma` (diffusers' DDPMPipeline forgets it, which breaks Euler)."""
    oracle = OracleUNet().set_target(torch.zeros(1, 1, 28, 28), DDPMMnistScheduler().alphas_cumprod)
    pipe = DDPMMnistPipeline(oracle, scheduler_class.from_config(DDPMMnistScheduler().config))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=16, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="pt")
    assert abs(oracle.inputs[0].std().item() - 1.0) < 0.03


@pytest.mark.parametrize("scheduler_class", SWAPPED_SCHEDULERS)
def test_swapped_scheduler_is_deterministic(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    first = sample(pipe, seed=5, num_inference_steps=4)
    np.testing.assert_array_equal(first, sample(pipe, seed=5, num_inference_steps=4))
    assert np.isfinite(first).all()


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    for name in (
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.rglob("*.bin")), "only safetensors weights are written"
    loaded = DDPMMnistPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    # Equal up to float rounding: weights read back from a memory-mapped file can take another CPU kernel path.
    np.testing.assert_allclose(sample(loaded, seed=7), sample(pipe, seed=7), atol=1e-5, rtol=0)


def test_padded_model_returns_28x28_digits_and_remembers_it(tmp_path):
    unet = tiny_unet(sample_size=32, attention_resolutions=(16,))
    pipe = DDPMMnistPipeline(unet, DDPMMnistScheduler())
    pipe.set_progress_bar_config(disable=True)
    full = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="pt")
    assert full.images.shape == (1, 1, 28, 28)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["image_size"] == 28
    loaded = DDPMMnistPipeline.from_pretrained(tmp_path)
    assert loaded.config.image_size == 28
    loaded.set_progress_bar_config(disable=True)
    again = loaded(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(again.images, full.images, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer between 1 and 1000"),
        ({"num_inference_steps": 1001}, "num_inference_steps must be an integer between 1 and 1000"),
        ({"output_type": "latent"}, "output_type must be one of pil, np, pt"),
        ({"batch_size": 2, "generator": [torch.Generator()]}, "one generator per image"),
        ({"callback_on_step_end_tensor_inputs": ["latents"]}, r"\['latents'\] are not tensors of this pipeline"),
    ],
)
def test_bad_input_raises_before_sampling(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_image_size_larger_than_the_model_is_refused():
    with pytest.raises(ValueError, match="larger than the UNet's sample_size"):
        DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(), image_size=32)


@pytest.mark.parametrize(
    "missing",
    ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"],
)
def test_incomplete_folder_names_the_missing_file(pipe, tmp_path, missing):
    pipe.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(OSError, match=f"missing {missing}"):
        DDPMMnistPipeline.from_pretrained(tmp_path)


def test_bf16_unet_keeps_x_t_and_the_scheduler_in_float32(pipe):
    """A bf16 UNet gets a bf16 copy of x_t, but every x_t update (eq. 11) and its noise stay float32."""
    reference = sample(pipe, seed=2, output_type="pt")
    unet_inputs, steps = [], []
    pipe.to(torch.bfloat16)
    pipe.unet.register_forward_pre_hook(lambda module, args: unet_inputs.append(args[0].dtype))

    def record(pipeline, i, t, tensors):
        steps.append(tensors["image"].dtype)
        return {}

    images = sample(pipe, seed=2, output_type="pt", callback_on_step_end=record)
    assert pipe.unet.dtype == torch.bfloat16
    assert unet_inputs == [torch.bfloat16] * 5
    assert steps == [torch.float32] * 5
    assert images.dtype == torch.float32
    # Same noise, so the digits differ only by the UNet's bf16 rounding (8 bits of mantissa: ~0.4% per value).
    difference = (images - reference).abs()
    assert difference.max() < 0.1 and difference.mean() < 0.005
    assert not torch.equal(images, reference), "the UNet did not run in bf16"
