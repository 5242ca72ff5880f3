"""Sample quality against wall time of few-step sampling: DDPM, DDIM, DPM-Solver++ and UniPC at 10 to 1000 steps.

    python benchmarks/sampler_quality.py PIPELINE [--schedulers ddpm ddim dpm++ unipc] [--steps 10 20 50 100 1000]
        [--num-samples 1000] [--reference-images 10000] [--dataset ylecun/mnist] [--seed 0] [--batch-size 250]
        [--device cpu] [--json]

PIPELINE is a folder saved by `DDPMMnistPipeline.save_pretrained` or a Hub repo id. On a machine without the Hub,
pass `--dataset ../shared/data/mnist` (a local copy of ylecun/mnist).

Each cell (sampler, steps) draws --num-samples digits from one generator seeded with --seed (the same seed in every
cell, so every sampler starts from the same noise), timed with `time.perf_counter` around the sampling alone, and
scores them with `ddpm_mnist.metrics.quality.sample_quality` (FID, KID, precision, recall, classifier confidence,
share of the rarest predicted digit) against the first --reference-images MNIST test digits, whose classifier
features are computed once. The floor row scores as many real MNIST training digits against the same reference:
what real digits score at this sample count. Step counts above the pipeline's training timesteps T are skipped.

The table gives each FID as a multiple of the FID of DDPM at 1000 steps (the paper's sampler) when that cell ran,
and the summary names, per sampler, the fewest steps whose FID is at most 10% above it. With --json the last line
is one JSON object with every cell, the floor and that summary (null when DDPM at 1000 steps did not run).
FIDs here come from the project's MNIST classifier, not Inception: compare them only with each other.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.cli import SCHEDULERS, UsageError, _int_at_least, generate_digits, load_pipeline
from ddpm_mnist.data import DEFAULT_DATASET, load_x_0
from ddpm_mnist.metrics.classifier import load_mnist_classifier
from ddpm_mnist.metrics.quality import ClassifierOutputs, SampleQuality, classifier_outputs, sample_quality

DEFAULT_STEPS = [10, 20, 50, 100, 1000]
BASELINE = ("ddpm", 1000)  # the sampler every FID is compared with: Algorithm 2 over all T = 1000 steps
TOLERANCE = 0.10  # "as good as the baseline": an FID at most 10% above the baseline's


@dataclass
class Cell:
    """The samples of one sampler at one step count: their scores and the seconds their sampling took."""

    scheduler: str
    steps: int
    quality: SampleQuality
    seconds: float

    def as_dict(self, baseline_fid: float | None) -> dict[str, str | int | float | None]:
        """The JSON entry of the cell."""
        return {
            "scheduler": self.scheduler,
            "steps": self.steps,
            "fid": self.quality.fid,
            "fid_vs_ddpm_1000": fid_ratio(self.quality.fid, baseline_fid),
            "kid": self.quality.kid,
            "precision": self.quality.precision,
            "recall": self.quality.recall,
            "mean_confidence": self.quality.mean_confidence,
            "rarest_class_share": self.quality.rarest_class_share,
            "seconds": self.seconds,
            "images_per_second": self.quality.num_images / self.seconds,
        }


def _spaced(values: Iterable[object]) -> str:
    """A default list as it is typed on the command line."""
    return " ".join(map(str, values))


def build_parser() -> argparse.ArgumentParser:
    """The script's options, each with its default in --help."""
    parser = argparse.ArgumentParser(
        prog="sampler_quality.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pipeline", metavar="PIPELINE", help="a folder saved by save_pretrained, or a Hub repo id")
    parser.add_argument(
        "--schedulers",
        nargs="+",
        choices=SCHEDULERS,
        default=list(SCHEDULERS),
        metavar="NAME",
        help=f"samplers to compare, of {', '.join(SCHEDULERS)} (default: {_spaced(SCHEDULERS)})",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=_int_at_least(1),
        default=DEFAULT_STEPS,
        help=f"step counts of each sampler, those above the pipeline's T skipped (default: {_spaced(DEFAULT_STEPS)})",
    )
    parser.add_argument(
        "--num-samples", type=_int_at_least(4), default=1000, help="digits sampled per cell (default: %(default)s)"
    )
    parser.add_argument(
        "--reference-images",
        type=_int_at_least(4),
        default=10_000,
        help="MNIST test digits to compare with, the first ones of the split (default: %(default)s)",
    )
    parser.add_argument(
        "--dataset", default=DEFAULT_DATASET, help="MNIST: a Hub dataset id or a local copy (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of each cell's noise and of the floor's digits (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=_int_at_least(1), default=250, help="images per pipeline call (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line (default: a table only)"
    )
    return parser


def split_steps(steps: list[int], num_train_timesteps: int) -> tuple[list[int], list[int]]:
    """The distinct step counts in increasing order: those a pipeline with T timesteps can run, and those above T."""
    ordered = sorted(set(steps))
    return [s for s in ordered if s <= num_train_timesteps], [s for s in ordered if s > num_train_timesteps]


def load_real_digits(dataset: str, split: str, num_images: int, seed: int | None) -> torch.Tensor:
    """`num_images` MNIST digits (N, 1, 28, 28) in [0, 1]; a bad dataset or count is a UsageError."""
    try:
        x_0 = load_x_0(dataset, split, num_images, sample_size=28, seed=seed)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error).splitlines()[0]) from error
    return (x_0 + 1) / 2


def timed_samples(
    pipe: DDPMMnistPipeline, num_images: int, steps: int, seed: int, batch_size: int
) -> tuple[torch.Tensor, float]:
    """The digits of `generate_digits` and the wall seconds their sampling took (`.cpu()` waits for the device)."""
    start = time.perf_counter()
    images = generate_digits(pipe, num_images, steps, seed, batch_size, progress=False)
    return images, time.perf_counter() - start


def fid_ratio(fid: float, baseline_fid: float | None) -> float | None:
    """`fid` as a multiple of the baseline's FID, or None without a (positive) baseline."""
    return fid / baseline_fid if baseline_fid else None


def baseline_fid(cells: list[Cell]) -> float | None:
    """The FID of DDPM at 1000 steps, if that cell ran."""
    return next((c.quality.fid for c in cells if (c.scheduler, c.steps) == BASELINE), None)


def fewest_steps_near_baseline(cells: list[Cell], tolerance: float = TOLERANCE) -> dict[str, int | None] | None:
    """Per sampler, the fewest steps whose FID is at most `tolerance` above DDPM-1000's (None if never);
    None as a whole if DDPM at 1000 steps did not run."""
    reference = baseline_fid(cells)
    if reference is None:
        return None
    fewest: dict[str, int | None] = {}
    for cell in cells:
        fewest.setdefault(cell.scheduler, None)
        if cell.quality.fid <= (1 + tolerance) * reference:
            current = fewest[cell.scheduler]
            fewest[cell.scheduler] = cell.steps if current is None else min(current, cell.steps)
    return fewest


def score(images: torch.Tensor, classifier: torch.nn.Module, reference: ClassifierOutputs, seed: int) -> SampleQuality:
    """Quality of digits in [0, 1] against the reference's classifier outputs."""
    return sample_quality(classifier_outputs(images, classifier, progress=False), reference, seed=seed)


def _number(value: float | None, digits: int = 4) -> str:
    """A table entry: the value rounded, or a dash when there is none."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _row(label: str, steps: str, quality: SampleQuality, seconds: float | None, reference: float | None) -> str:
    """One Markdown table row of scores."""
    per_second = quality.num_images / seconds if seconds else None
    entries = [
        label,
        steps,
        _number(quality.fid),
        _number(fid_ratio(quality.fid, reference), 2),
        _number(quality.kid),
        _number(quality.precision, 3),
        _number(quality.recall, 3),
        _number(quality.mean_confidence, 3),
        _number(quality.rarest_class_share, 3),
        _number(seconds, 1),
        _number(per_second, 2),
    ]
    return "| " + " | ".join(entries) + " |"


def markdown_table(cells: list[Cell], floor: SampleQuality) -> str:
    """One row per cell, then the real-vs-real floor."""
    reference = baseline_fid(cells)
    columns = ["sampler", "steps", "FID", "FID / DDPM-1000", "KID", "precision", "recall", "mean confidence"]
    columns += ["rarest digit", "seconds", "images/s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += [_row(c.scheduler, str(c.steps), c.quality, c.seconds, reference) for c in cells]
    lines.append(_row(f"real floor ({floor.num_images} train digits)", "-", floor, None, reference))
    return "\n".join(lines)


def summary_lines(cells: list[Cell]) -> list[str]:
    """One line per sampler: the fewest steps within 10% of DDPM-1000's FID."""
    fewest = fewest_steps_near_baseline(cells)
    if fewest is None:
        return ["(DDPM at 1000 steps was not run: no steps-to-match summary)"]
    reference = baseline_fid(cells)
    return [
        f"{name}: FID within {TOLERANCE:.0%} of DDPM-1000 ({reference:.4f}) at "
        + (f"{steps} steps" if steps is not None else "none of the step counts run")
        for name, steps in fewest.items()
    ]


def run_cells(
    pipe: DDPMMnistPipeline,
    schedulers: list[str],
    steps: list[int],
    args: argparse.Namespace,
    classifier: torch.nn.Module,
    reference: ClassifierOutputs,
) -> list[Cell]:
    """Sample and score every (sampler, steps) cell, each sampler built on the pipeline's own schedule."""
    config = pipe.scheduler.config
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=1, num_inference_steps=1, output_type="pt")  # warm-up: first-call costs stay out of the timings
    cells = []
    for name in schedulers:
        pipe.scheduler = SCHEDULERS[name].from_config(config)
        for count in steps:
            images, seconds = timed_samples(pipe, args.num_samples, count, args.seed, args.batch_size)
            cells.append(Cell(name, count, score(images, classifier, reference, args.seed), seconds))
            print(f"{name} at {count} steps: FID {cells[-1].quality.fid:.4f} in {seconds:.1f} s", flush=True)
    return cells


def main(argv: list[str] | None = None) -> None:
    """Check the options, load everything, then sample, score and print the table (and the JSON object)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    schedulers = list(dict.fromkeys(args.schedulers))

    # Everything that can fail on bad input, before any sampling.
    try:
        pipe = load_pipeline(args.pipeline, args.device)
        num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        steps, skipped = split_steps(args.steps, num_train_timesteps)
        if not steps:
            raise UsageError(f"every --steps value exceeds the pipeline's {num_train_timesteps} training timesteps.")
        classifier = load_mnist_classifier(device=args.device)
        reference_digits = load_real_digits(args.dataset, "test", args.reference_images, seed=None)
        floor_digits = load_real_digits(args.dataset, "train", args.num_samples, seed=args.seed)
    except (UsageError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for count in skipped:
        print(f"note: skipping {count} steps, more than the pipeline's {num_train_timesteps} training timesteps")

    reference = classifier_outputs(reference_digits, classifier, progress=False)
    floor = score(floor_digits, classifier, reference, args.seed)
    cells = run_cells(pipe, schedulers, steps, args, classifier, reference)

    print(
        f"\n{args.num_samples} samples per cell against the first {len(reference_digits)} MNIST test digits "
        f"(features of the project's classifier), seed {args.seed}, device {args.device}:\n"
    )
    print(markdown_table(cells, floor))
    print()
    print("\n".join(summary_lines(cells)))
    if args.json:
        result = {
            "pipeline": args.pipeline,
            "num_samples": args.num_samples,
            "reference_images": len(reference_digits),
            "seed": args.seed,
            "device": args.device,
            "skipped_steps": skipped,
            "floor": floor.as_dict(),
            "cells": [cell.as_dict(baseline_fid(cells)) for cell in cells],
            "within_10_percent_of_ddpm_1000": fewest_steps_near_baseline(cells),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
