"""Completing digits with RePaint: how often the classifier reads a completion as the original digit, and its cost.

    python benchmarks/inpainting.py --dataset_name path/to/mnist --settings 10,5,1 25,5,1 --figure inpainting.png

Each setting STEPS,JUMP_LENGTH,JUMP_N_SAMPLE of `DDPMMnistInpaintPipeline` completes the first --num_images MNIST
test digits with one half kept (`top`: the bottom is filled in; `left`), every setting from one generator seeded with
--seed; beside them, the classifier on the whole digits (the ceiling) and on the kept half alone. Cost: UNet calls per
digit, seconds per digit in batches, and the seconds of one digit alone (as an app completes a sketch). The table ends
with the cheapest setting whose top-half completions are read right at least 90% of the time; the JSON (--output)
holds every row, that choice and where it ran. --figure writes a few completions and, beside it (`_interpolation`),
rows of `ddpm_mnist.interpolate` between two test digits at t = 250 and t = 500. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ddpm_mnist import DDPMMnistInpaintPipeline, interpolate, model_card
from ddpm_mnist.data import DEFAULT_DATASET, load_x_0
from ddpm_mnist.errors import UsageError, run_entry_point, usage_errors
from ddpm_mnist.evaluation import DTYPES, default_device, load_pipeline, load_test_labels
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.image_utils import digit_grid, keep_half
from ddpm_mnist.metrics.classifier import MnistClassifier, load_mnist_classifier
from ddpm_mnist.metrics.quality import classifier_outputs
from ddpm_mnist.pipeline_ddpm_mnist_inpaint import jump_schedule

DEFAULT_PIPELINE = "pretrained/ddpm-mnist-small"
DEFAULT_SETTINGS = ["10,5,1", "25,5,1", "25,5,3", "25,5,5"]
MASKS = ("top", "left")  # which half is kept
TARGET = 0.90  # the share of top-half completions the classifier must read as the original digit
RESULTS = Path(__file__).resolve().parent / "results"
INTERPOLATION_TIMESTEPS = (250, 500)  # the figure's rows: t = 500 is the paper's (of T = 1000) and the API's default


@dataclass(frozen=True)
class Setting:
    """One RePaint setting of `DDPMMnistInpaintPipeline`."""

    num_inference_steps: int
    jump_length: int
    jump_n_sample: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        """STEPS,JUMP_LENGTH,JUMP_N_SAMPLE as typed on the command line."""
        try:
            steps, length, samples = (int(part) for part in text.split(","))
        except ValueError as error:
            message = f"setting {text!r} is not three integers STEPS,JUMP_LENGTH,JUMP_N_SAMPLE, e.g. 50,10,2"
            raise argparse.ArgumentTypeError(message) from error
        if not (steps >= 1 and 1 <= length <= steps and samples >= 1):
            message = f"setting {text!r} needs STEPS >= 1, 1 <= JUMP_LENGTH <= STEPS and JUMP_N_SAMPLE >= 1"
            raise argparse.ArgumentTypeError(message)
        return cls(steps, length, samples)

    def __str__(self) -> str:
        return f"{self.num_inference_steps},{self.jump_length},{self.jump_n_sample}"

    def unet_calls(self, pipe: DDPMMnistInpaintPipeline) -> int:
        """UNet calls per completion: the steps of every pass of the jump schedule on the pipeline's timesteps."""
        pipe.scheduler.set_timesteps(self.num_inference_steps)
        passes = jump_schedule(pipe.scheduler.timesteps.tolist(), self.jump_length, self.jump_n_sample)
        return sum(len(timesteps) - 1 for timesteps in passes)


@dataclass
class Row:
    """The measurements of one setting on one kept half."""

    setting: str
    mask: str
    unet_calls: int
    accuracy: float
    seconds_per_digit: float
    seconds_one_digit_alone: float


def accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: MnistClassifier) -> float:
    """The share of digits (N, 1, 28, 28) in [0, 1] that the classifier reads as their label."""
    logits = classifier_outputs(images, classifier, progress=False).logits
    return (logits.argmax(1) == labels).sum().item() / len(labels)


def complete(
    pipe: DDPMMnistInpaintPipeline,
    x_0: torch.Tensor,
    keep: torch.Tensor,
    setting: Setting,
    labels: torch.Tensor | None,
    args: argparse.Namespace,
) -> torch.Tensor:
    """Completions (N, 1, 28, 28) in [0, 1] on the CPU, batch by batch from one generator seeded with --seed."""
    generator = torch.Generator().manual_seed(args.seed)
    options = {"guidance_scale": args.guidance_scale, "generator": generator, "output_type": "pt", **asdict(setting)}
    batches = []
    for start in range(0, len(x_0), args.batch_size):
        batch = slice(start, start + args.batch_size)
        class_labels = None if labels is None else labels[batch]
        batches.append(pipe(x_0[batch], keep, class_labels=class_labels, **options).images.float().cpu())
    return torch.cat(batches)


def markdown_table(rows: list[Row], ceiling: float, kept_only: dict[str, float], masks: list[str]) -> str:
    """One line per setting, its accuracy on each kept half, its cost; then the ceiling and the kept halves alone."""
    header = ["steps, jump_length, jump_n_sample", "UNet calls", *(f"{mask} half kept: read right" for mask in masks)]
    lines = []
    for setting in dict.fromkeys(row.setting for row in rows):
        cells = {row.mask: row for row in rows if row.setting == setting}
        per_digit = sum(row.seconds_per_digit for row in cells.values()) / len(cells)
        alone = sum(row.seconds_one_digit_alone for row in cells.values()) / len(cells)
        accuracies = [f"{cells[mask].accuracy:.1%}" for mask in masks]
        lines.append([setting, str(cells[masks[0]].unet_calls), *accuracies, f"{per_digit:.3f}", f"{alone:.2f}"])
    lines.append(["kept half alone, the rest black", "0", *(f"{kept_only[m]:.1%}" for m in masks), "-", "-"])
    lines.append(["whole digits (the ceiling)", "0", *(f"{ceiling:.1%}" for _ in masks), "-", "-"])
    return model_card.markdown_table([*header, "s per digit (batches)", "s for one digit alone"], lines)


def save_figures(
    pipe: DDPMMnistInpaintPipeline, x_0: torch.Tensor, figure: Path, seed: int, class_labels: torch.Tensor | None
) -> list[Path]:
    """Completions with the pipeline's defaults, and interpolation rows, as two PNGs; their paths.

    The first: 8 test digits, their kept top halves (the rest grey), two completions of each. The second: for each t of
    INTERPOLATION_TIMESTEPS, test digit 0, the 11 digits of `interpolate` (lambda 0, 0.1, ..., 1), test digit 1.
    """
    digits = x_0[:8]
    keep = keep_half("top")
    labels = None if class_labels is None else class_labels[:8]
    completions = [
        pipe(digits, keep, class_labels=labels, generator=torch.Generator().manual_seed(seed + i), output_type="pt")
        .images.float()
        .cpu()
        for i in range(2)
    ]
    kept = torch.where(keep.bool(), digits / 2 + 0.5, torch.full_like(digits, 0.3))  # the filled-in half in grey
    rows = torch.cat([digits / 2 + 0.5, kept, *completions])
    paths = [figure, figure.with_name(f"{figure.stem}_interpolation{figure.suffix}")]
    digit_grid(rows, cols=len(digits), upscale=3).save(paths[0])
    a, b = x_0[:1], x_0[1:2]
    rows = []
    for t in INTERPOLATION_TIMESTEPS:
        generator = torch.Generator().manual_seed(seed)
        row = interpolate(pipe, a, b, t=t, num_inference_steps=50, generator=generator, output_type="pt").images
        rows += [a / 2 + 0.5, row.float().cpu(), b / 2 + 0.5]
    digit_grid(torch.cat(rows), cols=len(row) + 2, upscale=3).save(paths[1])
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The script's options, each with its default in --help."""
    parser = argparse.ArgumentParser(
        prog="inpainting.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE, metavar="PIPELINE",
                        help="a folder saved by save_pretrained, or a Hub repo id (default: %(default)s)")  # fmt: skip
    parser.add_argument("--dataset_name", default=DEFAULT_DATASET,
                        help="MNIST: a Hub dataset id or a local copy (default: %(default)s)")  # fmt: skip
    parser.add_argument("--num_images", type=int, default=200, help="test digits completed (default: %(default)s)")
    parser.add_argument("--settings", nargs="+", type=Setting.parse, metavar="STEPS,JUMP_LENGTH,JUMP_N_SAMPLE",
                        default=[Setting.parse(s) for s in DEFAULT_SETTINGS],
                        help=f"RePaint settings, run in turn (default: {' '.join(DEFAULT_SETTINGS)})")  # fmt: skip
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS),
                        help="the halves kept (default: top left)")  # fmt: skip
    parser.add_argument("--class_labels_from_truth", action="store_true",
                        help="tell a conditional pipeline each digit's true label")  # fmt: skip
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="with the true labels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every setting's noise (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=200, help="digits per pipeline call (default: %(default)s)")
    parser.add_argument("--device", default=default_device(),
                        help="torch device (default: the GPU where there is one, else cpu)")  # fmt: skip
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the UNet's precision (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS / "inpainting.json",
                        help="the JSON record (default: benchmarks/results/inpainting.json)")  # fmt: skip
    parser.add_argument("--figure", type=Path, help="write the completions and interpolation PNGs (default: none)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Check the options, load everything, then complete, score and print the table; write the JSON and figures."""
    args = build_parser().parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        raise UsageError("--num_images and --batch_size take integers of at least 1.")
    masks = list(dict.fromkeys(args.masks))
    settings = list(dict.fromkeys(args.settings))
    with usage_errors("device", "dtype", "dataset_name"):
        pipe = DDPMMnistInpaintPipeline(**load_pipeline(args.pipeline, args.device, args.dtype).components)
        if args.class_labels_from_truth and not pipe.is_class_conditional:
            raise UsageError(
                f"--class_labels_from_truth needs a class-conditional pipeline; {args.pipeline} is not one."
            )
        x_0 = load_x_0(args.dataset_name, "test", args.num_images)
        labels = load_test_labels(args.dataset_name, range(args.num_images))
    pipe.set_progress_bar_config(disable=True)
    classifier = load_mnist_classifier()
    device = describe_device(args.device)
    print(f"device: {args.device} ({device}), UNet {args.dtype}", flush=True)

    ceiling = accuracy(x_0 / 2 + 0.5, labels, classifier)
    kept_only = {
        mask: accuracy(torch.where(keep_half(mask).bool(), x_0, -1.0) / 2 + 0.5, labels, classifier) for mask in masks
    }
    class_labels = labels if args.class_labels_from_truth else None
    first_label = None if class_labels is None else class_labels[:1]
    complete(pipe, x_0[:1], keep_half("top"), Setting(2, 1, 1), first_label, args)  # warm-up, untimed
    rows = []
    for setting, mask in itertools.product(settings, masks):
        # Every digit completed with one setting and kept half, then one digit alone; scored and timed.
        keep, start = keep_half(mask), time.perf_counter()
        images = complete(pipe, x_0, keep, setting, class_labels, args)
        middle = time.perf_counter()
        complete(pipe, x_0[:1], keep, setting, first_label, args)
        alone = time.perf_counter() - middle
        calls, right = setting.unet_calls(pipe), accuracy(images, labels, classifier)
        rows.append(row := Row(str(setting), mask, calls, right, (middle - start) / len(x_0), alone))
        print(
            f"{setting} {mask} half kept: {row.accuracy:.1%} read right, {row.unet_calls} UNet calls, "
            f"{row.seconds_per_digit:.3f} s per digit, {row.seconds_one_digit_alone:.2f} s alone",
            flush=True,
        )
    # The top-half row with the fewest UNet calls (then the highest accuracy) that reaches TARGET, if any.
    passing = [row for row in rows if row.mask == "top" and row.accuracy >= TARGET]
    chosen = min(passing, key=lambda row: (row.unet_calls, -row.accuracy), default=None)
    print(
        f"\nThe first {args.num_images} MNIST test digits, one half kept, seed {args.seed}, {args.dtype} UNet on "
        f"{device}:\n"
    )
    print(markdown_table(rows, ceiling, kept_only, masks))
    print(
        f"\ncheapest setting with at least {TARGET:.0%} of top-half completions read right: "
        + (f"{chosen.setting} ({chosen.unet_calls} UNet calls)" if chosen else "none of those run")
    )
    record = {"pipeline": args.pipeline, "test_digits": f"the first {args.num_images} of the MNIST test split"}
    record |= {"seed": args.seed, "batch_size": args.batch_size, "device": f"{args.device} ({device})"}
    record |= {key: getattr(args, key) for key in ("dtype", "class_labels_from_truth", "guidance_scale")}
    record |= {"target": TARGET, "ceiling_whole_digits": ceiling, "kept_half_alone": kept_only}
    record |= {"rows": [asdict(row) for row in rows], "cheapest_meeting_target": chosen and asdict(chosen)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")
    if args.figure:
        for path in save_figures(pipe, x_0, args.figure, args.seed, class_labels):
            print(f"wrote {path}")


if __name__ == "__main__":
    run_entry_point(main, "inpainting.py")
