"""Sample quality against wall time of few-step schedulers: DDPM, DDIM, DPM-Solver++ and UniPC at 10 to 1000 steps.

Each cell (scheduler, steps) draws --num_samples digits from one generator seeded with --seed (every scheduler starts
from the same noise), timed around the sampling alone, and scores them with `ddpm_mnist.evaluation` against the first
--reference_images MNIST test digits, beside the floor: as many real training digits scored the same way. Step counts
above the pipeline's training timesteps T are skipped. A class-conditional pipeline draws every digit equally often,
with classifier-free guidance at --guidance_scale, and each cell adds its class accuracy.

The table gives each FID as a multiple of the FID of DDPM at 1000 steps (the paper's Algorithm 2) when that cell ran,
and the summary names, per scheduler, the fewest steps whose FID is at most 10% above it. With --json the last line
is one JSON object with every cell, the floor and that summary. FIDs here come from the project's MNIST classifier,
not Inception: compare them only with each other.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from itertools import product

from ddpm_mnist import model_card
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.errors import UsageError, run_entry_point, usage_errors
from ddpm_mnist.evaluation import QualityReference, default_device, generate_digits, load_pipeline, scoring_labels
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.metrics.quality import SampleQuality
from ddpm_mnist.schedulers import SCHEDULERS

DEFAULT_STEPS = [10, 20, 50, 100, 1000]
BASELINE = ("ddpm", 1000)  # the scheduler setting every FID is compared with: Algorithm 2 over all T = 1000 steps
TOLERANCE = 0.10  # "as good as the baseline": an FID at most 10% above the baseline's
# The table's columns after the scheduler and the steps: title, key of `Cell.as_dict`, decimals.
COLUMNS = [("FID", "fid", 4), ("FID / DDPM-1000", "fid_vs_ddpm_1000", 2), ("KID", "kid", 4),
           ("precision", "precision", 3), ("recall", "recall", 3), ("mean confidence", "mean_confidence", 3),
           ("rarest digit", "rarest_class_share", 3), ("seconds", "seconds", 1),
           ("images/s", "images_per_second", 2)]  # fmt: skip
CLASS_ACCURACY_COLUMN = ("class accuracy", "class_accuracy", 3)  # a class-conditional pipeline's
QUALITY_KEYS = ("kid", "precision", "recall", "mean_confidence", "rarest_class_share")  # a cell's scores after the FID


@dataclass
class Cell:
    """The samples of one scheduler at one step count (or the real floor, without seconds): their scores and the
    seconds their sampling took."""

    scheduler: str
    steps: int | str
    quality: SampleQuality
    seconds: float | None
    class_accuracy: float | None = None  # a class-conditional pipeline's

    def as_dict(self, baseline_fid: float | None) -> dict[str, str | int | float | None]:
        """The JSON entry of the cell, with the FID as a multiple of DDPM-1000's."""
        quality, seconds = self.quality, self.seconds
        entry = {"scheduler": self.scheduler, "steps": self.steps, "fid": quality.fid}
        entry["fid_vs_ddpm_1000"] = quality.fid / baseline_fid if baseline_fid else None
        entry.update({key: getattr(quality, key) for key in QUALITY_KEYS}, class_accuracy=self.class_accuracy)
        entry.update(seconds=seconds, images_per_second=quality.num_images / seconds if seconds else None)
        return entry


def build_parser() -> argparse.ArgumentParser:
    """The script's options, each with its default in --help."""
    default_steps = " ".join(map(str, DEFAULT_STEPS))
    parser = argparse.ArgumentParser(
        prog="scheduler_quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("pipeline", metavar="PIPELINE", help="a folder saved by save_pretrained, or a Hub repo id")
    add("--schedulers", nargs="+", choices=SCHEDULERS, default=list(SCHEDULERS), metavar="NAME",
        help=f"schedulers to compare, of {', '.join(SCHEDULERS)} (default: {' '.join(SCHEDULERS)})")  # fmt: skip
    add("--num_inference_steps", nargs="+", type=int, default=DEFAULT_STEPS,
        help=f"step counts per scheduler, those above the pipeline's T skipped (default: {default_steps})")  # fmt: skip
    add("--num_samples", type=int, default=1000, help="digits sampled per cell (default: %(default)s)")
    add("--reference_images", type=int, default=10_000,
        help="MNIST test digits to compare with, the first ones of the split (default: %(default)s)")  # fmt: skip
    add("--dataset_name", default=DEFAULT_DATASET,
        help="MNIST: a Hub dataset id or a local copy (default: %(default)s)")  # fmt: skip
    add("--seed", type=int, default=0,
        help="seed of each cell's noise and of the floor's digits (default: %(default)s)")  # fmt: skip
    add("--batch_size", type=int, default=250, help="images per pipeline call (default: %(default)s)")
    add("--guidance_scale", type=float, default=1.0, help="a class-conditional pipeline's classifier-free guidance, "
        "at least 1 (1: none; default: %(default)s)")  # fmt: skip
    add("--device", default=default_device(), help="torch device (default: the GPU where there is one, else cpu)")
    add("--json", action="store_true", help="print one JSON object as the last line (default: a table only)")
    return parser


def baseline_fid(cells: list[Cell]) -> float | None:
    """The FID of DDPM at 1000 steps, if that cell ran."""
    return next((c.quality.fid for c in cells if (c.scheduler, c.steps) == BASELINE), None)


def fewest_steps_near_baseline(cells: list[Cell], tolerance: float = TOLERANCE) -> dict[str, int | None] | None:
    """Per scheduler, the fewest steps whose FID is at most `tolerance` above DDPM-1000's (None if never);
    None as a whole if DDPM at 1000 steps did not run."""
    reference = baseline_fid(cells)
    if reference is None:
        return None
    fewest: dict[str, int | None] = dict.fromkeys(cell.scheduler for cell in cells)
    for cell in cells:
        if cell.quality.fid <= (1 + tolerance) * reference:
            fewest[cell.scheduler] = min(cell.steps, fewest[cell.scheduler] or cell.steps)
    return fewest


def _number(value: float | None, digits: int = 4) -> str:
    """A table entry: the value rounded, or a dash when there is none."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(cells: list[Cell], floor: SampleQuality) -> str:
    """One row per cell, then the real-vs-real floor; the class accuracy where the pipeline is class-conditional."""
    reference = baseline_fid(cells)
    columns = COLUMNS + ([CLASS_ACCURACY_COLUMN] if any(c.class_accuracy is not None for c in cells) else [])
    floor_cell = Cell(f"real floor ({floor.num_images} train digits)", "-", floor, None)
    rows = []
    for cell in [*cells, floor_cell]:
        scores = cell.as_dict(reference)
        rows.append([cell.scheduler, str(cell.steps), *(_number(scores[key], d) for _, key, d in columns)])
    return model_card.markdown_table(["scheduler", "steps", *(title for title, _, _ in columns)], rows)


def summary_lines(cells: list[Cell]) -> list[str]:
    """One line per scheduler: the fewest steps within 10% of DDPM-1000's FID."""
    fewest = fewest_steps_near_baseline(cells)
    if fewest is None:
        return ["(DDPM at 1000 steps was not run: no steps-to-match summary)"]
    reference = baseline_fid(cells)
    return [
        f"{name}: FID within {TOLERANCE:.0%} of DDPM-1000 ({reference:.4f}) at "
        + (f"{steps} steps" if steps is not None else "none of the step counts run")
        for name, steps in fewest.items()
    ]


def main(argv: list[str] | None = None) -> None:
    """Check the options and load everything, then sample and score every (scheduler, steps) cell, each scheduler
    built on the pipeline's own noise schedule, and print the table (and the JSON object)."""
    args = build_parser().parse_args(argv)

    # Everything that can fail on bad input, before any sampling.
    if min(args.num_inference_steps) < 1 or args.batch_size < 1:
        raise UsageError("--num_inference_steps and --batch_size take integers of at least 1.")
    with usage_errors("device", "num_samples", "guidance_scale", "dataset_name", "reference_images"):
        pipe = load_pipeline(args.pipeline, args.device)
        class_labels = scoring_labels(pipe, args.num_samples, args.guidance_scale)
        T = pipe.scheduler.config.num_train_timesteps
        ordered = sorted(set(args.num_inference_steps))
        steps, skipped = [count for count in ordered if count <= T], [count for count in ordered if count > T]
        if not steps:
            raise UsageError(f"every --num_inference_steps value exceeds the pipeline's {T} training timesteps.")
        reference = QualityReference(
            args.dataset_name, args.reference_images, device=args.device, seed=args.seed, progress=False
        )
        floor = reference.floor(args.num_samples)
    for count in skipped:
        print(f"note: skipping {count} steps, more than the pipeline's {T} training timesteps")

    device = f"{args.device} ({describe_device(pipe.device)})"
    print(f"device: {device}")
    # Warm-up, guided as the cells are: first-call costs stay out of the timings.
    labels = None if class_labels is None else class_labels[:1]
    pipe(batch_size=1, class_labels=labels, guidance_scale=args.guidance_scale, num_inference_steps=1, output_type="pt")
    sampling = dict(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, class_labels=class_labels)
    sampling.update(guidance_scale=args.guidance_scale, progress=False)
    cells = []
    for name, count in product(dict.fromkeys(args.schedulers), steps):
        start = time.perf_counter()  # to the digits on the CPU: the device has finished
        images = generate_digits(pipe, scheduler=name, num_inference_steps=count, **sampling)
        seconds = time.perf_counter() - start
        if class_labels is None:
            cells.append(Cell(name, count, reference.score(images), seconds))
        else:
            scores = reference.score_conditional(images, class_labels)
            cells.append(Cell(name, count, scores.quality, seconds, scores.accuracy.accuracy))
        print(f"{name} at {count} steps: FID {cells[-1].quality.fid:.4f} in {seconds:.1f} s", flush=True)

    guidance = "" if class_labels is None else f", every digit equally often at guidance {args.guidance_scale:g}"
    print(
        f"\n{args.num_samples} samples per cell against the first {reference.num_images} MNIST test digits "
        f"(features of the project's classifier), seed {args.seed}{guidance}, device {device}:\n"
    )
    print(markdown_table(cells, floor))
    print("\n" + "\n".join(summary_lines(cells)))
    if args.json:
        result = dict(pipeline=args.pipeline, num_samples=args.num_samples, reference_images=reference.num_images)
        result.update(seed=args.seed, guidance_scale=None if class_labels is None else args.guidance_scale)
        result.update(device=device, skipped_steps=skipped, floor=floor.as_dict())
        result.update(cells=[cell.as_dict(baseline_fid(cells)) for cell in cells])
        print(json.dumps({**result, "within_10_percent_of_ddpm_1000": fewest_steps_near_baseline(cells)}))


if __name__ == "__main__":
    run_entry_point(main, "scheduler_quality.py")
