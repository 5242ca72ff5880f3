"""DDPMMnistPipeline: Algorithm 2 of the DDPM paper (Ho et al. 2020) for MNIST digits.

Noise x_T ~ N(0, I) -> for each timestep of the scheduler: eps = UNet(x_t, t), x_{t-1} = scheduler.step(...)
-> x_0 in [-1, 1] -> 28x28 greyscale digits. This file imports only torch, diffusers, the standard library and the
module beside it (`remote_code_utils`), so that both load with `trust_remote_code=True` without the package.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .remote_code_utils import RemoteCodeMixin

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

OUTPUT_TYPES = ("pil", "np", "pt")


class DDPMMnistPipeline(RemoteCodeMixin, DiffusionPipeline):
    r"""
    Unconditional generation of MNIST digits with a DDPM.

    `from_pretrained` (a folder or a Hub repo id), `save_pretrained` and `push_to_hub` are diffusers', in the layout
    that loads with this package and without it (see [`RemoteCodeMixin`]).

    Parameters:
        unet ([`DDPMMnistUNet`]):
            The noise-prediction network eps_theta(x_t, t).
        scheduler ([`SchedulerMixin`]):
            The reverse process: [`DDPMMnistScheduler`] or any diffusers scheduler compatible with the DDPM schedule
            (DDIM, DPM-Solver++, UniPC, Euler, Heun).
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
        self.image_processor = VaeImageProcessor()  # [-1, 1] -> [0, 1] as "pil", "np" or "pt"

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
        """Check the class labels and guidance against the UNet and scheduler (a ValueError before any sampling);
        return the batch size they imply."""
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

        The UNet runs in its own dtype (bf16 samples faster where native: `pipe.to(torch.bfloat16)`); x_t, the noise
        and every scheduler update (eq. 11, eq. 7) stay in float32.

        Args:
            batch_size (`int`, *optional*):
                The number of digits to generate: by default one per class label, or 1 without labels.
            class_labels (`list[int]` or `torch.Tensor`, *optional*):
                The digit (0-9) to draw for each image, for a class-conditional pipeline (`is_class_conditional`).
                Without labels a conditional model draws any digit (its null class).
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance scale, as in `DiTPipeline`: on above 1; higher values draw the requested
                digit more clearly at some cost in variety.
            guidance_interval (`tuple[int, int]`, *optional*):
                Guide only the steps whose timestep lies in `[low, high]` (by default all): guidance at the noisiest
                steps costs variety, at the last ones it does little (Kynkäänniemi et al. 2024). The others use the
                conditional prediction alone, at one UNet call. Timesteps, unlike the steps of diffusers' guiders,
                mean the same at any step count and with any scheduler.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic. With a list (one per image), image i is what a batch of one would give
                with generator i.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The number of denoising steps, at most the scheduler's `num_train_timesteps` (the default: the paper's
                whole chain, as diffusers' `DDPMPipeline`); fewer respace it. The released models' cards recommend
                `pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)` on 20 steps.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (greyscale, mode "L"), `"np"` ((N, 28, 28, 1) in [0, 1]) or `"pt"` ((N, 1, 28, 28) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called after every step as `callback_on_step_end(pipe, i, t, callback_kwargs)`, as in diffusers:
                `callback_kwargs["image"]` is x_{t-1}, and the dict it returns replaces it.
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
        batch_size = self.check_class_inputs(class_labels, guidance_scale, batch_size, guidance_interval)
        self.check_inputs(batch_size, generator, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        sample_size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, sample_size, sample_size)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # x_T ~ N(0, I), scaled for schedulers in sigma space (Euler, Heun) as the timesteps just set say.
        x_t = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        x_t = x_t * self.scheduler.init_noise_sigma
        timesteps = self.scheduler.timesteps
        x_0 = self.denoise(
            x_t, timesteps, class_labels, guidance_scale, guidance_interval, generator, callback_on_step_end
        )
        return self._output(x_0, output_type, return_dict)

    def denoise(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[int, int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """The reverse process over `timesteps` (the scheduler's, already set, or their tail): x_t -> x_0, float32.

        Steps outside `guidance_interval` (inclusive) are unguided. `callback_on_step_end` gets `{"image": x_{t-1}}`
        after every step, as in `__call__`. `progress=False` hides the progress bar, for a caller that runs several
        passes under a bar of its own.
        """
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x_t.device).long()
        # UniPC and a few others draw no noise and take no generator.
        extra_step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra_step_kwargs["generator"] = generator
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            model_input = self.scheduler.scale_model_input(x_t, t)
            guided = guidance_interval is None or guidance_interval[0] <= float(t) <= guidance_interval[1]
            model_output = self.predict_noise(model_input, t, class_labels, guidance_scale if guided else 1.0)
            x_t = self.scheduler.step(model_output, t, x_t, **extra_step_kwargs).prev_sample
            if callback_on_step_end is not None:
                x_t = callback_on_step_end(self, i, t, {"image": x_t}).get("image", x_t)
        return x_t

    def postprocess(
        self, x_0: torch.Tensor, output_type: str = "pil"
    ) -> torch.Tensor | np.ndarray | list[PIL.Image.Image]:
        """x_0 in [-1, 1] -> digits in [0, 1]: the centre `image_size` crop, as `output_type` ("pil", "np", "pt")."""
        border, size = (self.unet.config.sample_size - self.config.image_size) // 2, self.config.image_size
        return self.image_processor.postprocess(x_0[:, :, border : border + size, border : border + size], output_type)

    def _output(self, x_0: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """The end of a call: x_0 post-processed, the offload hooks freed, the images as `return_dict` asks."""
        images = self.postprocess(x_0, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
