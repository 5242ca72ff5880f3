"""Evaluation of a saved pipeline: draw digits with a named scheduler, score them beside the real floor, bound the NLL.

The one place that `ddpm-mnist sample | evaluate | nll`, `training/release.py` and `benchmarks/*.py` call:

    pipe = load_pipeline("pretrained/ddpm-mnist-small", device="cpu", dtype="fp32")
    reference = QualityReference("ylecun/mnist")                  # the MNIST test digits, as the classifier sees them
    floor = reference.floor(1000)                                  # 1000 real training digits against the same digits
    samples = generate_digits(pipe, 1000, scheduler="ddim", num_inference_steps=50, seed=0)
    quality = reference.score(samples)                             # FID, KID, precision, recall, ... beside `floor`
    x_0 = load_nll_digits(pipe, "ylecun/mnist", nll_images=1000)
    bound = nll_bound(pipe, x_0)                                   # the variational bound of eq. 5, in bits/dim

A class-conditional pipeline is scored on balanced labels, each digit equally often, with its class accuracy (how
often the classifier reads a sample as the digit asked for), at one guidance scale or over a sweep of them:

    labels = balanced_class_labels(1000)                           # 0, 0, ..., 9 (from metrics.quality)
    samples = generate_digits(pipe, 1000, class_labels=labels, guidance_scale=2.0, scheduler="ddim", seed=0)
    scores = reference.score_conditional(samples, labels)          # .quality as above, .accuracy overall and per digit
    sweep = guidance_sweep(pipe, reference, 1000, (1, 1.5, 2, 3, 5))  # {guidance scale: scores}

For the editing commands, `load_test_digits` picks MNIST test digits by index (`load_test_labels` their labels).
Bad input raises a ValueError (or an OSError for a path or file) naming the argument to fix, before any sampling.
Scores use the features of the package's MNIST classifier: compare them with the floor, never with Inception FIDs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from .data import decode_labels, load_image_stream, load_x_0
from .errors import first_line
from .metrics.classifier import load_mnist_classifier
from .metrics.likelihood import VariationalBound, variational_bound
from .metrics.quality import (
    ClassAccuracy,
    ClassifierOutputs,
    SampleQuality,
    balanced_class_labels,
    class_accuracy,
    classifier_outputs,
    sample_quality,
)
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .schedulers import FAST_SCHEDULER_STEPS, SCHEDULERS
from .scheduling_ddpm_mnist import DDPMMnistScheduler

# Inference dtypes by their command-line name.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_SCORED_IMAGES = 4  # precision and recall need more digits than their k = 3 neighbours
DEFAULT_GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0, 5.0)  # the classifier-free guidance scales a sweep draws with


def default_device() -> str:
    """The device an entry point uses unless told otherwise: the GPU where there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device that exists here; a ValueError naming the fix otherwise."""
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {str(device)!r} is not a torch device ({error}); pass cpu or cuda.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda, but CUDA is not available here; pass cpu.")
    return device


def load_pipeline(
    name_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> DDPMMnistPipeline:
    """A saved pipeline (a folder written by `save_pretrained`, or a Hub repo id) on `device`, in `dtype` (of `DTYPES`).

    A bad device or dtype is a ValueError, a missing folder a FileNotFoundError, one that does not load an OSError.
    """
    name = os.fspath(name_or_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pass one of them.")
    device = check_device(device)
    path = os.path.expanduser(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(f"{name!r} is not a folder; pass one saved by save_pretrained, or a Hub repo id.")
    try:
        pipe = DDPMMnistPipeline.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        raise OSError(f"cannot load the pipeline {name!r}: {first_line(error)}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def scheduler_steps(pipe: DDPMMnistPipeline, scheduler: str | None, num_inference_steps: int | None = None) -> int:
    """The checked step count of the named scheduler on `pipe` (None: the pipeline's own, as a distilled student's): by
    default all T steps for DDPM (named, or the pipeline's own), 50 for the others."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}; pass one of them.")
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    if num_inference_steps is None:
        own_ddpm = scheduler is None and isinstance(pipe.scheduler, SCHEDULERS["ddpm"].scheduler_class)
        ddpm = scheduler == "ddpm" or own_ddpm
        return num_train_timesteps if ddpm else min(FAST_SCHEDULER_STEPS, num_train_timesteps)
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps {num_inference_steps} is outside 1..{num_train_timesteps}, the pipeline's "
            "training timesteps; pass a count in that range."
        )
    return num_inference_steps


def scoring_labels(
    pipe: DDPMMnistPipeline, num_samples: int, guidance_scale: float, guidance_interval: tuple[int, int] | None = None
) -> torch.Tensor | None:
    """The class labels `num_samples` digits of `pipe` are scored with: each digit equally often for a conditional
    pipeline, None for an unconditional one. Guidance above 1 for an unconditional pipeline, or below 1, is refused."""
    if guidance_scale > 1 and not pipe.is_class_conditional:
        raise ValueError("guidance_scale above 1 needs a class-conditional pipeline; leave it at 1.")
    class_labels = balanced_class_labels(num_samples) if pipe.is_class_conditional else None
    pipe.check_class_inputs(class_labels, guidance_scale, num_samples, guidance_interval)
    return class_labels


@torch.no_grad()
def generate_digits(
    pipe: DDPMMnistPipeline,
    num_samples: int,
    *,
    scheduler: str | None = "ddpm",
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[int, int] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """`num_samples` digits (N, 1, 28, 28) in [0, 1], float32 on the CPU, from the named scheduler (Algorithm 2 for
    ddpm; None: the pipeline's own, as a distilled student's) on the pipeline's schedule, batch by batch from one CPU
    generator seeded with `seed`.

    A class-conditional pipeline draws digit `class_labels[i]` as sample i (one label per sample; None: any digit),
    with classifier-free guidance when `guidance_scale` is above 1 (at the timesteps of `guidance_interval` only, if
    given). The scheduler replaces `pipe.scheduler` for the call only: the pipeline keeps the one it was saved with.
    """
    steps = scheduler_steps(pipe, scheduler, num_inference_steps)
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}.")
    if class_labels is not None and len(class_labels) != num_samples:
        raise ValueError(f"got {len(class_labels)} class_labels for num_samples {num_samples}; pass one per sample.")
    pipe.check_class_inputs(class_labels, guidance_scale, num_samples, guidance_interval)
    saved_scheduler = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(saved_scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    starts, name = range(0, num_samples, batch_size), scheduler or "own scheduler"
    try:
        batches = [
            pipe(
                batch_size=min(batch_size, num_samples - start),
                class_labels=None if class_labels is None else class_labels[start : start + batch_size],
                guidance_scale=guidance_scale,
                guidance_interval=guidance_interval,
                generator=generator,
                num_inference_steps=steps,
                output_type="pt",
            ).images
            for start in tqdm(starts, desc=f"sampling, {name} {steps} steps", unit="batch", disable=not progress)
        ]
    finally:
        pipe.scheduler = saved_scheduler
    return torch.cat([batch.float().cpu() for batch in batches])


def load_test_digits(dataset_name: str | os.PathLike, test_digits: Sequence[int]) -> torch.Tensor:
    """The MNIST test digits at the indexes `test_digits` as x_0 (N, 1, 28, 28) in [-1, 1], in the order given."""
    if min(test_digits) < 0:
        raise ValueError(f"test_digits {list(test_digits)} holds a negative index; pass indexes from 0.")
    try:
        x_0 = load_x_0(dataset_name, "test", max(test_digits) + 1)
    except ValueError as error:
        raise ValueError(f"cannot read test digit {max(test_digits)}: {error}") from error
    return x_0[list(test_digits)]


def load_test_labels(dataset_name: str | os.PathLike, test_digits: Sequence[int]) -> torch.Tensor:
    """The labels (N,) of the MNIST test digits at the indexes `test_digits`, in the order given."""
    labels = decode_labels(load_image_stream(dataset_name, "test", label_column="label"))
    if max(test_digits) >= len(labels):
        raise ValueError(f"test_digits {list(test_digits)} go past the {len(labels)} test digits; pass lower ones.")
    return labels[list(test_digits)]


@dataclass
class ConditionalQuality:
    """The scores of class-conditional samples: `quality` as for any samples, and the class accuracy."""

    quality: SampleQuality
    accuracy: ClassAccuracy

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """The quality scores with `class_accuracy` (overall) and `class_accuracy_per_digit` (0-9), JSON-ready."""
        accuracy = {"class_accuracy": self.accuracy.accuracy, "class_accuracy_per_digit": self.accuracy.per_class}
        return {**self.quality.as_dict(), **accuracy}


class QualityReference:
    """The MNIST test digits as the package's classifier sees them, against which samples and the floor are scored.

    Args:
        dataset_name: MNIST, a Hub dataset id or a local copy laid out like `ylecun/mnist`.
        reference_images: how many test digits, the first ones of the split (None: all 10,000).
        device: where the classifier runs.
        seed: the seed of the floor's training digits and of the metrics' random subsets.
        progress: show progress bars.

    The floor of N is the same metrics for N real training digits (a seeded random subset) against the same test
    digits: what real digits score at that sample count, the number to read every score beside.
    """

    def __init__(
        self,
        dataset_name: str | os.PathLike,
        reference_images: int | None = None,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if reference_images is not None and reference_images < MIN_SCORED_IMAGES:
            raise ValueError(f"reference_images must be at least {MIN_SCORED_IMAGES}, got {reference_images}.")
        self.classifier = load_mnist_classifier(device=check_device(device))
        self.dataset_name, self.seed, self.progress = dataset_name, seed, progress
        test_digits = load_x_0(dataset_name, "test", reference_images)
        self.num_images = len(test_digits)  # the number of test digits scored against
        self.outputs = classifier_outputs((test_digits + 1) / 2, self.classifier, progress=progress)
        self._floors: dict[int, SampleQuality] = {}

    def score(self, samples: torch.Tensor) -> SampleQuality:
        """FID, KID, precision, recall, confidence and class balance of digits (N, 1, 28, 28) in [0, 1]."""
        return sample_quality(self._classify(samples), self.outputs, seed=self.seed)

    def score_conditional(self, samples: torch.Tensor, class_labels: torch.Tensor) -> ConditionalQuality:
        """`score`, and how often the classifier reads sample i as the digit `class_labels[i]` it was drawn as."""
        outputs = self._classify(samples)
        quality = sample_quality(outputs, self.outputs, seed=self.seed)
        return ConditionalQuality(quality, class_accuracy(outputs, class_labels))

    def _classify(self, samples: torch.Tensor) -> ClassifierOutputs:
        """The classifier's features and logits of digits to be scored, of which there must be enough."""
        if len(samples) < MIN_SCORED_IMAGES:
            raise ValueError(f"num_samples must be at least {MIN_SCORED_IMAGES} to be scored, got {len(samples)}.")
        return classifier_outputs(samples, self.classifier, progress=self.progress)

    def floor(self, num_samples: int) -> SampleQuality:
        """The real-vs-real floor of `num_samples` training digits, computed once per count (call it before sampling: a
        count the training split cannot give then fails early)."""
        if num_samples not in self._floors:
            if num_samples < MIN_SCORED_IMAGES:
                raise ValueError(f"num_samples must be at least {MIN_SCORED_IMAGES} to be scored, got {num_samples}.")
            real = load_x_0(self.dataset_name, "train", num_samples, seed=self.seed)
            self._floors[num_samples] = self.score((real + 1) / 2)
        return self._floors[num_samples]


def guidance_sweep(
    pipe: DDPMMnistPipeline,
    reference: QualityReference,
    num_samples: int,
    guidance_scales: Sequence[float] = DEFAULT_GUIDANCE_SCALES,
    *,
    scheduler: str = "ddpm",
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[float, ConditionalQuality]:
    """The scores of a class-conditional pipeline at each classifier-free guidance scale, in the order given.

    Each scale draws `num_samples` digits with balanced labels (`balanced_class_labels`) from the same seed, so the
    scales differ only in guidance. Guidance trades variety (FID, recall) for digits read as the one asked for (class
    accuracy, confidence). Every scale is checked before the first digit is drawn.
    """
    if not pipe.is_class_conditional:
        raise ValueError("a guidance sweep needs a class-conditional pipeline (its UNet has num_class_embeds).")
    if not guidance_scales:
        raise ValueError("guidance_scales is empty; pass at least one scale, e.g. 1 1.5 2 3 5.")
    class_labels = balanced_class_labels(num_samples)
    for guidance_scale in guidance_scales:
        pipe.check_class_inputs(class_labels, guidance_scale, num_samples)
    sampling = dict(scheduler=scheduler, num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size)
    draw = partial(generate_digits, pipe, num_samples, class_labels=class_labels, progress=progress, **sampling)
    return {scale: reference.score_conditional(draw(guidance_scale=scale), class_labels) for scale in guidance_scales}


def _check_nll_timesteps(pipe: DDPMMnistPipeline, nll_timesteps: int | None) -> None:
    """A sampled-timestep count of the bound lies in 1..T-1 (T - 1 diffusion terms exist)."""
    num_terms = pipe.scheduler.config.num_train_timesteps - 1
    if nll_timesteps is not None and not 1 <= nll_timesteps <= num_terms:
        raise ValueError(
            f"nll_timesteps {nll_timesteps} is outside 1..{num_terms}, the pipeline's diffusion terms (T - 1); "
            "pass a count in that range, or none for the exact bound."
        )


def load_nll_digits(
    pipe: DDPMMnistPipeline,
    dataset_name: str | os.PathLike,
    *,
    split: str = "test",
    nll_images: int | None = None,
    nll_timesteps: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The digits to bound the NLL on, at the UNet's `sample_size` (a seeded subset of `nll_images`; None: all),
    after checking `nll_timesteps` against the pipeline: every input of `nll_bound`, checked before it runs."""
    _check_nll_timesteps(pipe, nll_timesteps)
    return load_x_0(dataset_name, split, nll_images, sample_size=pipe.unet.config.sample_size, seed=seed)


def nll_bound(
    pipe: DDPMMnistPipeline,
    x_0: torch.Tensor,
    *,
    nll_timesteps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> VariationalBound:
    """The variational bound of eq. 5 on `x_0` in bits/dim, on the pipeline's DDPM schedule.

    Exact over all T terms without `nll_timesteps`; with K, an unbiased estimate of the diffusion terms from K
    sampled timesteps per digit (see `metrics/likelihood.py`). The noise of x_t comes from a generator seeded with
    `seed`.
    """
    _check_nll_timesteps(pipe, nll_timesteps)
    scheduler, generator = DDPMMnistScheduler.from_config(pipe.scheduler.config), torch.Generator().manual_seed(seed)
    options = dict(num_timesteps=nll_timesteps, batch_size=batch_size, generator=generator, progress=progress)
    return variational_bound(pipe.unet, scheduler, x_0, image_size=pipe.config.image_size, **options)
