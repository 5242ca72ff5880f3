"""Sample quality of generated digits, measured with the features of this project's MNIST classifier.

One pass of the classifier (`classifier.py`) over each set of digits gives 128 features and 10 logits per digit; from
them, against a reference set of real digits: FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) by torchmetrics,
handed the features computed here; precision and recall (Kynkaanniemi et al. 2019); the classifier's mean confidence;
the histogram of predicted digits, its entropy in bits and the share of the rarest digit. What each score catches, and
why a score means little without the real-vs-real floor beside it: README.md beside this file. These are not
Inception FIDs and cannot be compared with the FIDs of papers.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from .classifier import NUM_CLASSES, MnistClassifier, load_mnist_classifier

# A blob is a sample with a grey background, which no MNIST digit has: the mean of its outer BLOB_FRAME pixels on each
# side is above BLOB_BORDER_MEAN (in [0, 1]). Of the 10,000 test digits the highest such mean is 0.044; most are 0.
BLOB_FRAME = 3
BLOB_BORDER_MEAN = 0.1


@dataclass
class ClassifierOutputs:
    """The classifier's view of a set of digits: penultimate features (N, 128) and logits (N, 10)."""

    features: torch.Tensor
    logits: torch.Tensor


@dataclass
class SampleQuality:
    """Quality scores of a set of digits against a reference set (see the module docstring)."""

    fid: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    mean_confidence: float
    class_entropy: float
    rarest_class_share: float
    class_histogram: list[float]
    num_images: int

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """The scores as a JSON-ready dict."""
        return asdict(self)


@torch.no_grad()
def classifier_outputs(
    images: torch.Tensor, classifier: MnistClassifier | None = None, batch_size: int = 500, progress: bool = True
) -> ClassifierOutputs:
    """Features and logits of digits (N, 1, 28, 28) in [0, 1] (the pipeline's "pt" output), batch by batch."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28) or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, 1, 28, 28) batch of digits, got {tuple(images.shape)}.")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("images must lie in [0, 1]; map x_0 in [-1, 1] with (x_0 + 1) / 2.")
    classifier = classifier if classifier is not None else load_mnist_classifier()
    device = next(classifier.parameters()).device
    features, logits = [], []
    for batch in tqdm(images.split(batch_size), desc="classifier features", disable=not progress):
        batch_features = classifier.features(batch.to(device, torch.float32))
        features.append(batch_features.cpu())
        logits.append(classifier.head(batch_features).cpu())
    return ClassifierOutputs(torch.cat(features), torch.cat(logits))


def sample_quality(
    samples: ClassifierOutputs,
    reference: ClassifierOutputs,
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> SampleQuality:
    """Score `samples` against `reference` (both from `classifier_outputs`); `seed` fixes the random subsets.

    Precision and recall compare the samples with as many reference digits (a random subset if there are more), since
    k-NN radii shrink as a set grows. KID averages `kid_subsets` subsets of min(`kid_subset_size`, both set sizes)
    digits (torchmetrics' defaults; each subset costs three kernel matrices of that size squared, in float64).
    """
    num_samples, num_reference = len(samples.features), len(reference.features)
    if min(num_samples, num_reference) <= k:
        raise ValueError(f"need more than k={k} samples and reference digits, got {num_samples} and {num_reference}.")
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(num_reference, generator=generator)[:num_samples]
    kid_subset_size = min(kid_subset_size, num_samples, num_reference)
    fid, kid, kid_std = _fid_kid(samples.features, reference.features, kid_subsets, kid_subset_size, seed)
    probabilities = samples.logits.softmax(1)
    histogram = torch.bincount(probabilities.argmax(1), minlength=NUM_CLASSES).double() / num_samples
    seen = histogram[histogram > 0]
    return SampleQuality(
        fid=fid,
        kid=kid,
        kid_std=kid_std,
        precision=_manifold_coverage(samples.features, reference.features[subset], k),
        recall=_manifold_coverage(reference.features[subset], samples.features, k),
        mean_confidence=probabilities.max(1).values.mean().item(),
        class_entropy=(seen * (1 / seen).log2()).sum().item(),
        rarest_class_share=histogram.min().item(),
        class_histogram=histogram.tolist(),
        num_images=num_samples,
    )


def blob_mask(images: torch.Tensor) -> torch.Tensor:
    """Which digits (N, 1, 28, 28) in [0, 1] are blobs: a (N,) bool tensor, True where the frame of `BLOB_FRAME` pixels
    around the digit has a mean intensity above `BLOB_BORDER_MEAN`, more than twice that of any MNIST test digit."""
    frame = torch.ones(images.shape[-2:], dtype=torch.bool)
    frame[BLOB_FRAME:-BLOB_FRAME, BLOB_FRAME:-BLOB_FRAME] = False
    return images[..., frame].flatten(1).mean(1) > BLOB_BORDER_MEAN


@dataclass
class ClassAccuracy:
    """How often the classifier reads a class-conditional sample as the digit it was asked for."""

    accuracy: float
    per_class: list[float]  # the accuracy for each requested digit 0-9 (NaN for a digit never requested)
    num_images: int


def balanced_class_labels(num_samples: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """`num_samples` class labels with every class equally often (to within one): 0, 0, ..., 1, 1, ..., 9."""
    if num_samples < num_classes:
        raise ValueError(
            f"num_samples {num_samples} cannot hold every digit 0-{num_classes - 1}; pass at least {num_classes}."
        )
    return torch.arange(num_samples) * num_classes // num_samples


def class_accuracy(samples: ClassifierOutputs, class_labels: torch.Tensor) -> ClassAccuracy:
    """The share of samples that the classifier reads as their requested `class_labels`, overall and per digit."""
    class_labels = torch.as_tensor(class_labels).cpu()
    if class_labels.shape != (len(samples.logits),):
        raise ValueError(
            f"need one class label per sample, got {tuple(class_labels.shape)} for {len(samples.logits)} samples."
        )
    correct = (samples.logits.argmax(1) == class_labels).double()
    per_class = [correct[class_labels == digit].mean().item() for digit in range(NUM_CLASSES)]
    return ClassAccuracy(correct.mean().item(), per_class, len(correct))


def _fid_kid(
    sample_features: torch.Tensor, reference_features: torch.Tensor, kid_subsets: int, kid_subset_size: int, seed: int
) -> tuple[float, float, float]:
    """FID, KID mean and KID standard deviation over subsets, by torchmetrics, in float64."""
    extractor = nn.Identity()  # FID and KID receive the features computed beforehand
    extractor.num_features = sample_features.shape[1]
    fid = FrechetInceptionDistance(feature=extractor)
    with warnings.catch_warnings():  # KID's note that it keeps every feature in memory: 10,000 x 128 floats here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=kid_subset_size)
    for metric in (fid, kid):
        metric.update(reference_features.double(), real=True)
        metric.update(sample_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return fid.compute().item(), kid_mean.item(), kid_std.item()


def _manifold_coverage(query: torch.Tensor, manifold: torch.Tensor, k: int) -> float:
    """The share of `query` points within the k-NN radius of some `manifold` point (Kynkaanniemi et al. 2019, eq. 1)."""
    # Radius of each manifold point: the distance to its k-th nearest neighbour, itself (at distance 0) excluded.
    radii = torch.cat([torch.cdist(chunk, manifold).kthvalue(k + 1, dim=1).values for chunk in manifold.split(1024)])
    inside = [(torch.cdist(chunk, manifold) <= radii).any(1) for chunk in query.split(1024)]
    return torch.cat(inside).double().mean().item()
