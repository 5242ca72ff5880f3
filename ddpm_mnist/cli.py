"""The `ddpm-mnist` command line: sample digits from a saved pipeline, score their quality, bound its likelihood.

    ddpm-mnist sample PIPELINE --num_samples 64 --num_inference_steps 50 --scheduler ddim --seed 0 --output_dir samples
    ddpm-mnist evaluate PIPELINE --num_samples 10000 --num_inference_steps 50 --scheduler ddim [--nll] [--json]
    ddpm-mnist nll PIPELINE --split test --nll_images 1000

PIPELINE is a folder written by `DDPMMnistPipeline.save_pretrained` or a Hub repo id. Every option is also accepted
with hyphens (`--num-samples`). Argument parsing and printing live here; the work is `ddpm_mnist.evaluation`'s. The
pipeline, classifier and data are loaded before any sampling starts, and bad input ends in a one-line error (exit
status 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import __version__
from .data import DEFAULT_DATASET
from .deprecation import DTYPE_RENAMES, renamed_values
from .errors import UsageError, run_entry_point
from .evaluation import (
    DTYPES,
    FAST_SCHEDULER_STEPS,
    SCHEDULERS,
    QualityReference,
    default_device,
    digit_grid,
    generate_digits,
    load_nll_digits,
    load_pipeline,
    nll_bound,
    scheduler_steps,
    to_pil_images,
)
from .hardware import describe_device
from .metrics.likelihood import VariationalBound
from .pipeline_ddpm_mnist import DDPMMnistPipeline

QUALITY_KEYS = ("fid", "kid", "precision", "recall", "mean_confidence", "class_entropy", "rarest_class_share")


def _add_option(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    """Add `--name` under its underscore and its hyphen spelling."""
    spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
    parser.add_argument(*spellings, dest=name, **kwargs)


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
    _add_option(loading, "device", default=default_device(), help="torch device (default: %(default)s)")
    _add_option(loading, "batch_size", type=int, default=64, help="images per network call (default: %(default)s)")
    sampling = argparse.ArgumentParser(add_help=False)
    _add_option(
        sampling,
        "scheduler",
        choices=SCHEDULERS,
        default="ddpm",
        help="the scheduler, on the pipeline's noise schedule",
    )
    _add_option(
        sampling,
        "num_inference_steps",
        type=int,
        default=None,
        help=f"sampling steps (default: all T for ddpm, {FAST_SCHEDULER_STEPS} for the others)",
    )
    _add_option(
        sampling,
        "dtype",
        type=renamed_values(DTYPE_RENAMES, "--dtype"),
        choices=DTYPES,
        default="fp32",
        help="the U-Net's dtype while sampling (default: %(default)s)",
    )
    _add_option(sampling, "seed", type=int, default=0, help="seed of the initial noise and of data subsets")
    data = argparse.ArgumentParser(add_help=False)
    _add_option(
        data,
        "dataset_name",
        default=DEFAULT_DATASET,
        help="MNIST: a Hub dataset id or a local copy (default: %(default)s)",
    )

    sample = commands.add_parser(
        "sample", parents=[loading, sampling], help="write a grid of sampled digits", description="Sample digits."
    )
    _add_option(sample, "num_samples", type=int, default=64, help="digits to sample (default: %(default)s)")
    _add_option(sample, "output_dir", default="samples", help="the folder for grid.png (default: %(default)s)")
    _add_option(sample, "upscale", type=int, default=2, help="grid pixels per digit pixel (default: %(default)s)")
    _add_option(sample, "save_digits", action="store_true", help="also write each digit as OUTPUT_DIR/digits/NNNNN.png")
    sample.set_defaults(run=_sample)

    evaluate = commands.add_parser(
        "evaluate",
        parents=[loading, sampling, data],
        help="score samples against the MNIST test set",
        description="FID, KID, precision/recall, confidence and class balance of samples against the MNIST test "
        "digits (features of the package's MNIST classifier), beside the floor of as many real training digits.",
    )
    _add_option(evaluate, "num_samples", type=int, default=10_000, help="digits to sample (default: %(default)s)")
    _add_option(evaluate, "reference_images", type=int, default=None, help="test digits to compare with (default: all)")
    evaluate.add_argument("--nll", action="store_true", help="also bound the NLL on test digits (see `nll`)")
    _add_option(evaluate, "nll_images", type=int, default=1000, help="test digits for --nll (default: %(default)s)")
    _add_option(evaluate, "nll_timesteps", type=int, default=None, help="sampled timesteps for --nll (default: exact)")
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
    _add_option(nll, "nll_images", type=int, default=None, help="digits to use (default: the whole split)")
    _add_option(
        nll,
        "nll_timesteps",
        type=int,
        default=None,
        help="estimate the diffusion terms from this many sampled timesteps per digit (default: all, exact)",
    )
    _add_option(nll, "seed", type=int, default=0, help="seed of the x_t noise and of the digit subset")
    nll.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    nll.set_defaults(run=_nll)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ddpm-mnist` console script; exits 0, 2 on bad input, 1 on a failure during the work."""
    args = build_parser().parse_args(argv)
    run_entry_point(lambda: args.run(args), f"ddpm-mnist {args.command}")


# --------------------------------------------------------------------------------------------------------------
# Sub-commands


def _load_pipeline(args: argparse.Namespace) -> DDPMMnistPipeline:
    """The pipeline on the chosen device, which is named in one line."""
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}.")
    pipe = load_pipeline(args.pipeline, args.device, getattr(args, "dtype", "fp32"))
    print(f"device: {pipe.device} ({describe_device(pipe.device)})")
    return pipe


def _generate(pipe: DDPMMnistPipeline, args: argparse.Namespace) -> torch.Tensor:
    """--num_samples digits from the chosen scheduler, seed and batch size."""
    return generate_digits(
        pipe,
        args.num_samples,
        scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def _sample(args: argparse.Namespace) -> None:
    """`ddpm-mnist sample`: OUTPUT_DIR/grid.png, and with --save_digits each digit as its own PNG."""
    output_dir = Path(args.output_dir)
    if output_dir.is_file():
        raise UsageError(f"--output_dir {args.output_dir!r} is a file; pass a folder.")
    if args.upscale < 1:
        raise UsageError(f"--upscale must be at least 1, got {args.upscale}.")
    images = _generate(_load_pipeline(args), args)
    output_dir.mkdir(parents=True, exist_ok=True)
    digit_grid(images, upscale=args.upscale).save(output_dir / "grid.png")
    if args.save_digits:
        (output_dir / "digits").mkdir(exist_ok=True)
        for i, digit in enumerate(to_pil_images(images)):
            digit.save(output_dir / "digits" / f"{i:05d}.png")
    print(f"wrote {len(images)} digits to {output_dir / 'grid.png'}" + (" and digits/" if args.save_digits else ""))


def _evaluate(args: argparse.Namespace) -> None:
    """`ddpm-mnist evaluate`: quality of samples against the test digits, beside the real-vs-real floor."""
    pipe = _load_pipeline(args)
    steps = scheduler_steps(pipe, args.scheduler, args.num_inference_steps)
    # All data first, so that a bad --dataset_name or count fails before the sampling.
    if args.nll:
        nll_x_0 = load_nll_digits(
            pipe, args.dataset_name, nll_images=args.nll_images, nll_timesteps=args.nll_timesteps, seed=args.seed
        )
    reference = QualityReference(args.dataset_name, args.reference_images, device=args.device, seed=args.seed)
    floor = reference.floor(args.num_samples)

    samples = _generate(pipe, args)
    quality = reference.score(samples)
    result = {**quality.as_dict(), "floor": floor.as_dict(), "scheduler": args.scheduler, "steps": steps}
    if args.nll:
        bound = nll_bound(pipe, nll_x_0, nll_timesteps=args.nll_timesteps, batch_size=args.batch_size, seed=args.seed)
        result["nll_bpd"] = bound.summary()["nll_bpd"]
        result["nll"] = bound.summary()

    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.num_samples} samples ({args.scheduler}, {steps} steps) against {reference.num_images} MNIST test")
    print(f"digits; floor: {args.num_samples} MNIST training digits against the same test digits.\n")
    print(f"{'':24}{'samples':>12}{'real floor':>12}")
    for name in QUALITY_KEYS:
        print(f"{name:24}{result[name]:12.4f}{result['floor'][name]:12.4f}")
    print("predicted digits 0-9:  " + " ".join(f"{share:.3f}" for share in quality.class_histogram))
    if args.nll:
        print(f"\nNLL bound on {len(nll_x_0)} test digits: {_describe_bound(bound)}")


def _nll(args: argparse.Namespace) -> None:
    """`ddpm-mnist nll`: the variational bound in bits/dim with its terms."""
    pipe = _load_pipeline(args)
    x_0 = load_nll_digits(
        pipe,
        args.dataset_name,
        split=args.split,
        nll_images=args.nll_images,
        nll_timesteps=args.nll_timesteps,
        seed=args.seed,
    )
    bound = nll_bound(pipe, x_0, nll_timesteps=args.nll_timesteps, batch_size=args.batch_size, seed=args.seed)
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


def _describe_bound(bound: VariationalBound) -> str:
    """The bound's mean and standard error in bits/dim, labelled exact or estimated."""
    summary = bound.summary()
    how = "exact: all T terms" if bound.exact else "unbiased estimate from sampled timesteps"
    return f"{summary['nll_bpd']:.4f} +- {summary['nll_bpd_stderr']:.4f} bits/dim ({how})"
