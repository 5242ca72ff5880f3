"""RemoteCodeMixin: saving and loading the package's pipelines in a layout that loads with the package and without it.

A folder written by `save_pretrained` (and so a repo pushed by `push_to_hub`) carries the code of its pipeline beside
the weights, and its model_index.json names the module files (`"unet": ["unet_ddpm_mnist", "DDPMMnistUNet"]`):
diffusers' generic loader runs those files with `trust_remote_code=True`, without the package. With the package
imported, `load_config` reads those names as the package's own modules, which load without running downloaded code.

diffusers' `DiffusionPipeline.download` refuses a model_index.json whose components come from a package outside
diffusers, even when it is installed: `from_pretrained` fetches a Hub repo with `snapshot_download` and loads that.

This file imports only diffusers, huggingface_hub and the standard library: a saved folder carries it beside the
pipeline's module, which imports it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import tempfile

from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from huggingface_hub import ModelCard, ModelCardData, create_repo, snapshot_download
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import validate_repo_id

# Files a saved pipeline folder must hold for `from_pretrained` to rebuild it.
REQUIRED_FILES = (
    "model_index.json",
    os.path.join("unet", "config.json"),
    os.path.join("unet", "diffusion_pytorch_model.safetensors"),
    os.path.join("scheduler", "scheduler_config.json"),
)
# What `from_pretrained` downloads of a Hub repo: model_index.json, the component configs and safetensors weights.
PIPELINE_FILE_PATTERNS = ["*.json", "*.safetensors"]
# The package this module is part of: its modules are the code files a saved folder carries for trust_remote_code.
_PACKAGE = __name__.rpartition(".")[0]


class RemoteCodeMixin:
    """`from_pretrained`, `load_config`, `save_pretrained` and `push_to_hub` of a [`DiffusionPipeline`] whose code is
    in this package: listed before `DiffusionPipeline` among a pipeline's bases, it wraps diffusers' own methods."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiffusionPipeline:
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
                f"{pretrained_model_name_or_path} is not a complete {cls.__name__} folder: missing "
                f"{', '.join(missing)}. Point to a folder written by `pipeline.save_pretrained(...)` or a repo pushed "
                "with `pipeline.push_to_hub(...)`."
            )
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs) -> dict | tuple:
        """`ConfigMixin.load_config`, with the model_index.json entries that name a module file beside this one read as
        that module of the package, and `_class_name` as this class: a folder of one of this package's pipelines loads
        as the class asked for (a base pipeline's folder as the inpainting pipeline, say), as diffusers loads a folder
        into any pipeline class that takes its components."""
        loaded = super().load_config(*args, **kwargs)
        config = dict(loaded[0] if isinstance(loaded, tuple) else loaded)
        for name, entry in config.items():
            if isinstance(entry, list) and f"{_PACKAGE}.{entry[0]}" in sys.modules:
                config[name] = cls.__name__ if name == "_class_name" else [f"{_PACKAGE}.{entry[0]}", entry[1]]
        return (config, *loaded[1:]) if isinstance(loaded, tuple) else config

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> str | None:
        """`DiffusionPipeline.save_pretrained`, with the pipeline's module and those it imports relatively at the root
        and each component's module of this package in the component's folder, copied as they are.

        `push_to_hub=True` then uploads the whole folder as diffusers does and returns the commit URL. The model card
        that goes up is the folder's README.md if it has one, else the repo's card, else a short one on loading it.
        """
        if push_to_hub:
            upload = {name: kwargs.pop(name, None) for name in ("commit_message", "token", "subfolder")}
            create_pr, private = kwargs.pop("create_pr", False), kwargs.pop("private", None)
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            repo_id = create_repo(repo_id, private=private, token=upload["token"], exist_ok=True).repo_id
        super().save_pretrained(save_directory, safe_serialization, variant, max_shard_size, **kwargs)
        _write_remote_code(save_directory, type(self), self.components)
        if not push_to_hub:
            return None
        card_path = os.path.join(save_directory, "README.md")
        if not upload["subfolder"] and not os.path.isfile(card_path):  # diffusers puts no card in a subfolder
            _model_card(self, repo_id, upload["token"]).save(card_path)
        return self._upload_folder(save_directory, repo_id, create_pr=create_pr, **upload)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
    ) -> str:
        """diffusers' `push_to_hub`: what `save_pretrained(..., push_to_hub=True)` uploads, in one commit; the commit
        URL."""
        arguments = {name: value for name, value in locals().items() if name != "self"}  # each goes on as it is
        with tempfile.TemporaryDirectory() as folder:
            return self.save_pretrained(folder, push_to_hub=True, **arguments)


def _write_remote_code(folder: str | os.PathLike, pipeline_class: type, components: dict) -> None:
    """Point a saved folder's model_index.json to module files, and copy those modules in."""
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as file:
        index = json.load(file)
    module = pipeline_class.__module__.rpartition(".")[2]
    index["_class_name"] = [module, pipeline_class.__name__]
    module_file = inspect.getsourcefile(pipeline_class)
    for source in (module_file, *get_relative_import_files(module_file)):
        shutil.copyfile(source, os.path.join(folder, os.path.basename(source)))
    # diffusers names a component whose class comes from outside its libraries by the full module name; of those, the
    # modules beside this file ship with the folder (diffusers' own classes keep entries such as ["diffusers", ...]).
    for name, component in components.items():
        component_class = type(component)
        package, _, module = component_class.__module__.rpartition(".")
        if package == _PACKAGE and index.get(name) == [component_class.__module__, component_class.__name__]:
            index[name] = [module, component_class.__name__]
            shutil.copyfile(inspect.getsourcefile(component_class), os.path.join(folder, name, f"{module}.py"))
    with open(index_path, "w") as file:
        file.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _model_card(pipeline: DiffusionPipeline, repo_id: str, token: str | None) -> ModelCard:
    """The repo's own model card, which a push keeps as diffusers' does; for a repo without one, a short card."""
    try:
        return ModelCard.load(repo_id, token=token)
    except EntryNotFoundError:
        pass
    class_name, module = type(pipeline).__name__, type(pipeline).__module__.rpartition(".")[2]
    metadata = ModelCardData(
        library_name="diffusers", pipeline_tag="unconditional-image-generation", tags=["ddpm", "mnist"]
    )
    steps = pipeline.scheduler.config.num_train_timesteps
    # Not written out as a line of this file: diffusers' remote-code loader imports every module that a line starting
    # with `from X import` names, so such a line here would make loading without the package fail.
    card_import = "from ddpm_mnist import"
    sample = (
        "generator = torch.Generator().manual_seed(0)\n"
        f"images = pipe(batch_size=16, num_inference_steps={steps}, generator=generator).images"
    )
    return ModelCard(f"""---
{metadata.to_yaml()}
---

# {repo_id.split("/")[-1]}

Handwritten digits in the style of MNIST from a denoising diffusion probabilistic model (DDPM; Ho, Jain and Abbeel,
["Denoising Diffusion Probabilistic Models"](https://arxiv.org/abs/2006.11239), 2020): a diffusers `{class_name}`.

With the package installed (`pip install ddpm-mnist`), the pipeline loads with the package's own classes:

```python
import torch
{card_import} {class_name}

pipe = {class_name}.from_pretrained("{repo_id}")
{sample}
```

Without the package, diffusers alone loads it: this repository carries the pipeline's code (`{module}.py` and the
modules it imports, and the modules that `model_index.json` names in the components' folders). Read it, then allow it
to run with `trust_remote_code=True`:

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
{sample}
```

Both ways give the same digits for the same seed.
""")
