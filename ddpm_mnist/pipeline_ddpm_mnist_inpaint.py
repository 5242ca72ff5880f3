"""DDPMMnistInpaintPipeline: completing a partly known digit with RePaint (Lugmayr et al. 2022).

"RePaint: Inpainting using Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2201.09865. The network is
the unconditional (or class-conditional) DDPM as trained; only the reverse process changes (Algorithm 1 there):

* after every reverse step x_t -> x_{t'}, the known pixels are replaced by a fresh sample of q(x_{t'} | x_0) (eq. 4 of
  the DDPM paper) of the input, x_{t'} = m * x_{t'}^known + (1 - m) * x_{t'}^unknown, with m = 1 on the kept pixels;
* resampling: every `jump_length` steps the sample goes back up `jump_length` steps with the forward process
  q(x_t | x_{t'}) = N(sqrt(alpha_bar_t / alpha_bar_{t'}) x_{t'}, (1 - alpha_bar_t / alpha_bar_{t'}) I), and those steps
  are taken again, `jump_n_sample` times in all, so that the filled-in part agrees with the known one.

The steps are those of the scheduler's (respaced) timesteps. `prepare_image` converts images and masks for this
pipeline and for `ddpm_mnist.interpolate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

# diffusers' remote-code loader copies out of a saved folder only the modules the pipeline's module imports itself:
# those that `.pipeline_ddpm_mnist` and `.schedulers` import are named here too, so that a saved folder loads alone.
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .remote_code_utils import RemoteCodeMixin  # noqa: F401
from .schedulers import SCHEDULERS
from .scheduling_ddpm_mnist import DDPMMnistScheduler  # noqa: F401

IMAGE_SIZE = 28  # the side of the digits the pipeline takes and returns
# Schedulers whose step depends on (x_t, t) alone, as RePaint's jumps back up the chain need: not a multistep one's
# history of model outputs (DPM-Solver++, UniPC) or a step counter (Euler, Heun).
ONE_STEP_SCHEDULERS = (DDPMScheduler, *(entry.scheduler_class for entry in SCHEDULERS.values() if entry.one_step))
DEFAULT_NUM_INFERENCE_STEPS = 25  # the defaults, measured as `__call__` says
DEFAULT_JUMP_N_SAMPLE = 3

ImageInput = PIL.Image.Image | Sequence[PIL.Image.Image] | torch.Tensor


def default_jump_length(num_inference_steps: int) -> int:
    """The default `jump_length` of a chain of `num_inference_steps`: a fifth of it, at least 1."""
    return max(1, num_inference_steps // 5)


def check_one_step_scheduler(scheduler: SchedulerMixin) -> None:
    """Raise a one-line ValueError unless `scheduler` steps from (x_t, t) alone, as RePaint and interpolation need."""
    allowed = [cls.__name__ for cls in ONE_STEP_SCHEDULERS]
    # By name, as diffusers matches compatible schedulers: a folder loaded with trust_remote_code brings its own copy
    # of DDPMMnistScheduler's module, a class of another identity.
    if not any(cls.__name__ in allowed for cls in type(scheduler).__mro__):
        raise ValueError(
            f"{type(scheduler).__name__} keeps state between steps and cannot restart the chain at another timestep; "
            f"use one of {', '.join(allowed)}, "
            "e.g. pipe.scheduler = DDPMMnistScheduler.from_config(pipe.scheduler.config)."
        )


def prepare_image(
    image: ImageInput, sample_size: int, *, is_mask: bool = False, name: str | None = None
) -> torch.Tensor:
    """A digit (x_0 in [-1, 1]) or a mask (`is_mask`: 1.0 keeps a pixel, 0.0 fills it in), in the forms
    `DDPMMnistInpaintPipeline` takes as `image` and `mask_image`, as a float32 CPU tensor (N, 1, sample_size,
    sample_size). A UNet with `sample_size` above 28 was trained on digits padded with the background: digits are
    padded with -1, masks with 1 (known). Errors call the input `name` (by default "image" or "mask_image").
    """
    name = name or ("mask_image" if is_mask else "image")
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(item, PIL.Image.Image) for item in image):
        digits = [item.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.BILINEAR) for item in image]
        pixels = torch.stack([torch.from_numpy(np.array(digit, dtype=np.float32)) for digit in digits])
        tensor = pixels[:, None] / 255 if is_mask else pixels[:, None] / 127.5 - 1
    elif isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[0] == 0 or tuple(image.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{name} must be a tensor of shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(image.shape)}; add "
                "the missing batch or channel dimension with tensor[None]."
            )
        tensor = image.detach().float().cpu()
        low, high = (0.0, 1.0) if is_mask else (-1.0, 1.0)
        if not bool(torch.isfinite(tensor).all()) or tensor.min() < low or tensor.max() > high:
            fix = "1 keeps a pixel, 0 fills it in" if is_mask else "map digits in [0, 1] with 2 * x - 1"
            raise ValueError(f"{name} must lie in [{low:g}, {high:g}] ({fix}), got values outside it.")
    else:
        raise ValueError(
            f"{name} must be a PIL image, a non-empty list of PIL images or a tensor (N, 1, 28, 28), got "
            f"{type(image).__name__}; convert it to one of these."
        )
    if is_mask:
        tensor = (tensor >= 0.5).float()
    border = (sample_size - IMAGE_SIZE) // 2
    return F.pad(tensor, (border,) * 4, value=1.0 if is_mask else -1.0) if border else tensor


def jump_schedule(timesteps: Sequence[int], jump_length: int, jump_n_sample: int) -> list[list[int]]:
    """RePaint's resampling schedule on a chain of timesteps: the descending passes, in order.

    `timesteps` is the scheduler's (descending, e.g. 750, 500, 250, 0); -1 stands for x_0. Counting the states from
    x_0 (state 0) up to the first timestep (state n = len(timesteps)), every multiple k of `jump_length` with
    k + jump_length <= n is a jump point: the first `jump_n_sample - 1` times the sample reaches it, it goes back up
    `jump_length` states and comes down again. Each step of a pass is one UNet call: n * jump_n_sample calls when
    `jump_length` divides n (the top n % jump_length steps are taken once).

    For example `jump_schedule([750, 500, 250, 0], 2, 2)` is `[[750, 500, 250], [750, 500, 250, 0, -1], [250, 0, -1]]`:
    8 UNet calls for 4 steps, each taken twice.
    """
    grid = [-1, *sorted(int(t) for t in timesteps)]  # grid[k] = the timestep of state k
    top = len(grid) - 1
    jumps_left = dict.fromkeys(range(0, top - jump_length + 1, jump_length), jump_n_sample - 1)
    passes, state = [[top]], top
    while state > 0:
        state -= 1
        passes[-1].append(state)
        if jumps_left.get(state, 0) > 0:
            jumps_left[state] -= 1
            state += jump_length
            passes.append([state])
    return [[grid[k] for k in states] for states in passes]


def forward_jump(
    scheduler: SchedulerMixin, x: torch.Tensor, t_from: int, t_to: int,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:  # fmt: skip
    """A sample of the forward process q(x_{t_to} | x_{t_from}), t_to > t_from (t_from = -1: x is x_0, eq. 4).

    x_{t_to} = sqrt(a) x + sqrt(1 - a) z with a = alpha_bar_{t_to} / alpha_bar_{t_from} (alpha_bar_{-1} = 1) and
    z ~ N(0, I), float32.
    """
    a = float(scheduler.alphas_cumprod[t_to]) / (1.0 if t_from < 0 else float(scheduler.alphas_cumprod[t_from]))
    noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return a**0.5 * x + (1 - a) ** 0.5 * noise


class DDPMMnistInpaintPipeline(DDPMMnistPipeline):
    r"""
    Completion of partly known MNIST digits with RePaint. Build it from the components of a loaded
    [`DDPMMnistPipeline`]: `DDPMMnistInpaintPipeline(**pipe.components)`, which shares its UNet and scheduler.

    Parameters:
        unet ([`DDPMMnistUNet`]):
            The noise-prediction network eps_theta(x_t, t), unconditional or class-conditional.
        scheduler ([`SchedulerMixin`]):
            The reverse step: [`DDPMMnistScheduler`], [`~diffusers.DDPMScheduler`] or [`~diffusers.DDIMScheduler`].
        image_size (`int`, *optional*, defaults to 28):
            The side of the digits, as for [`DDPMMnistPipeline`].
    """

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        mask_image: ImageInput,
        class_labels: list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[int, int] | None = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        jump_length: int | None = None,
        jump_n_sample: int = DEFAULT_JUMP_N_SAMPLE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Complete digits: keep the pixels the mask keeps, and fill in the others with RePaint's reverse process.

        The kept pixels of the result are those of the input, exactly: RePaint's last step sets them to x_0 itself.
        The defaults (75 UNet calls, about 3 s for one digit on one CPU core) were measured with the released pipeline
        on 200 MNIST test digits (benchmarks/README.md, "Completing digits"): the classifier reads 73% of its
        completions of the top half as the original digit, against 62.5% without resampling.

        Args:
            image (`PIL.Image.Image`, `list[PIL.Image.Image]` or `torch.Tensor`):
                The digits to complete: greyscale, white on black as MNIST (other modes and sizes are converted to
                28x28 "L", bilinear), or a tensor (N, 1, 28, 28) in [-1, 1], the pipeline's x_0.
            mask_image (`PIL.Image.Image`, `list[PIL.Image.Image]` or `torch.Tensor`):
                Which pixels to keep, in the same forms: white (>= 128) or 1 keeps a pixel, black or 0 has it filled
                in. A tensor lies in [0, 1] and is cut at 0.5. One mask may serve the whole batch.
            class_labels (`list[int]` or `torch.Tensor`, *optional*):
                The digit (0-9) each completion should be, one per image, for a class-conditional pipeline.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance toward `class_labels`, as in [`DDPMMnistPipeline`].
            guidance_interval (`tuple[int, int]`, *optional*):
                The timesteps to guide at, as in [`DDPMMnistPipeline`]; by default all.
            num_inference_steps (`int`, *optional*, defaults to 25):
                The number of timesteps of the chain, respaced as the scheduler's `timestep_spacing` says.
            jump_length (`int`, *optional*):
                How many steps RePaint goes back up at each resampling, between 1 and `num_inference_steps`; by
                default a fifth of `num_inference_steps` (RePaint's paper jumps 10 of 250).
            jump_n_sample (`int`, *optional*, defaults to 3):
                How many times each stretch of `jump_length` steps is taken; 1 turns resampling off. A completion
                costs about `num_inference_steps * jump_n_sample` UNet calls (see `jump_schedule`).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes the completions deterministic, as in [`DDPMMnistPipeline`].
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"` or `"pt"`, as in [`DDPMMnistPipeline`].
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called after every UNet call, as in [`DDPMMnistPipeline`], with `i` counting the calls over all passes
                and `callback_kwargs["image"]` the sample after the known pixels were put back.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["image"]`):
                The tensors handed to `callback_on_step_end`.

        Example:

        ```py
        >>> import torch
        >>> from ddpm_mnist import DDPMMnistInpaintPipeline, DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet

        >>> pipe = DDPMMnistPipeline(DDPMMnistUNet.from_preset("tiny"), DDPMMnistScheduler())
        >>> # a trained one: pipe = DDPMMnistPipeline.from_pretrained("pretrained/ddpm-mnist-small")
        >>> inpaint = DDPMMnistInpaintPipeline(**pipe.components)
        >>> digit = torch.rand(1, 1, 28, 28) * 2 - 1  # x_0 in [-1, 1]; or a PIL image of a digit
        >>> keep_top = torch.zeros(1, 1, 28, 28)
        >>> keep_top[..., :14, :] = 1  # keep the top half, fill in the bottom
        >>> completed = inpaint(digit, keep_top, generator=torch.Generator().manual_seed(0), output_type="pt").images
        >>> bool((completed[..., :14, :] == digit[..., :14, :] / 2 + 0.5).all())
        True
        ```

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the completed digits, as `.images` or the tuple's only item.
        """
        check_one_step_scheduler(self.scheduler)
        sample_size = self.unet.config.sample_size
        x_0 = prepare_image(image, sample_size)
        mask = prepare_image(mask_image, sample_size, is_mask=True)
        batch_size = len(x_0)
        if len(mask) not in (1, batch_size):
            raise ValueError(
                f"got {len(mask)} masks for {batch_size} images; pass one mask per image, or one for all of them."
            )
        num_labels = self.check_class_inputs(class_labels, guidance_scale, None, guidance_interval)
        if class_labels is not None and num_labels != batch_size:
            raise ValueError(f"got {num_labels} class_labels for {batch_size} images; pass one label per image.")
        self.check_inputs(batch_size, generator, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        jump_length = default_jump_length(num_inference_steps) if jump_length is None else jump_length
        if not isinstance(jump_length, int) or not 1 <= jump_length <= num_inference_steps:
            raise ValueError(
                f"jump_length must be an integer between 1 and num_inference_steps={num_inference_steps}, got "
                f"{jump_length!r}."
            )
        if not isinstance(jump_n_sample, int) or jump_n_sample < 1:
            raise ValueError(
                f"jump_n_sample must be an integer of at least 1 (1 = no resampling), got {jump_n_sample!r}."
            )

        device = self._execution_device
        x_0, keep = x_0.to(device), mask.to(device).bool()
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        passes = jump_schedule(self.scheduler.timesteps.tolist(), jump_length, jump_n_sample)
        timesteps, calls = passes[0], 0

        def put_back_known(x_t: torch.Tensor, t: int) -> torch.Tensor:
            """x_t = m * x_t^known + (1 - m) * x_t^unknown, x_t^known ~ q(x_t | x_0), the input itself at t = -1."""
            known = x_0 if t < 0 else forward_jump(self.scheduler, x_0, -1, t, generator)
            return torch.where(keep, known, x_t)

        def on_step_end(pipe: DiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
            """After the UNet call at timesteps[i] of this pass: the known pixels put back, then the user's callback."""
            nonlocal calls
            x_t = put_back_known(tensors["image"], timesteps[i + 1])
            if callback_on_step_end is not None:
                x_t = callback_on_step_end(pipe, calls, t, {"image": x_t}).get("image", x_t)
            calls += 1
            progress_bar.update()
            return {"image": x_t}

        x_t = randn_tensor(x_0.shape, generator=generator, device=device, dtype=torch.float32)
        x_t = put_back_known(x_t * self.scheduler.init_noise_sigma, timesteps[0])
        with self.progress_bar(total=sum(len(steps) - 1 for steps in passes)) as progress_bar:
            for number, timesteps in enumerate(passes):  # on_step_end reads the current pass, `timesteps`
                if number:  # back up the chain, from where the previous pass stopped
                    x_t = forward_jump(self.scheduler, x_t, passes[number - 1][-1], timesteps[0], generator)
                steps = torch.tensor(timesteps[:-1], device=device)
                x_t = self.denoise(
                    x_t, steps, class_labels, guidance_scale, guidance_interval, generator, on_step_end, progress=False
                )
        return self._output(x_t, output_type, return_dict)
