"""DDPMMnistPipeline: Algorithm 2 of the DDPM paper (Ho et al. 2020) for MNIST digits.

Noise x_T ~ N(0, I) -> for each timestep of the scheduler: eps = UNet(x_t, t), x_{t-1} = scheduler.step(...)
-> x_0 in [-1, 1] -> 28x28 greyscale digits. Any diffusers scheduler compatible with the DDPM schedule can be
swapped in (DDIM, DPM-Solver++, UniPC, Euler, Heun).

This file imports only torch, diffusers (with its own dependency huggingface_hub) and the standard library, so that
it can be copied as-is into a Hub repository and loaded with `trust_remote_code=True`.

Loading by Hub repo id: diffusers' `DiffusionPipeline.download` refuses a model_index.json whose components come from a
package outside diffusers (`_get_custom_components_and_folders` accepts only diffusers' own libraries or a
`<component>/<module>.py` file in the repo), even when that package is installed. So `from_pretrained` fetches the repo
with `huggingface_hub.snapshot_download` and loads the local snapshot, where diffusers resolves our components from
the imported package. A pushed repo names the module files it carries for `trust_remote_code` (`["unet_ddpm_mnist",
"DDPMMnistUNet"]`); `load_config` reads those names as the modules beside this one, so the package's classes load it.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from huggingface_hub.utils import validate_repo_id

OUTPUT_TYPES = ("pil", "np", "pt")

# Files a saved pipeline folder must hold for `from_pretrained` to rebuild it.
REQUIRED_FILES = (
    "model_index.json",
    os.path.join("unet", "config.json"),
    os.path.join("unet", "diffusion_pytorch_model.safetensors"),
    os.path.join("scheduler", "scheduler_config.json"),
)
# What `from_pretrained` downloads of a Hub repo: model_index.json, the component configs and safetensors weights.
PIPELINE_FILE_PATTERNS = ["*.json", "*.safetensors"]
# The package this module is part of, and its name in it: a pushed repo carries `<_MODULE>.py` for trust_remote_code.
_PACKAGE, _, _MODULE = __name__.rpartition(".")


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DDPMMnistPipeline:
        """Load a saved folder or a Hub repo id (with `revision`, `cache_dir`, `local_files_only`, offline mode)."""
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            try:
                validate_repo_id(folder)
            except ValueError as e:
                raise OSError(f"{folder} is neither a folder nor a Hub repo id (user/name): {e}") from e
            folder = snapshot_download(
                folder,
                revision=kwargs.get("revision"),
                cache_dir=kwargs.get("cache_dir"),
                local_files_only=kwargs.get("local_files_only") or False,
                token=kwargs.get("token"),
                force_download=kwargs.get("force_download", False),
                allow_patterns=PIPELINE_FILE_PATTERNS,
            )
        # The folder is checked for its files first, so a gap names itself.
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise OSError(
                f"{pretrained_model_name_or_path} is not a complete DDPMMnistPipeline folder: missing "
                f"{', '.join(missing)}. Point to a folder written by `pipeline.save_pretrained(...)` or a repo pushed "
                "with `pipeline.push_to_hub(...)`."
            )
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs) -> dict | tuple:
        """`ConfigMixin.load_config`, reading the remote-code entries of a pushed model_index.json as this package."""
        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (_package_entries(loaded[0], cls.__name__), *loaded[1:])
        return _package_entries(loaded, cls.__name__)

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
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Sample digits by running the reverse process from pure noise (Algorithm 2).

        Precision: the UNet runs in its own dtype, while x_t, the noise and every scheduler update stay in float32.
        On hardware with native bf16 (a CPU with AVX512-BF16 or AMX, a recent GPU) ask for a bf16 UNet with
        `DDPMMnistPipeline.from_pretrained(path, dtype=torch.bfloat16)` (diffusers' older name: `torch_dtype`) or
        `pipe.to(torch.bfloat16)`: it samples faster from the same noise, with digits that score like float32 ones
        (benchmarks/README.md).

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                The number of digits to generate.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic. With a list (one per image), image i is the image that a batch of
                one would give with generator i.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The number of denoising steps, at most the scheduler's `num_train_timesteps`. The default follows
                diffusers' `DDPMPipeline`: the paper's whole chain. Fewer steps respace it (`timestep_spacing`);
                the released weights' model card measures 50 respaced DDPM steps against all 1000 and recommends
                50.
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
        self.check_inputs(batch_size, generator, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        sample_size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, sample_size, sample_size)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # x_T ~ N(0, I), scaled for schedulers that work in sigma space (Euler, Heun), whose
        # `init_noise_sigma` depends on the timesteps just set. x_t and the scheduler's arithmetic (eq. 11's update,
        # the posterior variance of eq. 7) stay in float32 whatever the UNet's dtype: a bf16 UNet sees a bf16 copy.
        image = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        image = image * self.scheduler.init_noise_sigma
        unet_dtype = self.unet.dtype
        # UniPC and a few others draw no noise and take no generator.
        extra_step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra_step_kwargs["generator"] = generator

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(image, t).to(unet_dtype)
            model_output = self.unet(model_input, t).sample.float()
            image = self.scheduler.step(model_output, t, image, **extra_step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"image": image}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                image = outputs.get("image", image)

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


def _package_entries(config: dict, class_name: str) -> dict:
    """model_index.json with the entries that name a module file beside this one pointing to that module instead."""
    # A pushed repo's `["unet_ddpm_mnist", "DDPMMnistUNet"]` and `_class_name: ["pipeline_ddpm_mnist", ...]` point
    # diffusers to the code files the repo carries; with the package imported they mean its own modules, e.g.
    # `["ddpm_mnist.unet_ddpm_mnist", "DDPMMnistUNet"]`, which diffusers loads without running downloaded code.
    config = dict(config)
    if config.get("_class_name") == [_MODULE, class_name]:
        config["_class_name"] = class_name
    for name, entry in config.items():
        if name != "_class_name" and isinstance(entry, list) and f"{_PACKAGE}.{entry[0]}" in sys.modules:
            config[name] = [f"{_PACKAGE}.{entry[0]}", entry[1]]
    return config
