"""Interpolation between two digits through x_t: section 4.4 (Fig. 8) of the DDPM paper (Ho et al. 2020).

q serves as a stochastic encoder: x_t ~ q(x_t | x_0) and x'_t ~ q(x_t | x'_0) (eq. 4), the two latents are mixed
linearly, x_bar_t = (1 - lambda) x_t + lambda x'_t, and the reverse process decodes x_bar_t back to a digit,
x_bar_0 ~ p(x_0 | x_bar_t). The paper fixes the noise across the values of lambda, "so x_t and x'_t remain the same",
but does not say that x_t and x'_t share it: here they draw their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ImagePipelineOutput

from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .pipeline_ddpm_mnist_inpaint import ImageInput, check_one_step_scheduler, forward_jump, prepare_image

DEFAULT_LAMBDAS = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0


@torch.no_grad()
def interpolate(
    pipeline: DDPMMnistPipeline,
    image_a: ImageInput,
    image_b: ImageInput,
    *,
    t: int = 500,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    num_inference_steps: int | None = None,
    class_labels: int | list[int] | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    output_type: str = "pil",
) -> ImagePipelineOutput:
    r"""
    Digits between `image_a` and `image_b`: both encoded to x_t, mixed by each lambda, decoded from t.

    One reverse pass decodes the whole row as a batch. The randomness, all from `generator`: first the encoder noise
    of the two digits, as one (2, 1, S, S) draw (S the UNet's sample size); then the reverse process, whose every
    image draws the noise that a chain of one would draw from the generator as it stands after the encoder noise. So
    lambda = 0 is `image_a`'s x_t decoded alone with that generator, and lambda = 1 likewise `image_b`'s.

    Args:
        pipeline ([`DDPMMnistPipeline`]):
            The pipeline whose UNet and scheduler encode and decode; its scheduler must step from (x_t, t) alone, as
            [`DDPMMnistInpaintPipeline`]'s.
        image_a, image_b (`PIL.Image.Image` or `torch.Tensor`):
            One digit each, in the forms [`DDPMMnistInpaintPipeline`] takes as `image` (a tensor: (1, 1, 28, 28)).
        t (`int`, *optional*, defaults to 500):
            The timestep of the latents, 0 to T - 1 (diffusers' numbering: the paper's t - 1). Small t blends the
            digits like pixels; large t keeps less of them, and the row looks more like new digits. The default is
            the paper's (on 256x256 faces); for the released MNIST pipeline t = 250 keeps both ends' digits, while at
            t = 500 they decode to other digits (benchmarks/results/inpainting_interpolation.png).
        lambdas (`Sequence[float]`, *optional*, defaults to 0.0, 0.1, ..., 1.0):
            The mixing weights, each in [0, 1]; one image per lambda, in order.
        num_inference_steps (`int`, *optional*):
            Respace the reverse process: the scheduler's `num_inference_steps` timesteps, from the first one at or
            below t (where the latents are then taken). By default every timestep from t down to 0.
        class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*):
            For a class-conditional pipeline: the digit to decode toward, one for the row or one per lambda.
        guidance_scale (`float`, *optional*, defaults to 1.0):
            Classifier-free guidance toward `class_labels` when above 1.
        guidance_interval (`tuple[int, int]`, *optional*):
            Guide only the steps at timesteps in `[low, high]`, as in [`DDPMMnistPipeline`]; by default all.
        generator (`torch.Generator`, *optional*):
            One generator, which makes the row deterministic.
        output_type (`str`, *optional*, defaults to `"pil"`):
            `"pil"`, `"np"` or `"pt"`, as in [`DDPMMnistPipeline`].

    Example:

    ```py
    >>> import torch
    >>> from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet, interpolate

    >>> pipe = DDPMMnistPipeline(DDPMMnistUNet.from_preset("tiny"), DDPMMnistScheduler())
    >>> # a trained one: pipe = DDPMMnistPipeline.from_pretrained("pretrained/ddpm-mnist-small")
    >>> a, b = torch.rand(2, 1, 1, 28, 28) * 2 - 1  # two digits as x_0 in [-1, 1], or two PIL images
    >>> row = interpolate(pipe, a, b, t=300, num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    >>> len(row.images)
    11
    ```

    Returns:
        [`~pipelines.ImagePipelineOutput`]: the len(lambdas) digits, as `.images`.
    """
    check_one_step_scheduler(pipeline.scheduler)
    num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_train_timesteps:
        raise ValueError(f"t must be an integer timestep between 0 and {num_train_timesteps - 1}, got {t!r}.")
    try:
        weights = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        weights = torch.empty(0)
    if weights.numel() == 0 or not bool(((weights >= 0) & (weights <= 1)).all()):
        raise ValueError(f"lambdas must be a non-empty sequence of numbers in [0, 1], got {lambdas!r}.")
    sample_size = pipeline.unet.config.sample_size
    images = {"image_a": image_a, "image_b": image_b}
    x_0 = torch.cat([prepare_image(image, sample_size, name=name) for name, image in images.items()])
    if len(x_0) != 2:
        raise ValueError(f"image_a and image_b must be one digit each, got {len(x_0)} digits; pass them one by one.")
    if isinstance(class_labels, int):
        class_labels = [class_labels] * len(weights)
    num_labels = pipeline.check_class_inputs(class_labels, guidance_scale, None, guidance_interval)
    if class_labels is not None and num_labels != len(weights):
        raise ValueError(
            f"got {num_labels} class_labels for {len(weights)} lambdas; pass one label for the row, or one per lambda."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be one torch.Generator, got {type(generator).__name__}.")
    steps = num_train_timesteps if num_inference_steps is None else num_inference_steps
    pipeline.check_inputs(len(weights), generator, steps, output_type)

    device = pipeline._execution_device
    pipeline.scheduler.set_timesteps(steps, device=device)
    timesteps = pipeline.scheduler.timesteps[pipeline.scheduler.timesteps <= t]
    if len(timesteps) == 0:
        raise ValueError(f"no timestep of the {steps}-step chain is at or below t={t}; pass a larger t or more steps.")
    if generator is None:
        generator = torch.Generator(device)
        generator.seed()
    # x_t ~ q(x_t | x_0) and x'_t ~ q(x_t | x'_0), each with its own noise (eq. 4).
    x_t = forward_jump(pipeline.scheduler, x_0.to(device), -1, int(timesteps[0]), generator)
    weights = weights.to(device, torch.float32).reshape(-1, 1, 1, 1)
    x_bar_t = (1 - weights) * x_t[:1] + weights * x_t[1:]
    # The same reverse noise for every lambda: one generator per image, each a copy of the one given.
    generators = [torch.Generator(generator.device).set_state(generator.get_state()) for _ in weights]
    x_bar_0 = pipeline.denoise(x_bar_t, timesteps, class_labels, guidance_scale, guidance_interval, generators)
    return ImagePipelineOutput(images=pipeline.postprocess(x_bar_0, output_type))
