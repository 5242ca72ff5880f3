"""DDPMMnistPipeline: Algorithm 2 of the DDPM paper (Ho et al. 2020) for MNIST digits.

Noise x_T ~ N(0, I) -> for each timestep of the scheduler: eps = UNet(x_t, t), x_{t-1} = scheduler.step(...)
-> x_0 in [-1, 1] -> 28x28 greyscale digits. Any diffusers scheduler compatible with the DDPM schedule can be
swapped in (DDIM, DPM-Solver++, UniPC, Euler, Heun).

This file imports only torch, diffusers and the standard library, so that it can be copied as-is into a Hub
repository and loaded with `trust_remote_code=True`.
"""

from __future__ import annotations

import inspect
import os

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")

# Files a saved pipeline folder must hold for `from_pretrained` to rebuild it.
REQUIRED_FILES = (
    "model_index.json",
    os.path.join("unet", "config.json"),
    os.path.join("unet", "diffusion_pytorch_model.safetensors"),
    os.path.join("scheduler", "scheduler_config.json"),
)


class DDPMMnistPipeline(DiffusionPipeline):
    r"""
    Unconditional generation of MNIST digits with a DDPM.

    Parameters:
        unet ([`DDPMMnistUNet`]):
            The noise-prediction network eps_theta(x_t, t).
        scheduler ([`SchedulerMixin`]):
            The reverse process: [`DDPMMnistScheduler`] or any compatible diffusers scheduler.
        image_size (`int`, *optional*, defaults to 28):
            The side of the digits. A UNet whose `sample_size` is larger was trained on digits padded with the
            background value; the pipeline crops the centre `image_size` pixels back out. Saved in
            `model_index.json`, so a loaded pipeline crops the same way.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, image_size: int = 28):
        super().__init__()
        if image_size > unet.config.sample_size:
            raise ValueError(
                f"image_size={image_size} is larger than the UNet's sample_size={unet.config.sample_size}; "
                "pass an image_size no larger than the UNet's sample_size."
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(image_size=image_size)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DDPMMnistPipeline:
        """Load a saved pipeline; a local folder is checked for its files first, so a gap names itself."""
        if os.path.isdir(pretrained_model_name_or_path):
            missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(pretrained_model_name_or_path, f))]
            if missing:
                raise OSError(
                    f"{pretrained_model_name_or_path} is not a complete DDPMMnistPipeline folder: missing "
                    f"{', '.join(missing)}. Point to a folder written by `pipeline.save_pretrained(...)`."
                )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def check_inputs(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        output_type: str,
    ) -> None:
        """Raise a ValueError naming the bad argument before any sampling starts."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be an integer between 1 and {num_train_timesteps} (the number of "
                f"training timesteps), got {num_inference_steps!r}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for batch_size={batch_size}; pass one generator "
                "per image, or a single generator."
            )

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Sample digits by running the reverse process from pure noise (Algorithm 2).

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                The number of digits to generate.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic. With a list (one per image), image i is the image that a batch of
                one would give with generator i.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The number of denoising steps, at most the scheduler's `num_train_timesteps`. DDPM needs all
                1000; DDIM, DPM-Solver++ or UniPC give good digits in 20-50.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (greyscale `PIL.Image`s, mode "L"), `"np"` (an array of shape (N, 28, 28, 1) in [0, 1])
                or `"pt"` (a tensor of shape (N, 1, 28, 28) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] rather than a tuple.

        Example:

        ```py
        >>> from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet

        >>> pipe = DDPMMnistPipeline(DDPMMnistUNet.from_preset("tiny"), DDPMMnistScheduler())
        >>> images = pipe(batch_size=4, num_inference_steps=10, output_type="np").images
        >>> images.shape
        (4, 28, 28, 1)
        ```

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images, as `.images` or as the tuple's only item.
        """
        self.check_inputs(batch_size, generator, num_inference_steps, output_type)
        device = self._execution_device
        sample_size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, sample_size, sample_size)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # x_T ~ N(0, I), scaled for schedulers that work in sigma space (Euler, Heun), whose
        # `init_noise_sigma` depends on the timesteps just set.
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma
        # UniPC and a few others draw no noise and take no generator.
        extra_step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra_step_kwargs["generator"] = generator

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(image, t)
            model_output = self.unet(model_input, t).sample
            image = self.scheduler.step(model_output, t, image, **extra_step_kwargs).prev_sample

        # Crop the padding a 32x32 model was trained with, then map [-1, 1] to [0, 1].
        border = (sample_size - self.config.image_size) // 2
        image = image[:, :, border : border + self.config.image_size, border : border + self.config.image_size]
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
