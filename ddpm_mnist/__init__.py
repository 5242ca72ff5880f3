"""ddpm-mnist: the DDPM of Ho et al. (2020) for MNIST, built on diffusers.

The public API is the three pieces of a diffusers pipeline:

    from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet

Importing the package also lets diffusers' generic loader open this package's pipelines with its classes:
`diffusers.DiffusionPipeline.from_pretrained(folder_or_repo_id)` of a folder written by `save_pretrained`, or of a
pushed repo (whose model_index.json names the module files it carries for `trust_remote_code`), loads as
`DDPMMnistPipeline.from_pretrained` does, without running downloaded code. Without the package installed, a pushed
repo still loads with `trust_remote_code=True`.
"""

import functools
import json
import os

from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download

from .hub import push_pipeline
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .scheduling_ddpm_mnist import DDPMMnistScheduler
from .unet_ddpm_mnist import DDPMMnistUNet

__version__ = "0.1.0"

# `pipeline.push_to_hub(repo_id)` uploads the weights with the model card and the code `trust_remote_code` needs. It
# lives in the Hub glue and is attached here, so pipeline_ddpm_mnist.py stays free of it and can ship as remote code.
DDPMMnistPipeline.push_to_hub = push_pipeline

# The `_class_name` of model_index.json in a saved folder, and in a pushed repo (the remote-code module and class).
_OUR_CLASS_NAMES = (DDPMMnistPipeline.__name__, [DDPMMnistPipeline.__module__.rpartition(".")[2], "DDPMMnistPipeline"])
_diffusers_from_pretrained = DiffusionPipeline.from_pretrained.__func__


def _pipeline_class_name(name_or_path: str | os.PathLike, kwargs: dict) -> str | list | None:
    """`_class_name` of the model_index.json of a folder or Hub repo (a single small download), None if unreadable."""
    try:
        if os.path.isdir(name_or_path):
            index_file = os.path.join(name_or_path, "model_index.json")
        else:
            hub_kwargs = {key: kwargs.get(key) for key in ("revision", "cache_dir", "token")}
            index_file = hf_hub_download(
                str(name_or_path),
                "model_index.json",
                local_files_only=bool(kwargs.get("local_files_only")),
                **hub_kwargs,
            )
        with open(index_file) as file:
            return json.load(file).get("_class_name")
    except Exception:  # not a pipeline, offline, no such repo: diffusers' own loader reports it in its own words
        return None


@functools.wraps(_diffusers_from_pretrained)
def _from_pretrained(cls: type[DiffusionPipeline], pretrained_model_name_or_path: str | os.PathLike, **kwargs):
    # diffusers' generic loader runs a pushed repo's `pipeline_ddpm_mnist.py` only with `trust_remote_code=True` and
    # finds a saved folder's class only in its own namespace. A folder or repo of this package goes, once the
    # package is imported, to `DDPMMnistPipeline.from_pretrained`, which loads it with the package's own classes;
    # subclasses and every other pipeline keep diffusers' loader untouched.
    if cls is DiffusionPipeline and _pipeline_class_name(pretrained_model_name_or_path, kwargs) in _OUR_CLASS_NAMES:
        return DDPMMnistPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
    return _diffusers_from_pretrained(cls, pretrained_model_name_or_path, **kwargs)


DiffusionPipeline.from_pretrained = classmethod(_from_pretrained)

__all__ = ["DDPMMnistPipeline", "DDPMMnistScheduler", "DDPMMnistUNet", "__version__"]
