"""The MNIST classifier whose penultimate features define this project's FID, KID and precision/recall.

Trained by `training/train_classifier.py`; its weights ship in the package as `mnist_classifier.safetensors`, with the
measured test accuracy in the file's metadata. The 128 activations of its dense layer play the part that Inception's
2048 pool3 activations play in the usual FID.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

WEIGHTS_PATH = Path(__file__).with_name("mnist_classifier.safetensors")
NUM_FEATURES = 128
NUM_CLASSES = 10


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias), batch norm, ReLU; keeps the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MnistClassifier(nn.Module):
    """Digits (B, 1, 28, 28) in [0, 1] -> 10 logits; `features` maps them to the 128-d penultimate features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 32),
            nn.MaxPool2d(2),
            _conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            _conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, NUM_FEATURES),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The class logits of a batch of digits."""
        return self.head(self.features(images))


def load_mnist_classifier(
    weights: str | os.PathLike = WEIGHTS_PATH, device: str | torch.device = "cpu"
) -> MnistClassifier:
    """The trained classifier from a safetensors file (by default the one shipped), in eval mode without grads."""
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"no classifier weights at {weights}; train them with `python training/train_classifier.py`."
        )
    model = MnistClassifier()
    model.load_state_dict(load_file(weights))
    return model.eval().requires_grad_(False).to(device)


def recorded_test_accuracy(weights: str | os.PathLike = WEIGHTS_PATH) -> float:
    """The MNIST test accuracy that `training/train_classifier.py` measured and stored in the weights' metadata."""
    with safe_open(weights, framework="pt") as f:
        return float(f.metadata()["test_accuracy"])
