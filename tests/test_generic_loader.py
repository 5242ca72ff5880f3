"""diffusers' generic loader, `DiffusionPipeline.from_pretrained`, on this package's folders and repos.

With the package imported, a folder saved by `save_pretrained` and one in the pushed (remote-code) layout load with
the package's classes and no `trust_remote_code`, from a local folder or a repo id; without the package, the pushed
layout still loads as remote code with `trust_remote_code=True`, and gives the same digits. Repo ids are served by the
Hub stand-in of tests/hub_server.py, to clients in fresh interpreters (see tests/test_hub.py for why).
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.hub import export_pipeline_folder
from tests.hub_server import HubServer
from tests.utils import HIDE_PACKAGE, run_python, tiny_unet

PACKAGE_CLASSES = ["ddpm_mnist.pipeline_ddpm_mnist", "ddpm_mnist.unet_ddpm_mnist", "ddpm_mnist.scheduling_ddpm_mnist"]
REMOTE_CLASSES = ["pipeline_ddpm_mnist", "unet_ddpm_mnist", "scheduling_ddpm_mnist"]
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
    """A tiny pipeline saved by `save_pretrained`, the same exported as a push uploads it, and its digits."""
    tmp = tmp_path_factory.mktemp("generic")
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=10))
    pipe.save_pretrained(tmp / "saved")
    export_pipeline_folder(tmp / "saved", tmp / "pushed")
    digits = sample(DDPMMnistPipeline.from_pretrained(tmp / "saved"))
    return SimpleNamespace(saved=tmp / "saved", pushed=tmp / "pushed", digits=digits)


def test_the_two_layouts_name_the_package_and_the_remote_code(folders):
    saved = json.loads((folders.saved / "model_index.json").read_text())
    pushed = json.loads((folders.pushed / "model_index.json").read_text())
    assert saved["_class_name"] == "DDPMMnistPipeline" and saved["unet"][0] == "ddpm_mnist.unet_ddpm_mnist"
    assert pushed["_class_name"] == ["pipeline_ddpm_mnist", "DDPMMnistPipeline"]
    assert (folders.pushed / "pipeline_ddpm_mnist.py").is_file()


@pytest.mark.parametrize("layout", ["saved", "pushed"])
def test_with_the_package_a_folder_loads_with_its_classes_without_trusting_code(folders, layout):
    pipe = DiffusionPipeline.from_pretrained(getattr(folders, layout))
    assert isinstance(pipe, DDPMMnistPipeline)
    assert [type(part).__module__ for part in (pipe, pipe.unet, pipe.scheduler)] == PACKAGE_CLASSES
    np.testing.assert_array_equal(sample(pipe), folders.digits)


def test_other_pipelines_keep_diffusers_loader(tmp_path):
    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1, **blocks)
    DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is DDPMPipeline
    with pytest.raises(ValueError, match="is neither a valid local path nor a valid repo id"):  # diffusers' words
        DiffusionPipeline.from_pretrained(str(tmp_path / "missing"))


def test_without_the_package_a_folder_loads_as_remote_code_only_when_trusted(folders, tmp_path):
    code = f"""{HIDE_PACKAGE}{SAMPLE}
from diffusers import DiffusionPipeline
try:
    DiffusionPipeline.from_pretrained({str(folders.pushed)!r})
except ValueError as error:
    print("refused:", "trust_remote_code" in str(error))
pipe = DiffusionPipeline.from_pretrained({str(folders.pushed)!r}, trust_remote_code=True)
sample(pipe, "remote.npy")
classes(pipe)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    refused, classes = run_python(code, env, tmp_path).strip().splitlines()[-2:]
    assert refused == "refused: True"
    assert classes.split() == [f"diffusers_modules.local.{name}" for name in REMOTE_CLASSES]
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), folders.digits, atol=1e-6, rtol=0)


def test_a_repo_id_loads_with_the_package_and_as_remote_code_without_it(folders, hub: HubServer, tmp_path: Path):
    env = {**hub.client_env(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    push = f"from ddpm_mnist.hub import push_pipeline_folder\npush_pipeline_folder({str(folders.saved)!r}, 'generic')"
    run_python(push, env, tmp_path)
    with_package = f"""{SAMPLE}
import ddpm_mnist
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("tester/generic")
sample(pipe, "package.npy")
classes(pipe)
"""
    assert run_python(with_package, env, tmp_path).split()[-3:] == PACKAGE_CLASSES
    without_package = f"""{HIDE_PACKAGE}{SAMPLE}
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("tester/generic", trust_remote_code=True)
sample(pipe, "remote.npy")
classes(pipe)
"""
    remote_classes = run_python(without_package, env, tmp_path).split()[-3:]
    assert [name.rpartition(".")[2] for name in remote_classes] == REMOTE_CLASSES
    assert all(name.startswith("diffusers_modules.") for name in remote_classes)
    package, remote = np.load(tmp_path / "package.npy"), np.load(tmp_path / "remote.npy")
    np.testing.assert_array_equal(remote, package)
    np.testing.assert_allclose(package, folders.digits, atol=1e-6, rtol=0)
