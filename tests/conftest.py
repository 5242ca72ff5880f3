"""Shared fixtures. The Hub is never reached: tests run offline against folders they create."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.hub_server import HubServer  # noqa: E402
from tests.utils import write_mnist_folder  # noqa: E402

# `datasets` sleeps 5 s whenever a parquet stream ends (a guard against an Arrow crash at interpreter exit,
# apache/arrow#45214); these tests end dozens of streams in one long-lived process.
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

# The real MNIST (a local copy of ylecun/mnist) for the few tests that need real digits: $DDPM_MNIST_REAL_DATA, else
# the `shared/data/mnist` folder that sits beside the checkout's own folder, where a test machine keeps one.
REAL_MNIST = Path(
    os.environ.get("DDPM_MNIST_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
)


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dataset in the layout and schema of `ylecun/mnist`: 96 train and 32 test 28x28 digits."""
    return write_mnist_folder(tmp_path_factory.mktemp("mnist"), np.random.default_rng(0), num_train=96, num_test=32)


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The real MNIST (`REAL_MNIST`); tests that need it skip where it is absent."""
    if not REAL_MNIST.is_dir():
        pytest.skip(f"the real MNIST is not at {REAL_MNIST}; set DDPM_MNIST_REAL_DATA to a local copy of ylecun/mnist")
    return REAL_MNIST


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    """A stand-in of the Hub's HTTP API on 127.0.0.1 (tests/hub_server.py), for clients run with its `client_env`."""
    with HubServer() as server:
        yield server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (benchmarks/gpu_run.sh runs them)")
