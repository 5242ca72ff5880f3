"""Helpers shared by the tests: tiny models with non-trivial weights and MNIST-schema fixtures."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image as PILImage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_mnist import DDPMMnistUNet


def randomize_zero_init(model: DDPMMnistUNet, seed: int = 0) -> DDPMMnistUNet:
    """Give the paper's zero-initialised weights small random values so the output depends on the input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def tiny_unet(seed: int = 0, **overrides) -> DDPMMnistUNet:
    """The `tiny` preset with every weight non-zero, in eval mode."""
    torch.manual_seed(seed)
    return randomize_zero_init(DDPMMnistUNet.from_preset("tiny", **overrides), seed).eval()


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    """Encode an array as PNG bytes, as the Hub's MNIST stores its images."""
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mnist_folder(root: Path, rng: np.random.Generator, num_train: int, num_test: int) -> Path:
    """Write `root/mnist/{train,test}-00000-of-00001.parquet` with the columns of `ylecun/mnist`.

    Image i of a split has the value i % 256 in its top-left pixel, so a test can tell which examples it saw.
    """
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("test", num_test)):
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        pixels[:, 0, 0] = np.arange(n) % 256
        rows = {
            "image": [{"bytes": png_bytes(p), "path": None} for p in pixels],
            "label": list(np.arange(n) % 10),
        }
        Dataset.from_dict(rows, features=features).to_parquet(root / "mnist" / f"{split}-00000-of-00001.parquet")
    return root


class OracleUNet(ModelMixin, ConfigMixin):
    """The perfect eps_theta for a data set of one image x_0: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).

    That is eq. 4 solved for the noise. Timesteps between integers (Euler, Heun) use sigma_t = sqrt((1 - abar_t)
    / abar_t) interpolated linearly, as those schedulers do. Records the inputs it was called with.
    """

    @register_to_config
    def __init__(self, sample_size: int = 28, in_channels: int = 1):
        super().__init__()
        self.register_buffer("x_0", torch.zeros(1, in_channels, sample_size, sample_size))
        self.register_buffer("sigmas", torch.zeros(1))
        self.inputs: list[torch.Tensor] = []

    def set_target(self, x_0: torch.Tensor, alphas_cumprod: torch.Tensor) -> OracleUNet:
        """Fix the one training image and the schedule it was noised with."""
        self.x_0 = x_0
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        return self

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> SimpleNamespace:
        """Predict the exact noise of `sample` at `timestep`."""
        self.inputs.append(sample.clone())
        t = torch.as_tensor(timestep, dtype=torch.float64)
        low = int(t.floor().clamp(max=len(self.sigmas) - 1))
        high = min(low + 1, len(self.sigmas) - 1)
        weight = float(t - low)
        sigma = (1 - weight) * self.sigmas[low].double() + weight * self.sigmas[high].double()
        alpha_bar = 1 / (1 + sigma**2)
        eps = (sample.double() - alpha_bar.sqrt() * self.x_0.double()) / (1 - alpha_bar).sqrt()
        return SimpleNamespace(sample=eps.to(sample.dtype))


# Script lines that make `ddpm_mnist` unimportable, as for a user who never installed the package: a meta-path finder
# that refuses it and its submodules before any other finder (the editable install's included) can find them.
HIDE_PACKAGE = """
import importlib.abc
import sys

class _NoDdpmMnist(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ddpm_mnist":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoDdpmMnist())
"""


def run_python(code: str, env: dict[str, str], cwd: Path) -> str:
    """Run `code` in a fresh interpreter, require success and return its stdout."""
    process = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr
    return process.stdout


def assert_usage_error(command: list[str], prog: str, message: str) -> None:
    """Run `command`: it must exit with status 2 and end with one line `<prog>: error: ...` holding `message`."""
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and message in last, process.stderr


def logged_scalars(run: Path, tag: str) -> np.ndarray:
    """A scalar's per-step values (e.g. "loss", "lr") from a training run's tensorboard logs, in step order."""
    points = {}
    for events in (run / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:  # the hyperparameters' events file has none
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return np.array([points[step] for step in sorted(points)])
