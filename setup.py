import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "ddpm_mnist" / "__init__.py").read_text()).group(1)

setup(
    name="ddpm-mnist",
    version=version,
    description="The DDPM of Ho et al. (2020) for MNIST, as a diffusers pipeline",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ddpm_mnist", "ddpm_mnist.*"]),
    # The card template is model_cards/ddpm_mnist_card.md, reached through the package's symlink to it, so that a
    # wheel carries the file itself (setuptools copies what the link points to).
    package_data={"ddpm_mnist": ["metrics/*.safetensors", "model_card_template.md"]},
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.35",
        "huggingface-hub>=0.34",
        "safetensors>=0.4",
        "datasets>=3.0",
        "torchmetrics>=1.9",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "train": ["accelerate>=1.0", "psutil", "tensorboard", "matplotlib"],
        "dev": ["pytest>=8", "ruff", "playwright"],
        "demo": ["gradio>=6.0,<7"],
    },
    entry_points={"console_scripts": ["ddpm-mnist=ddpm_mnist.cli:main"]},
)
