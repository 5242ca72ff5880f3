"""ddpm-mnist: the DDPM of Ho et al. (2020) for MNIST, built on diffusers.

The public API is the three pieces of a diffusers pipeline:

    from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
"""

from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .scheduling_ddpm_mnist import DDPMMnistScheduler
from .unet_ddpm_mnist import DDPMMnistUNet

__version__ = "0.1.0"

__all__ = ["DDPMMnistPipeline", "DDPMMnistScheduler", "DDPMMnistUNet", "__version__"]
