"""Tests for the MNIST classifier and the sample-quality metrics (`ddpm_mnist.metrics.quality`)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Image, load_dataset

from ddpm_mnist.data import ImagePreprocessor
from ddpm_mnist.metrics.classifier import WEIGHTS_PATH, load_mnist_classifier, recorded_test_accuracy
from ddpm_mnist.metrics.quality import (
    ClassifierOutputs,
    SampleQuality,
    balanced_class_labels,
    class_accuracy,
    classifier_outputs,
    sample_quality,
)

N = 500  # digits per set: enough to separate the cases below, small enough for a few seconds on a CPU


def labelled_digits(root: Path, split: str, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` digits of a split, in [0, 1], with their labels."""
    stream = load_dataset(str(root), split=split, streaming=True).cast_column("image", Image(decode=False))
    examples = list(stream if count is None else stream.take(count))
    return (ImagePreprocessor()(examples) + 1) / 2, torch.tensor([example["label"] for example in examples])


@pytest.fixture(scope="module")
def mnist(real_mnist: Path) -> dict:
    """Real digits, the classifier, and `score`: quality against the reference set, the first N test digits."""
    test_images, test_labels = labelled_digits(real_mnist, "test")
    train_images, _ = labelled_digits(real_mnist, "train", N)
    classifier = load_mnist_classifier()
    reference = classifier_outputs(test_images[:N], classifier, progress=False)

    def score(images: torch.Tensor) -> SampleQuality:
        # KID subsets of N digits out of N are all the same: one is enough.
        return sample_quality(classifier_outputs(images, classifier, progress=False), reference, kid_subsets=1)

    return {
        "test_images": test_images,
        "test_labels": test_labels,
        "classifier": classifier,
        "score": score,
        "floor": score(train_images),
        "real": score(test_images[N : 2 * N]),
    }


def test_shipped_classifier_reproduces_its_recorded_accuracy(mnist):
    assert WEIGHTS_PATH.stat().st_size < 1_000_000
    recorded = recorded_test_accuracy()
    assert recorded >= 0.99
    logits = classifier_outputs(mnist["test_images"], mnist["classifier"], progress=False).logits
    accuracy = (logits.argmax(1) == mnist["test_labels"]).double().mean().item()
    assert accuracy == pytest.approx(recorded, abs=1e-4)


def test_real_test_digits_score_near_the_real_vs_real_floor(mnist):
    real, floor = mnist["real"], mnist["floor"]
    assert real.fid < 2 * floor.fid and real.kid < max(2 * floor.kid, 0.01)
    for quality in (real, floor):
        assert quality.precision > 0.8 and quality.recall > 0.8
        assert quality.mean_confidence > 0.98
        assert quality.class_entropy > 3.25 and quality.rarest_class_share > 0.06


def test_noise_is_far_from_digits_in_fid_and_precision(mnist):
    noise = torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    quality = mnist["score"](noise)
    assert quality.fid > 20 * mnist["floor"].fid
    assert quality.precision < 0.05 and quality.recall < 0.05


def test_blurred_digits_lose_classifier_confidence(mnist):
    x = torch.arange(-4, 5, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * 1.5**2))
    kernel = (kernel[:, None] * kernel[None, :] / kernel.sum() ** 2)[None, None]
    blurred = F.conv2d(mnist["test_images"][N : 2 * N], kernel, padding=4)
    quality = mnist["score"](blurred)
    assert quality.mean_confidence < mnist["real"].mean_confidence - 0.1
    assert quality.fid > 5 * mnist["floor"].fid


def test_a_single_digit_set_is_caught_by_the_class_histogram(mnist):
    ones = mnist["test_images"][mnist["test_labels"] == 1][:N]
    quality = mnist["score"](ones)
    assert quality.class_entropy < 0.2 and quality.rarest_class_share == 0
    assert quality.recall < 0.3
    assert quality.fid > 20 * mnist["floor"].fid


def features(*blocks: torch.Tensor) -> ClassifierOutputs:
    """Classifier outputs with the given features (and uniform logits)."""
    stacked = torch.cat(blocks)
    return ClassifierOutputs(stacked, torch.zeros(len(stacked), 10))


def test_fid_of_shifted_gaussians_is_the_squared_shift():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(4000, 4, generator=gen)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5])
    quality = sample_quality(features(torch.randn(4000, 4, generator=gen) + shift), features(reference), kid_subsets=2)
    assert quality.fid == pytest.approx(shift.square().sum().item(), rel=0.05)
    same = sample_quality(features(torch.randn(4000, 4, generator=gen)), features(reference), kid_subsets=2)
    assert same.fid < 0.01 and abs(same.kid) < 0.01 * quality.kid


def test_precision_and_recall_split_fidelity_from_coverage():
    gen = torch.Generator().manual_seed(0)
    angles = torch.arange(8) * math.pi / 4
    centres = 20 * torch.stack([angles.cos(), angles.sin()], 1)  # eight well-separated modes in the plane
    modes = torch.arange(800) % 8
    reference = centres[modes] + torch.randn(800, 2, generator=gen)
    half_the_modes = centres[modes % 4] + torch.randn(800, 2, generator=gen)
    quality = sample_quality(features(half_the_modes), features(reference), kid_subsets=1)
    assert quality.precision > 0.95
    assert quality.recall == pytest.approx(0.5, abs=0.05)
    elsewhere = sample_quality(features(reference + 100), features(reference), kid_subsets=1)
    assert elsewhere.precision == 0 and elsewhere.recall == 0


def test_class_histogram_entropy_and_rarest_share():
    logits = torch.full((40, 10), -10.0)
    logits[torch.arange(40), torch.arange(40) % 4] = 10.0  # digits 0-3 ten times each
    outputs = ClassifierOutputs(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), logits)
    quality = sample_quality(outputs, outputs, kid_subsets=1)
    assert quality.class_histogram == [0.25] * 4 + [0.0] * 6
    assert quality.class_entropy == pytest.approx(2.0)
    assert quality.rarest_class_share == 0
    assert quality.mean_confidence == pytest.approx(1.0, abs=1e-6)


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        classifier_outputs(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(x_0 \+ 1\) / 2"):
        classifier_outputs(torch.full((2, 1, 28, 28), -1.0))
    with pytest.raises(ValueError, match="more than k=3"):
        sample_quality(features(torch.zeros(3, 2)), features(torch.zeros(10, 2)))


def test_class_accuracy_reads_real_digits_as_their_labels_and_wrong_labels_as_wrong(mnist):
    images, labels = mnist["test_images"][:N], mnist["test_labels"][:N]
    outputs = classifier_outputs(images, mnist["classifier"], progress=False)
    right = class_accuracy(outputs, labels)
    assert right.accuracy > 0.97 and right.num_images == N
    assert all(share > 0.9 for share in right.per_class)
    wrong = class_accuracy(outputs, (labels + 1) % 10)
    assert wrong.accuracy < 0.05
    # The threes asked for as eights: the eights' accuracy drops, no three was asked for, the rest are unchanged.
    shifted = labels.clone()
    shifted[labels == 3] = 8
    partly = class_accuracy(outputs, shifted)
    assert partly.per_class[8] < 0.6 and math.isnan(partly.per_class[3])
    assert [partly.per_class[d] for d in (0, 1, 2, 4, 5, 6, 7, 9)] == [
        right.per_class[d] for d in (0, 1, 2, 4, 5, 6, 7, 9)
    ]
    with pytest.raises(ValueError, match="need one class label per sample"):
        class_accuracy(outputs, labels[:-1])


def test_balanced_labels_ask_for_every_digit_equally_often():
    assert balanced_class_labels(1000).bincount().tolist() == [100] * 10
    assert balanced_class_labels(12).tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert balanced_class_labels(10).tolist() == list(range(10))
    assert balanced_class_labels(25).bincount(minlength=10).tolist() == [3, 2, 3, 2, 3, 2, 3, 2, 3, 2]
    with pytest.raises(ValueError, match="num_samples 9 cannot hold every digit 0-9; pass at least 10"):
        balanced_class_labels(9)
