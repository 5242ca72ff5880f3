"""The `ddpm-mnist` command line: sample digits from a saved pipeline, score their quality, bound its likelihood,
complete a partly known digit, interpolate between two: `ddpm-mnist {sample,evaluate,nll,inpaint,interpolate} --help`.

PIPELINE is a folder written by `DDPMMnistPipeline.save_pretrained` or a Hub repo id; every option is also accepted
with hyphens (`--num-samples`). Argument parsing and printing live here, the work in `ddpm_mnist.evaluation`, the
pipelines and `ddpm_mnist.interpolate`. The pipeline, classifier and data are loaded before any sampling starts, and
bad input ends in a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from . import __version__
from .data import DEFAULT_DATASET
from .errors import UsageError, run_entry_point, usage_errors
from .evaluation import (
    DTYPES,
    QualityReference,
    default_device,
    generate_digits,
    load_nll_digits,
    load_pipeline,
    load_test_digits,
    nll_bound,
    scheduler_steps,
    scoring_labels,
)
from .hardware import describe_device
from .image_utils import HALVES, digit_grid, keep_half, load_image, to_pil_images
from .interpolation import DEFAULT_LAMBDAS, interpolate
from .metrics.classifier import NUM_CLASSES
from .metrics.likelihood import VariationalBound
from .model_card import QUALITY_ROWS
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .pipeline_ddpm_mnist_inpaint import (
    DEFAULT_NUM_INFERENCE_STEPS,
    IMAGE_SIZE,
    DDPMMnistInpaintPipeline,
    prepare_image,
)
from .schedulers import FAST_SCHEDULER_STEPS, SCHEDULERS
from .scheduling_ddpm_mnist import DDPMMnistScheduler

# The library's arguments that the sampling options pass on under their own names (see `usage_errors`).
SAMPLING_ARGUMENTS = ("num_inference_steps", "class_labels", "guidance_scale", "guidance_interval")


def _option(parser: argparse._ActionsContainer, name: str, help: str, **kwargs: object) -> None:
    """Add `--name` under its underscore and its hyphen spelling, with its `help` (every option has one)."""
    parser.add_argument(*dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]), dest=name, help=help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ddpm-mnist` and its sub-commands."""
    about = "DDPM (Ho et al. 2020) on MNIST. Train with `accelerate launch training/train.py`."
    parser = argparse.ArgumentParser(prog="ddpm-mnist", description=about)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run: Callable, parents: list, help: str, description: str) -> argparse.ArgumentParser:
        """The sub-command `name`, which calls `run(args)`, with the options of `parents` first."""
        sub = commands.add_parser(name, parents=parents, help=help, description=description)
        sub.set_defaults(run=run)
        return sub

    def editing(sub: argparse.ArgumentParser, steps_help: str, seed_help: str, output: str) -> None:
        """The options that `inpaint` and `interpolate` end with: steps, seed and the picture to write."""
        _option(sub, "num_inference_steps", steps_help, type=int)
        _option(sub, "seed", seed_help, type=int, default=0)
        _option(sub, "output", "the picture to write (default: %(default)s)", default=output)

    # The option groups that several sub-commands share (argparse parents).
    loading, batching, precision, sampling, labels, guidance, picture, data = (
        argparse.ArgumentParser(add_help=False) for _ in range(8)
    )
    loading.add_argument("pipeline", metavar="PIPELINE", help="a folder saved by save_pretrained, or a Hub repo id")
    _option(loading, "device", "torch device (default: %(default)s)", default=default_device())
    _option(batching, "batch_size", "images per network call (default: %(default)s)", type=int, default=64)
    dtype = "the U-Net's dtype while sampling (default: %(default)s)"
    _option(precision, "dtype", dtype, choices=DTYPES, default="fp32")
    scheduler = "the scheduler, on the pipeline's noise schedule"
    _option(sampling, "scheduler", scheduler, choices=SCHEDULERS, default="ddpm")
    steps = f"sampling steps (default: all T for ddpm, {FAST_SCHEDULER_STEPS} for the others)"
    _option(sampling, "num_inference_steps", steps, type=int)
    _option(sampling, "seed", "seed of the initial noise and of data subsets", type=int, default=0)
    asked = "the digits 0-9 to ask a class-conditional pipeline for, repeated in order to give one per image"
    asked += " (`all`: 0 1 ... 9; default: any digit)"
    _option(labels, "class_labels", asked, nargs="+", type=_class_label, metavar="DIGIT")
    scale = "classifier-free guidance toward the digits asked for, at least 1 (1: none; default: %(default)s)"
    _option(guidance, "guidance_scale", scale, type=float, default=1.0)
    interval = "guide only the steps at timesteps LOW <= t <= HIGH of the T training steps, e.g. 82 581 (default: "
    _option(guidance, "guidance_interval", interval + "every step)", type=int, nargs=2, metavar=("LOW", "HIGH"))
    _option(picture, "upscale", "picture pixels per digit pixel (default: %(default)s)", type=int, default=2)
    dataset = "MNIST: a Hub dataset id or a local copy (default: %(default)s)"
    _option(data, "dataset_name", dataset, default=DEFAULT_DATASET)

    about = "Sample digits. With --class_labels, the grid has one column per label given."
    sample = command("sample", _sample, [loading, batching, precision, sampling, labels, guidance, picture],
                     "write a grid of sampled digits", about)  # fmt: skip
    _option(sample, "num_samples", "digits to sample (default: %(default)s)", type=int, default=64)
    _option(sample, "output_dir", "the folder for grid.png (default: %(default)s)", default="samples")
    _option(sample, "save_digits", "also write each digit as OUTPUT_DIR/digits/NNNNN.png", action="store_true")

    about = (
        "FID, KID, precision/recall, confidence and class balance of samples against the MNIST test digits (features "
        "of the package's MNIST classifier), beside the floor of as many real training digits. A class-conditional "
        "pipeline is asked for every digit equally often, and scored also on its class accuracy: how often the "
        "classifier reads a sample as the digit asked for, overall and per digit."
    )
    evaluate = command("evaluate", _evaluate, [loading, batching, precision, sampling, guidance, data],
                       "score samples against the MNIST test set", about)  # fmt: skip
    _option(evaluate, "num_samples", "digits to sample (default: %(default)s)", type=int, default=10_000)
    _option(evaluate, "reference_images", "test digits to compare with (default: all)", type=int)
    _option(evaluate, "nll", "also bound the NLL on test digits (see `nll`)", action="store_true")
    null = "score a class-conditional pipeline without labels: its null class"
    _option(evaluate, "null_class", null, action="store_true")
    _option(evaluate, "nll_images", "test digits for --nll (default: %(default)s)", type=int, default=1000)
    _option(evaluate, "nll_timesteps", "sampled timesteps for --nll (default: exact)", type=int)
    _option(evaluate, "json", "print one JSON object as the last line", action="store_true")

    about = (
        "The variational bound of Ho et al. (2020, eq. 5) on 8-bit MNIST digits, in bits per digit pixel, with its "
        "prior, diffusion and decoder terms."
    )
    nll = command("nll", _nll, [loading, batching, data], "bound the negative log-likelihood in bits/dim", about)
    _option(nll, "split", "the MNIST split (default: test)", choices=["train", "test"], default="test")
    _option(nll, "nll_images", "digits to use (default: the whole split)", type=int)
    timesteps = "estimate the diffusion terms from this many sampled timesteps per digit (default: all, exact)"
    _option(nll, "nll_timesteps", timesteps, type=int)
    _option(nll, "seed", "seed of the x_t noise and of the digit subset", type=int, default=0)
    _option(nll, "json", "print one JSON object as the last line", action="store_true")

    about = (
        "Keep part of a digit and fill in the rest with RePaint (Lugmayr et al. 2022), a few times over. Writes one "
        "row: the digit, the part kept (the rest black), then each completion."
    )
    inpaint = command("inpaint", _inpaint, [loading, precision, labels, guidance, data, picture],
                      "complete a partly known digit", about)  # fmt: skip
    digit = inpaint.add_mutually_exclusive_group(required=True)
    _option(digit, "image", "a PNG of the digit, white on black as MNIST")
    _option(digit, "test_digit", "the MNIST test digit at this index instead", type=int, metavar="INDEX")
    region = inpaint.add_mutually_exclusive_group(required=True)
    _option(region, "mask", "a PNG the size of the digit: white pixels are kept, black ones filled in")
    _option(region, "keep", "keep this half of the digit and fill in the other one", choices=HALVES)
    _option(inpaint, "num_images", "completions to draw (default: %(default)s)", type=int, default=4)
    steps = f"RePaint's steps, each taken a few times over (default: {DEFAULT_NUM_INFERENCE_STEPS}, at most T)"
    editing(inpaint, steps, "seed of the noise", "inpainted.png")

    about = (
        "Encode two digits to x_t, mix them by each lambda and decode (Ho et al. 2020, section 4.4). Writes one row: "
        "the first digit, one decoded digit per lambda, the second digit."
    )
    between = command("interpolate", _interpolate, [loading, precision, labels, guidance, data, picture],
                      "interpolate between two digits", about)  # fmt: skip
    _option(between, "image_a", "a PNG of the first digit, white on black as MNIST")
    _option(between, "image_b", "a PNG of the second digit")
    _option(between, "test_digits", "two MNIST test digits by index instead", type=int, nargs=2, metavar="INDEX")
    t = "the timestep of the latents, 0 to T-1: small keeps the digits' shapes, large draws new digits"
    _option(between, "t", t + " (default: %(default)s)", type=int, default=500)
    lambdas = "the mixing weights, each in [0, 1] (default: 0 0.1 ... 1)"
    _option(between, "lambdas", lambdas, type=float, nargs="+", default=DEFAULT_LAMBDAS, metavar="LAMBDA")
    editing(between, "respaced decoding steps from t (default: every timestep from t down)",
            "seed of the encoder and decoder noise", "interpolation.png")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ddpm-mnist` console script; exits 0, 2 on bad input, 1 on a failure during the work."""
    args = build_parser().parse_args(argv)
    run_entry_point(lambda: args.run(args), f"ddpm-mnist {args.command}")


# --------------------------------------------------------------------------------------------------------------
# Sub-commands


def _load_pipeline(args: argparse.Namespace) -> DDPMMnistPipeline:
    """The pipeline on the chosen device, which is named in one line."""
    if getattr(args, "batch_size", 1) < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}.")
    with usage_errors("device", "dtype"):
        pipe = load_pipeline(args.pipeline, args.device, getattr(args, "dtype", "fp32"))
    print(f"device: {pipe.device} ({describe_device(pipe.device)})")
    return pipe


def _class_label(value: str) -> int | str:
    """One value of --class_labels: a digit 0-9, or `all`."""
    if value == "all":
        return value
    if not (value.isdigit() and int(value) < NUM_CLASSES):
        raise argparse.ArgumentTypeError(f"{value!r} is not a digit 0-9 or `all`")
    return int(value)


def _asked_digits(args: argparse.Namespace) -> list[int] | None:
    """The digits of --class_labels, `all` standing for 0 1 ... 9; None without the flag."""
    if args.class_labels is None:
        return None
    if args.class_labels == ["all"]:
        return list(range(NUM_CLASSES))
    if "all" in args.class_labels:
        raise UsageError("--class_labels all stands alone; pass `all`, or digits such as 3 7.")
    return args.class_labels


def _class_labels(args: argparse.Namespace, num_images: int) -> list[int] | None:
    """--class_labels repeated in order to give one label to each of `num_images` images; None without the flag."""
    digits = _asked_digits(args)
    return None if digits is None else [digits[i % len(digits)] for i in range(num_images)]


def _options(args: argparse.Namespace, *names: str) -> dict[str, object]:
    """The options `names`, as the keyword arguments of the same names that the library takes."""
    return {name: getattr(args, name) for name in names}


def _generate(
    pipe: DDPMMnistPipeline, args: argparse.Namespace, class_labels: list[int] | torch.Tensor | None
) -> torch.Tensor:
    """--num_samples digits of `class_labels` from the chosen scheduler, guidance, seed and batch size."""
    names = ("scheduler", "num_inference_steps", "seed", "batch_size", "guidance_scale", "guidance_interval")
    return generate_digits(pipe, args.num_samples, class_labels=class_labels, **_options(args, *names))


def _at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Refuse a count or a size, such as --upscale (picture pixels per digit pixel), below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}.")


def _sample(args: argparse.Namespace) -> None:
    """`ddpm-mnist sample`: OUTPUT_DIR/grid.png, and with --save_digits each digit as its own PNG."""
    output_dir = Path(args.output_dir)
    if output_dir.is_file():
        raise UsageError(f"--output_dir {args.output_dir!r} is a file; pass a folder.")
    _at_least_one(args, "upscale", "num_samples")
    digits = _asked_digits(args)
    pipe = _load_pipeline(args)
    with usage_errors("scheduler", *SAMPLING_ARGUMENTS):  # `generate_digits` checks them all before it samples
        images = _generate(pipe, args, _class_labels(args, args.num_samples))
    output_dir.mkdir(parents=True, exist_ok=True)
    cols = min(len(digits), len(images)) if digits is not None and len(digits) > 1 else None  # a column per label
    digit_grid(images, cols=cols, upscale=args.upscale).save(output_dir / "grid.png")
    if args.save_digits:
        (output_dir / "digits").mkdir(exist_ok=True)
        for i, digit in enumerate(to_pil_images(images)):
            digit.save(output_dir / "digits" / f"{i:05d}.png")
    print(f"wrote {len(images)} digits to {output_dir / 'grid.png'}" + (" and digits/" if args.save_digits else ""))


def _evaluate(args: argparse.Namespace) -> None:
    """`ddpm-mnist evaluate`: quality of samples against the test digits, beside the real-vs-real floor."""
    pipe = _load_pipeline(args)
    data_arguments = ("dataset_name", "reference_images", "nll_images", "nll_timesteps")
    with usage_errors("scheduler", "num_samples", *SAMPLING_ARGUMENTS, *data_arguments):
        steps = scheduler_steps(pipe, args.scheduler, args.num_inference_steps)
        class_labels = None
        if args.null_class and (args.guidance_scale != 1 or args.guidance_interval is not None):  # no labels
            raise UsageError("--null_class draws without labels, so nothing to guide; leave out the guidance flags.")
        if not args.null_class:
            class_labels = scoring_labels(pipe, args.num_samples, args.guidance_scale, args.guidance_interval)
        # All data first, so that a bad --dataset_name or count fails before the sampling.
        if args.nll:
            nll_x_0 = load_nll_digits(pipe, args.dataset_name, **_options(args, "nll_images", "nll_timesteps", "seed"))
        reference = QualityReference(args.dataset_name, args.reference_images, device=args.device, seed=args.seed)
        floor = reference.floor(args.num_samples)

    samples = _generate(pipe, args, class_labels)
    scores = reference.score(samples) if class_labels is None else reference.score_conditional(samples, class_labels)
    result = {
        **scores.as_dict(),
        "floor": floor.as_dict(),
        "scheduler": args.scheduler,
        "steps": steps,
        "class_conditional": pipe.is_class_conditional and not args.null_class,
        "guidance_scale": args.guidance_scale,
        "guidance_interval": args.guidance_interval,
    }
    if args.nll:
        bound = nll_bound(pipe, nll_x_0, nll_timesteps=args.nll_timesteps, batch_size=args.batch_size, seed=args.seed)
        result.update(nll_bpd=bound.summary()["nll_bpd"], nll=bound.summary())

    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.num_samples} samples ({args.scheduler}, {steps} steps) against {reference.num_images} MNIST test")
    print(f"digits; floor: {args.num_samples} MNIST training digits against the same test digits.")
    if class_labels is not None:
        interval = "" if args.guidance_interval is None else " at t in [{}, {}]".format(*args.guidance_interval)
        print(f"Each digit asked for equally often, guidance scale {args.guidance_scale:g}{interval}.")
        print("class_accuracy: the share of samples the classifier reads as the digit asked for.")
    print(f"\n{'':24}{'samples':>12}{'real floor':>12}")
    for name in QUALITY_ROWS:
        print(f"{name:24}{result[name]:12.4f}{result['floor'][name]:12.4f}")
    if class_labels is not None:
        print(f"{'class_accuracy':24}{result['class_accuracy']:12.4f}")
    print("predicted digits 0-9:  " + _shares(result["class_histogram"]))
    if class_labels is not None:
        print("accuracy per digit 0-9: " + _shares(result["class_accuracy_per_digit"]))
    if args.nll:
        print(f"\nNLL bound on {len(nll_x_0)} test digits: {_describe_bound(bound)}")


def _nll(args: argparse.Namespace) -> None:
    """`ddpm-mnist nll`: the variational bound in bits/dim with its terms."""
    pipe = _load_pipeline(args)
    with usage_errors("dataset_name", "nll_images", "nll_timesteps"):
        x_0 = load_nll_digits(pipe, args.dataset_name, **_options(args, "split", "nll_images", "nll_timesteps", "seed"))
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
        shown = sorted({round(i * (len(terms) - 1) / 9) for i in range(10)})
        print("  L_(t-1) at t = " + ", ".join(f"{i + 2}: {terms[i].item():.2e}" for i in shown))
        print("  (all T terms: --json, key terms_bpd)")


def _inpaint(args: argparse.Namespace) -> None:
    """`ddpm-mnist inpaint`: a row of the digit, its kept part and --num_images completions."""
    output = _picture_path(args)
    _at_least_one(args, "num_images")
    pipe = _load_pipeline(args)
    class_labels = _class_labels(args, args.num_images)
    default_steps = min(DEFAULT_NUM_INFERENCE_STEPS, pipe.scheduler.config.num_train_timesteps)
    steps = default_steps if args.num_inference_steps is None else args.num_inference_steps
    with usage_errors(*SAMPLING_ARGUMENTS, "dataset_name", test_digits="--test_digit"):
        pipe.check_class_inputs(class_labels, args.guidance_scale, args.num_images, args.guidance_interval)
        scheduler_steps(pipe, "ddpm", steps)
        x_0 = _read_digits(args, {"--image": args.image}, None if args.test_digit is None else [args.test_digit])
        mask = load_image(args.mask, "--mask") if args.mask is not None else keep_half(args.keep)
        keep = prepare_image(mask, IMAGE_SIZE, is_mask=True)
    inpaint = DDPMMnistInpaintPipeline(pipe.unet, _ddpm_scheduler(pipe), pipe.config.image_size)
    guided = {"class_labels": class_labels, **_options(args, "guidance_scale", "guidance_interval")}
    generator = torch.Generator().manual_seed(args.seed)
    known = x_0.repeat(args.num_images, 1, 1, 1)  # the digit once per completion
    completed = inpaint(known, keep, **guided, num_inference_steps=steps, generator=generator, output_type="pt").images
    kept = torch.where(keep.bool(), x_0, -1.0)
    _save_row([(x_0 + 1) / 2, (kept + 1) / 2, completed], output, args.upscale)
    print(f"wrote the digit, its kept part and {args.num_images} completions to {output}")


def _interpolate(args: argparse.Namespace) -> None:
    """`ddpm-mnist interpolate`: a row of the first digit, one decoded digit per lambda, the second digit."""
    output = _picture_path(args)
    from_files = args.image_a is not None or args.image_b is not None
    if from_files == (args.test_digits is not None) or (from_files and None in (args.image_a, args.image_b)):
        raise UsageError("pass two digits: --image_a A.png --image_b B.png, or --test_digits I J.")
    pipe = _load_pipeline(args)
    class_labels = _class_labels(args, len(args.lambdas))
    with usage_errors(*SAMPLING_ARGUMENTS, "dataset_name", "test_digits"):
        pipe.check_class_inputs(class_labels, args.guidance_scale, len(args.lambdas), args.guidance_interval)
        if args.num_inference_steps is not None:
            scheduler_steps(pipe, "ddpm", args.num_inference_steps)
        x_0 = _read_digits(args, {"--image_a": args.image_a, "--image_b": args.image_b}, args.test_digits)
    pipe.scheduler = _ddpm_scheduler(pipe)
    pipe.set_progress_bar_config()  # the decoding runs up to T steps: show them
    # `interpolate` checks t and lambdas before it samples.
    with usage_errors(*SAMPLING_ARGUMENTS, "t", "lambdas"):
        options = _options(args, "t", "lambdas", "num_inference_steps", "guidance_scale", "guidance_interval")
        generator = torch.Generator().manual_seed(args.seed)
        decoded = interpolate(
            pipe, x_0[:1], x_0[1:], class_labels=class_labels, **options, generator=generator, output_type="pt"
        ).images
    _save_row([(x_0[:1] + 1) / 2, decoded, (x_0[1:] + 1) / 2], output, args.upscale)
    print(f"wrote the two digits and {len(decoded)} interpolations at t={args.t} to {output}")


def _read_digits(args: argparse.Namespace, files: dict[str, str | None], test_digits: list[int] | None) -> torch.Tensor:
    """x_0 (N, 1, 28, 28) in [-1, 1] of the MNIST test digits `test_digits`, or else of the PNG files (flag: path)."""
    if test_digits is not None:
        return load_test_digits(args.dataset_name, test_digits)
    return prepare_image([load_image(path, flag) for flag, path in files.items()], IMAGE_SIZE)


def _picture_path(args: argparse.Namespace) -> Path:
    """--output, checked to be an image file name, and --upscale."""
    _at_least_one(args, "upscale")
    output = Path(args.output)
    if output.is_dir() or output.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--output {args.output!r} is not an image file name; pass one such as out.png.")
    return output


def _save_row(parts: list[torch.Tensor], output: Path, upscale: int) -> None:
    """Digits (N, 1, 28, 28) in [0, 1], part after part, as one row of a picture at `output`."""
    row = torch.cat([part.float().cpu() for part in parts])
    output.parent.mkdir(parents=True, exist_ok=True)
    digit_grid(row, cols=len(row), upscale=upscale).save(output)


def _ddpm_scheduler(pipe: DDPMMnistPipeline) -> DDPMMnistScheduler:
    """DDPM's reverse step on the pipeline's noise schedule: editing restarts the chain, which it can follow."""
    return SCHEDULERS["ddpm"].from_config(pipe.scheduler.config)


def _shares(values: list[float]) -> str:
    """Ten shares or accuracies, one per digit, on one line."""
    return " ".join(f"{value:.3f}" for value in values)


def _describe_bound(bound: VariationalBound) -> str:
    """The bound's mean and standard error in bits/dim, labelled exact or estimated."""
    summary = bound.summary()
    how = "exact: all T terms" if bound.exact else "unbiased estimate from sampled timesteps"
    return f"{summary['nll_bpd']:.4f} +- {summary['nll_bpd_stderr']:.4f} bits/dim ({how})"
