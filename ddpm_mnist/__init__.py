"""ddpm-mnist: the DDPM of Ho et al. (2020) for MNIST, built on diffusers.

The public API is the three pieces of a diffusers pipeline:

    from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet

and, built from the same components, the editing tools: `DDPMMnistInpaintPipeline(**pipe.components)` completes a
partly known digit (RePaint) and `interpolate(pipe, image_a, image_b)` runs between two digits through x_t.

`DDPMMnistPipeline.save_pretrained` and `push_to_hub` write a folder or repo that carries the pipeline, UNet and
scheduler code beside the weights: `DDPMMnistPipeline.from_pretrained(folder_or_repo_id)` loads it with this package's
classes, and `diffusers.DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)` with the code it
carries, with or without the package installed. Importing the package changes nothing in diffusers.
"""

from .interpolation import interpolate
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .pipeline_ddpm_mnist_inpaint import DDPMMnistInpaintPipeline
from .scheduling_ddpm_mnist import DDPMMnistScheduler
from .unet_ddpm_mnist import DDPMMnistUNet

__version__ = "0.1.0"

__all__ = [
    "DDPMMnistInpaintPipeline",
    "DDPMMnistPipeline",
    "DDPMMnistScheduler",
    "DDPMMnistUNet",
    "__version__",
    "interpolate",
]
