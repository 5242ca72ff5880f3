"""The released pipeline in `pretrained/ddpm-mnist-small`: the pushed layout, and digits that are recognisably digits.

A handful of samples from a fixed seed must pass three checks that each catch a different failure: the classifier
is confident (blurry blobs are not), they are not all one digit (noise reads as an "8" with full confidence), and
they lie on the manifold of real digits in the classifier's feature space (noise and scribbles do not).
"""

import json
from pathlib import Path

import pytest
import torch

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.data import load_x_0
from ddpm_mnist.metrics.classifier import load_mnist_classifier
from ddpm_mnist.metrics.quality import classifier_outputs, sample_quality

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "ddpm-mnist-small"
NUM_SAMPLES = 16


@pytest.fixture(scope="module")
def pipe() -> DDPMMnistPipeline:
    pipeline = DDPMMnistPipeline.from_pretrained(PRETRAINED)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_the_release_folder_is_what_a_push_uploads(pipe):
    files = sorted(p.relative_to(PRETRAINED).as_posix() for p in PRETRAINED.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "model_index.json", "pipeline_ddpm_mnist.py",
        "samples/denoising.png", "samples/grid.png", "samples/loss.png",
        "scheduler/scheduler_config.json", "scheduler/scheduling_ddpm_mnist.py",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/unet_ddpm_mnist.py",
    ])  # fmt: skip
    assert json.loads((PRETRAINED / "model_index.json").read_text())["unet"] == ["unet_ddpm_mnist", "DDPMMnistUNet"]
    card = (PRETRAINED / "README.md").read_text()
    assert "ddpm-mnist/ddpm-mnist-small" in card and "**Quality bar**" in card
    assert sum(p.numel() for p in pipe.unet.parameters()) == 1_623_169


def test_samples_from_a_fixed_seed_are_confidently_recognised_digits(pipe, real_mnist):
    # The release's own DDPM sampler on 50 of its 1000 timesteps: as good as all 1000 for these weights, where
    # DDIM is not yet (benchmarks/README.md, sampler quality).
    generator = torch.Generator().manual_seed(0)
    images = pipe(batch_size=NUM_SAMPLES, num_inference_steps=50, generator=generator, output_type="pt").images
    classifier = load_mnist_classifier()
    samples = classifier_outputs(images, classifier, progress=False)
    real = classifier_outputs((load_x_0(real_mnist, "test", 1000) + 1) / 2, classifier, progress=False)
    quality = sample_quality(samples, real, kid_subsets=10)
    confidence = samples.logits.softmax(1).max(1).values
    digits = samples.logits.argmax(1)
    assert confidence.median() >= 0.9, confidence
    assert len(set(digits.tolist())) >= 6, digits
    assert quality.precision >= 0.75, quality
