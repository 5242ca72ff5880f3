"""ddpm-mnist: the DDPM of Ho et al. (2020) for MNIST, built on diffusers.

The public API is the three pieces of a diffusers pipeline:

    from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
"""

import diffusers

from .hub import push_pipeline
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .scheduling_ddpm_mnist import DDPMMnistScheduler
from .unet_ddpm_mnist import DDPMMnistUNet

__version__ = "0.1.0"

# `DiffusionPipeline.from_pretrained` looks a folder's pipeline class (`_class_name` in model_index.json) up in the
# diffusers namespace; registering ours there lets the generic loader open our folders once this package is imported.
# The components need nothing: model_index.json names their library, `ddpm_mnist`.
diffusers.DDPMMnistPipeline = DDPMMnistPipeline
# `pipeline.push_to_hub(repo_id)` uploads the weights with the model card and the code `trust_remote_code` needs. It
# lives in the Hub glue and is attached here, so pipeline_ddpm_mnist.py stays free of it and can ship as remote code.
DDPMMnistPipeline.push_to_hub = push_pipeline

__all__ = ["DDPMMnistPipeline", "DDPMMnistScheduler", "DDPMMnistUNet", "__version__"]
