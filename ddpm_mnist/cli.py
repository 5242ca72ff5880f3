"""The `ddpm-mnist` command line: sample digits from a saved pipeline, score their quality, bound its likelihood.

    ddpm-mnist sample PIPELINE --num-images 64 --steps 50 --scheduler ddim --seed 0 --out grid.png
    ddpm-mnist evaluate PIPELINE --num-samples 10000 --steps 50 --scheduler ddim --seed 0 [--nll] [--json]
    ddpm-mnist nll PIPELINE --split test --num-images 1000

PIPELINE is a folder written by `DDPMMnistPipeline.save_pretrained` or a Hub repo id. Options are checked, the
pipeline, classifier and data are loaded before any sampling starts, and a bad value ends in a one-line error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .data import DEFAULT_DATASET, load_x_0
from .metrics.classifier import load_mnist_classifier
from .metrics.likelihood import VariationalBound, variational_bound
from .metrics.quality import classifier_outputs, sample_quality
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .scheduling_ddpm_mnist import DDPMMnistScheduler

# Samplers by their CLI name; each is built with `from_config(pipe.scheduler.config)`, the pipeline's schedule.
SCHEDULERS = {
    "ddpm": DDPMMnistScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
FAST_SAMPLER_STEPS = 50  # the default --steps of every sampler but ddpm, which defaults to all T steps


class UsageError(Exception):
    """A bad option value or path: reported in one line, exit status 2."""


def _int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ddpm-mnist` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="ddpm-mnist",
        description="DDPM (Ho et al. 2020) on MNIST. Train with `accelerate launch training/train.py`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("pipeline", metavar="PIPELINE", help="a folder saved by save_pretrained, or a Hub repo id")
    loading.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)"
    )
    loading.add_argument(
        "--batch-size", type=_int_at_least(1), default=64, help="images per network call (default: %(default)s)"
    )
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument(
        "--scheduler", choices=SCHEDULERS, default="ddpm", help="the sampler, on the pipeline's noise schedule"
    )
    sampling.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=None,
        help=f"sampling steps (default: all T for ddpm, {FAST_SAMPLER_STEPS} for the others)",
    )
    sampling.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of data subsets")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--dataset", default=DEFAULT_DATASET, help="MNIST: a Hub dataset id or a local copy (default: %(default)s)"
    )

    sample = commands.add_parser(
        "sample", parents=[loading, sampling], help="write a grid of sampled digits", description="Sample digits."
    )
    sample.add_argument(
        "--num-images", type=_int_at_least(1), default=64, help="digits to sample (default: %(default)s)"
    )
    sample.add_argument("--out", default="grid.png", help="the grid image to write (default: %(default)s)")
    sample.add_argument("--images-dir", default=None, help="also write each digit as a PNG into this folder")
    sample.set_defaults(run=_sample)

    evaluate = commands.add_parser(
        "evaluate",
        parents=[loading, sampling, data],
        help="score samples against the MNIST test set",
        description="FID, KID, precision/recall, confidence and class balance of samples against the MNIST test "
        "digits (features of the package's MNIST classifier), beside the floor of as many real training digits.",
    )
    evaluate.add_argument(
        "--num-samples", type=_int_at_least(4), default=10_000, help="digits to sample (default: %(default)s)"
    )
    evaluate.add_argument(
        "--reference-images", type=_int_at_least(4), default=None, help="test digits to compare with (default: all)"
    )
    evaluate.add_argument("--nll", action="store_true", help="also bound the NLL on test digits (see `nll`)")
    evaluate.add_argument(
        "--nll-images", type=_int_at_least(1), default=1000, help="test digits for --nll (default: %(default)s)"
    )
    evaluate.add_argument(
        "--nll-timesteps", type=_int_at_least(1), default=None, help="sampled timesteps for --nll (default: exact)"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    evaluate.set_defaults(run=_evaluate)

    nll = commands.add_parser(
        "nll",
        parents=[loading, data],
        help="bound the negative log-likelihood in bits/dim",
        description="The variational bound of Ho et al. (2020, eq. 5) on 8-bit MNIST digits, in bits per digit "
        "pixel, with its prior, diffusion and decoder terms.",
    )
    nll.add_argument("--split", choices=["train", "test"], default="test", help="the MNIST split (default: test)")
    nll.add_argument("--num-images", type=_int_at_least(1), default=None, help="digits to use (default: the split)")
    nll.add_argument(
        "--timesteps",
        type=_int_at_least(1),
        default=None,
        help="estimate the diffusion terms from this many sampled timesteps per digit (default: all, exact)",
    )
    nll.add_argument("--seed", type=int, default=0, help="seed of the x_t noise and of the digit subset")
    nll.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    nll.set_defaults(run=_nll)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ddpm-mnist` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UsageError as error:
        parser.exit(2, f"ddpm-mnist {args.command}: error: {error}\n")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Sub-commands


def _sample(args: argparse.Namespace) -> None:
    """`ddpm-mnist sample`: a grid of digits, and optionally each digit as its own PNG."""
    out = Path(args.out)
    if out.is_dir() or out.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--out {args.out!r} must be an image file name such as grid.png.")
    if args.images_dir is not None and Path(args.images_dir).is_file():
        raise UsageError(f"--images-dir {args.images_dir!r} is a file; pass a folder.")
    pipe, steps = _sampling_pipeline(args)
    images = generate_digits(pipe, args.num_images, steps, args.seed, args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(_grid(images)).save(out)
    if args.images_dir is not None:
        folder = Path(args.images_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            _to_pil(image[0]).save(folder / f"{i:05d}.png")
    print(f"wrote {len(images)} digits to {out}" + (f" and {args.images_dir}/" if args.images_dir else ""))


def _evaluate(args: argparse.Namespace) -> None:
    """`ddpm-mnist evaluate`: quality of samples against the test digits, beside the real-vs-real floor."""
    pipe, steps = _sampling_pipeline(args)
    if args.nll:
        _check_timesteps(args.nll_timesteps, pipe)
    try:
        classifier = load_mnist_classifier(device=args.device)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    # All data first, so that a bad --dataset or count fails before the sampling.
    reference = _load_digits(args.dataset, "test", args.reference_images, 28, seed=None)
    floor_digits = _load_digits(args.dataset, "train", args.num_samples, 28, seed=args.seed)
    if args.nll:
        nll_x_0 = _load_digits(args.dataset, "test", args.nll_images, pipe.unet.config.sample_size, seed=args.seed)

    reference_outputs = classifier_outputs((reference + 1) / 2, classifier)
    samples = generate_digits(pipe, args.num_samples, steps, args.seed, args.batch_size)
    quality = sample_quality(classifier_outputs(samples, classifier), reference_outputs, seed=args.seed)
    floor = sample_quality(classifier_outputs((floor_digits + 1) / 2, classifier), reference_outputs, seed=args.seed)
    result = {**quality.as_dict(), "floor": floor.as_dict(), "scheduler": args.scheduler, "steps": steps}
    if args.nll:
        bound = _bound(pipe, nll_x_0, args.nll_timesteps, args.batch_size, args.seed)
        result["nll_bpd"] = bound.summary()["nll_bpd"]
        result["nll"] = bound.summary()

    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.num_samples} samples ({args.scheduler}, {steps} steps) against {len(reference)} MNIST test digits;")
    print(f"floor: {args.num_samples} MNIST training digits against the same test digits.\n")
    print(f"{'':24}{'samples':>12}{'real floor':>12}")
    for name in ("fid", "kid", "precision", "recall", "mean_confidence", "class_entropy", "rarest_class_share"):
        print(f"{name:24}{result[name]:12.4f}{result['floor'][name]:12.4f}")
    print("predicted digits 0-9:  " + " ".join(f"{share:.3f}" for share in quality.class_histogram))
    if args.nll:
        print(f"\nNLL bound on {len(nll_x_0)} test digits: {_describe_bound(bound)}")


def _nll(args: argparse.Namespace) -> None:
    """`ddpm-mnist nll`: the variational bound in bits/dim with its terms."""
    pipe = load_pipeline(args.pipeline, args.device)
    _check_timesteps(args.timesteps, pipe)
    x_0 = _load_digits(args.dataset, args.split, args.num_images, pipe.unet.config.sample_size, seed=args.seed)
    bound = _bound(pipe, x_0, args.timesteps, args.batch_size, args.seed)
    summary = bound.summary()
    if args.json:
        terms = bound.terms_bpd.mean(0).tolist() if bound.exact else None
        print(json.dumps({**summary, "split": args.split, "terms_bpd": terms}))
        return
    print(f"NLL bound on {len(x_0)} {args.split} digits: {_describe_bound(bound)}")
    print(f"  prior      L_T                  {summary['prior_bpd']:10.4f} bits/dim")
    print(f"  diffusion  sum_t=2..T L_(t-1)   {summary['diffusion_bpd']:10.4f} bits/dim")
    print(f"  decoder    L_0                  {summary['decoder_bpd']:10.4f} bits/dim")
    if bound.exact:
        terms = bound.terms_bpd.mean(0)
        num_terms = len(terms)
        shown = sorted({round(i * (num_terms - 1) / 9) for i in range(10)})
        print("  L_(t-1) at t = " + ", ".join(f"{i + 2}: {terms[i].item():.2e}" for i in shown))
        print("  (all T terms: --json, key terms_bpd)")


# --------------------------------------------------------------------------------------------------------------
# Helpers


def load_pipeline(name: str, device: str) -> DDPMMnistPipeline:
    """The saved pipeline, on `device`; a missing folder, bad repo id or device is a UsageError."""
    path = os.path.expanduser(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise UsageError(f"PIPELINE {name!r} is not a folder; pass one saved by save_pretrained, or a Hub repo id.")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device!r} is not a torch device ({error}).") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; pass --device cpu.")
    try:
        pipe = DDPMMnistPipeline.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load the pipeline {name!r}: {str(error).splitlines()[0]}") from error
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device)


def _sampling_pipeline(args: argparse.Namespace) -> tuple[DDPMMnistPipeline, int]:
    """The pipeline with the chosen sampler, and the checked number of steps."""
    pipe = load_pipeline(args.pipeline, args.device)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    steps = args.steps or (num_train_timesteps if args.scheduler == "ddpm" else FAST_SAMPLER_STEPS)
    if steps > num_train_timesteps:
        raise UsageError(f"--steps {steps} exceeds the pipeline's {num_train_timesteps} training timesteps.")
    pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    return pipe, steps


def _check_timesteps(timesteps: int | None, pipe: DDPMMnistPipeline) -> None:
    """A sampled-timestep count must be below T (T - 1 diffusion terms exist)."""
    num_terms = pipe.scheduler.config.num_train_timesteps - 1
    if timesteps is not None and timesteps > num_terms:
        raise UsageError(f"the timestep count {timesteps} exceeds the {num_terms} diffusion terms (T - 1).")


def _load_digits(dataset: str, split: str, num_images: int | None, sample_size: int, seed: int | None) -> torch.Tensor:
    """x_0 of real digits; a bad dataset path or an impossible count is a UsageError."""
    try:
        return load_x_0(dataset, split, num_images, sample_size=sample_size, seed=seed)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error).splitlines()[0]) from error


def generate_digits(
    pipe: DDPMMnistPipeline, num_images: int, steps: int, seed: int, batch_size: int, progress: bool = True
) -> torch.Tensor:
    """`num_images` digits (N, 1, 28, 28) in [0, 1], drawn batch by batch from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [min(batch_size, num_images - start) for start in range(0, num_images, batch_size)]
    batches = [
        pipe(batch_size=size, generator=generator, num_inference_steps=steps, output_type="pt").images.cpu()
        for size in tqdm(sizes, desc=f"sampling, {steps} steps", unit="batch", disable=not progress)
    ]
    return torch.cat(batches)


def _bound(
    pipe: DDPMMnistPipeline, x_0: torch.Tensor, timesteps: int | None, batch_size: int, seed: int
) -> VariationalBound:
    """The pipeline's variational bound on `x_0`, on its DDPM schedule."""
    scheduler = DDPMMnistScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    return variational_bound(
        pipe.unet,
        scheduler,
        x_0,
        image_size=pipe.config.image_size,
        num_timesteps=timesteps,
        batch_size=batch_size,
        generator=generator,
    )


def _describe_bound(bound: VariationalBound) -> str:
    """The bound's mean and standard error in bits/dim, labelled exact or estimated."""
    summary = bound.summary()
    how = "exact: all T terms" if bound.exact else "unbiased estimate from sampled timesteps"
    return f"{summary['nll_bpd']:.4f} +- {summary['nll_bpd_stderr']:.4f} bits/dim ({how})"


def _grid(images: torch.Tensor) -> torch.Tensor:
    """Digits (N, 1, H, W) tiled row by row into a near-square (rows * H, cols * W) image; spare tiles black."""
    n, _, height, width = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = torch.cat([images[:, 0], images.new_zeros(rows * cols - n, height, width)])
    return tiles.reshape(rows, cols, height, width).permute(0, 2, 1, 3).reshape(rows * height, cols * width)


def _to_pil(image: torch.Tensor) -> Image.Image:
    """A (H, W) image in [0, 1] as an 8-bit greyscale PIL image."""
    return Image.fromarray((image * 255).round().to(torch.uint8).numpy())
