"""diffusers' generic loader, `DiffusionPipeline.from_pretrained`, on this package's folders, and on others.

A folder written by `save_pretrained` carries the code diffusers runs with `trust_remote_code=True`. The generic loader
runs it when the caller asks, with the package imported or not, and it gives the digits `DDPMMnistPipeline` gives;
without `trust_remote_code` it refuses in its own words. Importing the package changes nothing in diffusers: no class
attribute, and no request to the Hub when another pipeline loads (repo ids are served by the Hub stand-in of
tests/hub_server.py, to clients in fresh interpreters: see tests/test_hub.py for why).
"""

import inspect
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from ddpm_mnist import DDPMMnistInpaintPipeline, DDPMMnistPipeline, DDPMMnistScheduler
from tests.hub_server import HubServer
from tests.utils import HIDE_PACKAGE, run_python, tiny_unet

PACKAGE_CLASSES = ["ddpm_mnist.pipeline_ddpm_mnist", "ddpm_mnist.unet_ddpm_mnist", "ddpm_mnist.scheduling_ddpm_mnist"]
REMOTE_CLASSES = ["pipeline_ddpm_mnist", "unet_ddpm_mnist", "scheduling_ddpm_mnist"]
ROOT = Path(__file__).resolve().parents[1]
# Script lines defining `sample(pipe)` (two digits from a fixed seed, saved as `<name>.npy`) and `classes(pipe)`.
SAMPLE = """
import numpy as np
import torch

def sample(pipe, name):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    np.save(name, pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np").images)

def classes(pipe):
    print(" ".join(type(part).__module__ for part in (pipe, pipe.unet, pipe.scheduler)))
"""


def sample(pipe: DiffusionPipeline) -> np.ndarray:
    """`SAMPLE`'s digits, drawn in this process."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny pipeline saved by `save_pretrained`, and its digits."""
    tmp = tmp_path_factory.mktemp("generic")
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=10))
    pipe.save_pretrained(tmp / "saved")
    return SimpleNamespace(saved=tmp / "saved", digits=sample(pipe))


def test_a_saved_folder_names_the_code_it_carries(folders):
    index = json.loads((folders.saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ddpm_mnist", "DDPMMnistPipeline"]
    assert index["unet"] == ["unet_ddpm_mnist", "DDPMMnistUNet"]
    assert index["scheduler"] == ["scheduling_ddpm_mnist", "DDPMMnistScheduler"]
    for path in (
        "pipeline_ddpm_mnist.py",
        "remote_code_utils.py",
        "unet/unet_ddpm_mnist.py",
        "scheduler/scheduling_ddpm_mnist.py",
    ):
        source = ROOT / "ddpm_mnist" / path.rpartition("/")[2]
        assert (folders.saved / path).read_bytes() == source.read_bytes(), f"{path} is not a copy of {source.name}"
    assert not (folders.saved / "README.md").exists(), "a card is written by a push, which knows the repo id"


def test_the_package_loads_a_folder_and_the_generic_loader_asks_for_trust_remote_code(folders):
    pipe = DDPMMnistPipeline.from_pretrained(folders.saved)
    assert [type(part).__module__ for part in (pipe, pipe.unet, pipe.scheduler)] == PACKAGE_CLASSES
    np.testing.assert_allclose(sample(pipe), folders.digits, atol=1e-6, rtol=0)
    refusal = r"contains custom code in pipeline_ddpm_mnist.py .*\n.*trust_remote_code=True"  # diffusers' words
    with pytest.raises(ValueError, match=refusal):
        DiffusionPipeline.from_pretrained(folders.saved)  # with the package imported


def save_other_pipeline(folder: Path) -> None:
    """A tiny pipeline of diffusers' own (`DDPMPipeline` with a `UNet2DModel`), saved in `folder`."""
    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1, **blocks)
    DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=10)).save_pretrained(folder)


def test_other_pipelines_keep_diffusers_loader(tmp_path):
    save_other_pipeline(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is DDPMPipeline
    with pytest.raises(ValueError, match="is neither a valid local path nor a valid repo id"):  # diffusers' words
        DiffusionPipeline.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.parametrize("package", ["imported", "not installed"])
def test_a_folder_runs_its_code_only_when_trusted_with_or_without_the_package(folders, tmp_path, package):
    code = f"""{HIDE_PACKAGE if package == "not installed" else "import ddpm_mnist"}{SAMPLE}
from diffusers import DiffusionPipeline
try:
    DiffusionPipeline.from_pretrained({str(folders.saved)!r})
except ValueError as error:
    print("refused:", "trust_remote_code" in str(error))
pipe = DiffusionPipeline.from_pretrained({str(folders.saved)!r}, trust_remote_code=True)
sample(pipe, "remote.npy")
classes(pipe)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    refused, classes = run_python(code, env, tmp_path).strip().splitlines()[-2:]
    assert refused == "refused: True"
    assert classes.split() == [f"diffusers_modules.local.{name}" for name in REMOTE_CLASSES]  # the folder's code
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), folders.digits, atol=1e-6, rtol=0)


def complete_top_halves(pipe: DiffusionPipeline) -> np.ndarray:
    """Two fixed images completed from their top halves by an inpainting pipeline, from a fixed seed."""
    pipe.set_progress_bar_config(disable=True)
    image = torch.linspace(-1, 1, 2 * 28 * 28).reshape(2, 1, 28, 28)
    keep = torch.zeros(2, 1, 28, 28)
    keep[..., :14, :] = 1
    generator = torch.Generator().manual_seed(0)
    return pipe(image, keep, num_inference_steps=4, generator=generator, output_type="np").images


def test_a_saved_inpainting_pipeline_completes_digits_without_the_package(tmp_path):
    """Its folder carries the inpainting module and the modules that module imports, so diffusers' generic loader
    runs it as it is; its completions equal the package's."""
    inpaint = DDPMMnistInpaintPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=10))
    inpaint.save_pretrained(tmp_path / "inpaint")
    carried = {path.name for path in (tmp_path / "inpaint").glob("*.py")}
    imported = {"pipeline_ddpm_mnist.py", "remote_code_utils.py", "schedulers.py", "scheduling_ddpm_mnist.py"}
    assert carried == {"pipeline_ddpm_mnist_inpaint.py", *imported}
    code = f"""{HIDE_PACKAGE}{SAMPLE}
from diffusers import DiffusionPipeline
{inspect.getsource(complete_top_halves)}
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "inpaint")!r}, trust_remote_code=True)
np.save("remote.npy", complete_top_halves(pipe))
classes(pipe)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    classes = run_python(code, env, tmp_path).strip().splitlines()[-1]
    modules = ["pipeline_ddpm_mnist_inpaint", "unet_ddpm_mnist", "scheduling_ddpm_mnist"]
    assert classes.split() == [f"diffusers_modules.local.{name}" for name in modules]  # the folder's code
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), complete_top_halves(inpaint), atol=1e-6, rtol=0)


# Script lines that import the package and every module in it, and print which attributes of diffusers' base classes
# that changed (none: `[[], [], [], [], []]`) and whether `DiffusionPipeline.from_pretrained` is still diffusers' own.
IMPORT_EVERYTHING = """
import importlib
import pkgutil

from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils import PushToHubMixin

classes = (DiffusionPipeline, ConfigMixin, ModelMixin, SchedulerMixin, PushToHubMixin)
before = [dict(vars(cls)) for cls in classes]
from_pretrained = DiffusionPipeline.from_pretrained.__func__
import ddpm_mnist

for module in pkgutil.walk_packages(ddpm_mnist.__path__, "ddpm_mnist."):
    importlib.import_module(module.name)
print([sorted(name for name in {*old, *vars(cls)} if vars(cls).get(name) is not old.get(name))
       for old, cls in zip(before, classes)])
print("diffusers' own from_pretrained:", DiffusionPipeline.from_pretrained.__func__ is from_pretrained)
"""


def test_importing_the_package_changes_nothing_in_diffusers(hub: HubServer, tmp_path: Path):
    # Not a class attribute, and not a request to the Hub when another pipeline loads, from a cold cache.
    save_other_pipeline(tmp_path / "other")
    env = {**hub.client_env(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    upload = f"""
from huggingface_hub import HfApi
HfApi().upload_folder(repo_id=HfApi().create_repo("other").repo_id, folder_path={str(tmp_path / "other")!r})
"""
    run_python(upload, env, tmp_path)
    load = "from diffusers import DiffusionPipeline\nprint(type(DiffusionPipeline.from_pretrained('tester/other')))\n"
    asked, printed = {}, {}
    for case, first_lines in (("with", IMPORT_EVERYTHING), ("without", "")):
        seen = len(hub.requests)
        printed[case] = run_python(first_lines + load, {**env, "HF_HOME": str(tmp_path / case)}, tmp_path)
        asked[case] = sorted((method, path) for method, path, _ in hub.requests[seen:])  # downloads run in parallel
    changed, own, loaded = printed["with"].strip().splitlines()[-3:]
    assert (changed, own) == ("[[], [], [], [], []]", "diffusers' own from_pretrained: True")
    assert "DDPMPipeline" in loaded
    assert asked["with"] and asked["with"] == asked["without"]
