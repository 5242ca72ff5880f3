"""The code published in `pretrained/*` cannot drift from the package: byte for byte the same, and it runs alone.

Each released folder carries the pipeline, UNet and scheduler modules for `trust_remote_code`, and the module that the
pipeline imports relatively (its save and load, `remote_code_utils.py`). The package never runs those copies
(`DDPMMnistPipeline.from_pretrained` maps them back to its own modules), so only these tests notice when an edit to
`ddpm_mnist/` leaves them behind, or when the copies stop working without the package.
"""

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import ddpm_mnist
from ddpm_mnist import DDPMMnistPipeline
from tests.utils import HIDE_PACKAGE, run_python

ROOT = Path(__file__).resolve().parents[1]
RELEASES = sorted(index.parent for index in ROOT.glob("pretrained/*/model_index.json"))
PUBLISHED_CODE = sorted(path for release in RELEASES for path in release.rglob("*.py"))
# What the published code may import besides the standard library: diffusers and its own dependencies.
ALLOWED_IMPORTS = {"diffusers", "huggingface_hub", "numpy", "PIL", "torch"}
# Two digits on 3 of the release's timesteps from a fixed seed: the same numbers whichever copy of the code runs.
SAMPLE = {"batch_size": 2, "num_inference_steps": 3, "output_type": "np"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, as in the subprocess: the same kernels, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def component_modules(release: Path) -> dict[str, str]:
    """The module each component of a release loads from, as its model_index.json names it: a file of the folder's
    own (a distilled student's scheduler is diffusers' `DDIMScheduler`, whose module is diffusers')."""
    index = json.loads((release / "model_index.json").read_text())
    modules = {"pipeline": "diffusers_modules.local.pipeline_ddpm_mnist"}
    for name in ("unet", "scheduler"):
        library, class_name = index[name]
        own = library != "diffusers"
        modules[name] = (
            f"diffusers_modules.local.{library}" if own else type(getattr(diffusers, class_name)()).__module__
        )
    return modules


def test_there_is_published_code_to_check():
    # Each release: the pipeline's module, remote_code_utils.py, and the module of each component of its own.
    own = sum(
        name.startswith("diffusers_modules") for release in RELEASES for name in component_modules(release).values()
    )
    assert RELEASES and len(PUBLISHED_CODE) == len(RELEASES) + own


@pytest.mark.parametrize("path", PUBLISHED_CODE, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_each_published_module_is_its_package_module_byte_for_byte(path):
    source = ROOT / "ddpm_mnist" / path.name
    assert path.read_bytes() == source.read_bytes(), f"copy {source} to {path} (the released code fell behind)"


@pytest.mark.parametrize("release", RELEASES, ids=lambda path: path.name)
def test_each_release_loads_without_the_package_and_draws_the_same_digits(release, tmp_path, one_thread):
    code = f"""{HIDE_PACKAGE}
import numpy as np
import torch
from diffusers import DiffusionPipeline

try:
    import ddpm_mnist
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("ddpm_mnist is importable")
pipe = DiffusionPipeline.from_pretrained({str(release)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
np.save("remote.npy", pipe(**{SAMPLE!r}, generator=torch.Generator().manual_seed(0)).images)
print(type(pipe).__module__, type(pipe.unet).__module__, type(pipe.scheduler).__module__)
print(sorted(name for name in sys.modules if name.startswith("ddpm_mnist")))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    classes, package_modules = run_python(code, env, tmp_path).strip().splitlines()[-2:]
    assert package_modules == "[]"
    assert classes.split() == list(component_modules(release).values())
    pipe = DDPMMnistPipeline.from_pretrained(release)
    pipe.set_progress_bar_config(disable=True)
    package = pipe(**SAMPLE, generator=torch.Generator().manual_seed(0)).images
    remote = np.load(tmp_path / "remote.npy")
    assert remote.shape == (2, 28, 28, 1) and remote.std() > 0.1
    np.testing.assert_array_equal(remote, package)


@pytest.mark.parametrize("module", sorted({path.name for path in PUBLISHED_CODE}))
def test_the_remote_code_modules_import_only_diffusers_its_dependencies_and_the_standard_library(module):
    # diffusers' remote-code loader imports every module that a line of the file starting with `import X` or
    # `from X import` names (docstrings and strings included), with its own patterns: a line naming this package
    # would make loading without it fail. A relative import names a module the releases carry beside it.
    text = Path(ddpm_mnist.__file__).with_name(module).read_text()
    imports = re.findall(r"^\s*import\s+(\S+)\s*$", text, flags=re.MULTILINE)
    imports += re.findall(r"^\s*from\s+(\S+)\s+import", text, flags=re.MULTILINE)
    relative = {name[1:] for name in imports if name.startswith(".")}
    absolute = {name.split(".")[0] for name in imports if not name.startswith(".")}
    assert absolute and absolute <= ALLOWED_IMPORTS | sys.stdlib_module_names, absolute - sys.stdlib_module_names
    assert {f"{name}.py" for name in relative} <= {path.name for path in PUBLISHED_CODE}, relative
