"""DDPMMnistPipeline: Algorithm 2 of the DDPM paper (Ho et al. 2020) for MNIST digits.

Noise x_T ~ N(0, I) -> for each timestep of the scheduler: eps = UNet(x_t, t), x_{t-1} = scheduler.step(...)
-> x_0 in [-1, 1] -> 28x28 greyscale digits. Any diffusers scheduler compatible with the DDPM schedule can be
swapped in (DDIM, DPM-Solver++, UniPC, Euler, Heun).

This file imports only torch, diffusers and the standard library, and the module beside it that saves and loads the
pipeline with its code (`remote_code_utils.RemoteCodeMixin`), so that both can be copied as they are into a Hub
repository and loaded with `trust_remote_code=True`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .remote_code_utils import RemoteCodeMixin

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

OUTPUT_TYPES = ("pil", "np", "pt")


class DDPMMnistPipeline(RemoteCodeMixin, DiffusionPipeline):
    r"""
    Unconditional generation of MNIST digits with a DDPM.

    `from_pretrained` (a folder or a Hub repo id), `save_pretrained` and `push_to_hub` are diffusers' own, in the
    layout that loads with this package and without it (see [`RemoteCodeMixin`]).

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
    _callback_tensor_inputs = ["image"]

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, image_size: int = 28):
        super().__init__()
        if image_size > unet.config.sample_size:
            raise ValueError(
                f"image_size={image_size} is larger than the UNet's sample_size={unet.config.sample_size}; "
                "pass an image_size no larger than the UNet's sample_size."
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(image_size=image_size)

    @property
    def is_class_conditional(self) -> bool:
        """Whether the UNet takes class labels (its config has `num_class_embeds`)."""
        return self.unet.config.get("num_class_embeds") is not None

    def check_class_inputs(
        self,
        class_labels: list[int] | torch.Tensor | None,
        guidance_scale: float,
        batch_size: int | None,
        guidance_interval: tuple[int, int] | None = None,
    ) -> int:
        """Check the class labels and guidance against the UNet and scheduler; return the batch size they imply.

        Raises a ValueError before any sampling: labels for an unconditional model, a label outside the classes, a
        guidance scale below 1 or without labels, a `guidance_interval` that is not a pair `low <= high` within
        [0, num_train_timesteps], or a `batch_size` that disagrees with the number of labels.
        """
        if not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 1:
            raise ValueError(
                f"guidance_scale must be a number of at least 1 (1 = no guidance), got {guidance_scale!r}."
            )
        if guidance_interval is not None:
            num_train_timesteps = self.scheduler.config.num_train_timesteps
            is_pair = isinstance(guidance_interval, (tuple, list)) and len(guidance_interval) == 2
            if not is_pair or not all(isinstance(t, (int, float)) for t in guidance_interval):
                raise ValueError(
                    f"guidance_interval must be a pair of timesteps (low, high), got {guidance_interval!r}."
                )
            low, high = guidance_interval
            if not 0 <= low <= high <= num_train_timesteps:
                raise ValueError(
                    f"guidance_interval must be timesteps (low, high) with 0 <= low <= high <= {num_train_timesteps}, "
                    f"got {tuple(guidance_interval)}; e.g. (82, 581) guides the middle of the chain only."
                )
        if class_labels is None:
            if guidance_scale > 1:
                raise ValueError(
                    "guidance_scale > 1 needs class_labels to guide toward; pass class_labels, or guidance_scale=1."
                )
            return 1 if batch_size is None else batch_size
        if not self.is_class_conditional:
            raise ValueError(
                "class_labels were given to an unconditional model; load a class-conditional pipeline (its UNet has "
                "num_class_embeds), or leave class_labels out."
            )
        labels = torch.as_tensor(class_labels)
        num_classes = self.unet.config.num_class_embeds
        if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point():
            raise ValueError(f"class_labels must be a non-empty list of integers, got {class_labels!r}.")
        if not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ValueError(f"class_labels must be digits between 0 and {num_classes - 1}, got {labels.tolist()}.")
        if batch_size is not None and batch_size != len(labels):
            raise ValueError(
                f"batch_size={batch_size} disagrees with the {len(labels)} class_labels; pass one of the two, or "
                "as many labels as images."
            )
        return len(labels)

    @staticmethod
    def guidance_at(t: torch.Tensor | int, guidance_scale: float, guidance_interval: tuple[int, int] | None) -> float:
        """The guidance scale at timestep `t`: `guidance_scale` inside `guidance_interval` (inclusive), else 1.

        Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
        Sample and Distribution Quality in Diffusion Models"): off at the highest noise levels, where strong guidance
        pulls every sample of a class toward the same few shapes, and at the lowest, where it no longer changes the
        digit. Without an interval (None) every step is guided. Outside it a step costs one UNet call instead of two.
        """
        if guidance_interval is None:
            return guidance_scale
        low, high = guidance_interval
        return guidance_scale if low <= float(t) <= high else 1.0

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """eps_theta(x_t, t[, y]) in float32, with classifier-free guidance when `guidance_scale > 1`.

        Guidance (Ho & Salimans 2022, eq. 6, in `DiTPipeline`'s form): eps = eps(x_t, null) + s (eps(x_t, y) -
        eps(x_t, null)), the conditional and the null batch in one UNet call. `x_t` is float32; the UNet sees a copy
        in its own dtype.
        """
        model_input = x_t.to(self.unet.dtype)
        if class_labels is None or guidance_scale <= 1:
            # No labels: called as diffusers calls an unconditional UNet, so that any UNet of that signature serves.
            labels = {} if class_labels is None else {"class_labels": class_labels}
            return self.unet(model_input, t, **labels).sample.float()
        null = torch.full_like(class_labels, self.unet.config.num_class_embeds)
        model_input = torch.cat([model_input, model_input])
        eps = self.unet(model_input, t, class_labels=torch.cat([class_labels, null])).sample.float()
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def check_inputs(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Raise a ValueError naming the bad argument before any sampling starts."""
        unknown = sorted(set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not tensors of this pipeline; pass a subset of "
                f"{self._callback_tensor_inputs}."
            )
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
        batch_size: int | None = None,
        class_labels: list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[int, int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Sample digits by running the reverse process from pure noise (Algorithm 2), optionally of requested classes.

        Precision: the UNet runs in its own dtype, while x_t, the noise and every scheduler update stay in float32.
        On hardware with native bf16 (a CPU with AVX512-BF16 or AMX, a recent GPU) ask for a bf16 UNet with
        `DDPMMnistPipeline.from_pretrained(path, dtype=torch.bfloat16)` (diffusers' older name: `torch_dtype`) or
        `pipe.to(torch.bfloat16)`: it samples faster from the same noise, with digits that score like float32 ones
        (benchmarks/README.md).

        Args:
            batch_size (`int`, *optional*):
                The number of digits to generate: by default one per class label, or 1 without labels.
            class_labels (`list[int]` or `torch.Tensor`, *optional*):
                The digit (0-9) to draw for each image, for a class-conditional pipeline (`is_class_conditional`).
                Without labels a conditional model draws any digit (its null class).
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance scale, as in `DiTPipeline`: guidance is on when it is above 1; higher values
                draw more clearly the requested digit at some cost in variety.
            guidance_interval (`tuple[int, int]`, *optional*):
                Guide only the steps whose timestep t lies in `[low, high]` (of the scheduler's `num_train_timesteps`,
                high t = much noise); the other steps use the conditional prediction alone, at one UNet call.
                Kynkäänniemi et al. 2024 find guidance at the noisiest steps costs variety and at the last ones does
                little. By default every step is guided. Unlike the `start`/`stop` of diffusers' guiders, which count
                denoising steps, the interval names noise levels, so it means the same at any `num_inference_steps`
                and with any scheduler.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic. With a list (one per image), image i is the image that a batch of
                one would give with generator i.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The number of denoising steps, at most the scheduler's `num_train_timesteps`. The default follows
                diffusers' `DDPMPipeline`: the paper's whole chain. Fewer steps respace it (`timestep_spacing`).
                Both released models' cards recommend diffusers' UniPC on 20 steps, measured against the other
                schedulers and step counts:
                `pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)`, then
                `num_inference_steps=20`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (greyscale `PIL.Image`s, mode "L"), `"np"` (an array of shape (N, 28, 28, 1) in [0, 1])
                or `"pt"` (a tensor of shape (N, 1, 28, 28) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called after every step as `callback_on_step_end(pipe, i, t, callback_kwargs)`, diffusers' callback
                convention: `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (here
                `"image"`, the current x_{t-1} in the model's space), and the dict it returns replaces them.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["image"]`):
                The tensors handed to `callback_on_step_end`.

        Example:

        ```py
        >>> import torch
        >>> from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet

        >>> pipe = DDPMMnistPipeline(DDPMMnistUNet.from_preset("tiny"), DDPMMnistScheduler())
        >>> images = pipe(batch_size=4, num_inference_steps=10, output_type="np").images
        >>> images.shape
        (4, 28, 28, 1)
        >>> pipe = pipe.to(torch.bfloat16)  # a bf16 UNet; x_t and the scheduler stay float32
        >>> pipe(batch_size=4, num_inference_steps=10, output_type="pt").images.dtype
        torch.float32
        ```

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images, as `.images` or as the tuple's only item.
        """
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["image"]
        batch_size = self.check_class_inputs(class_labels, guidance_scale, batch_size, guidance_interval)
        self.check_inputs(batch_size, generator, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        sample_size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, sample_size, sample_size)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=device).long()

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # x_T ~ N(0, I), scaled for schedulers that work in sigma space (Euler, Heun), whose
        # `init_noise_sigma` depends on the timesteps just set. x_t and the scheduler's arithmetic (eq. 11's update,
        # the posterior variance of eq. 7) stay in float32 whatever the UNet's dtype: a bf16 UNet sees a bf16 copy.
        image = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        image = image * self.scheduler.init_noise_sigma
        image = self.denoise(
            image,
            self.scheduler.timesteps,
            class_labels,
            guidance_scale,
            generator,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            guidance_interval=guidance_interval,
        )
        image = self.postprocess(image, output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def denoise(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("image",),
        progress: bool = True,
        guidance_interval: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The reverse process over `timesteps` (the scheduler's, already set, or their tail): x_t -> x_0, float32.

        `progress=False` hides the progress bar, for a caller that runs several passes under a bar of its own. Steps
        outside `guidance_interval` are unguided (see `guidance_at`).
        """
        # UniPC and a few others draw no noise and take no generator.
        extra_step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra_step_kwargs["generator"] = generator
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            model_input = self.scheduler.scale_model_input(x_t, t)
            scale = self.guidance_at(t, guidance_scale, guidance_interval)
            model_output = self.predict_noise(model_input, t, class_labels, scale)
            x_t = self.scheduler.step(model_output, t, x_t, **extra_step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"image": x_t}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                x_t = outputs.get("image", x_t)
        return x_t

    def postprocess(
        self, x_0: torch.Tensor, output_type: str = "pil"
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """x_0 in [-1, 1] -> digits in [0, 1]: the centre `image_size` crop, as `output_type` ("pil", "np", "pt")."""
        # Crop the padding a 32x32 model was trained with, then map [-1, 1] to [0, 1].
        border = (self.unet.config.sample_size - self.config.image_size) // 2
        image = x_0[:, :, border : border + self.config.image_size, border : border + self.config.image_size]
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        return image
