"""Turn a finished training run into a release folder: measured quality, pictures and the model card.

    python training/release.py runs/final --output_dir pretrained/ddpm-mnist-small \
        --hub_model_id ddpm-mnist/ddpm-mnist-small

MNIST comes from the Hub (`ylecun/mnist`); `--dataset_name path/to/mnist` reads a local copy instead.

Reads the run's pipeline folder (written by training/train.py, with its `training.json` and tensorboard logs), then:
1. scores samples of the recommended scheduler setting (default: the pipeline's own DDPM on 50 respaced steps) and
   of the paper's 1000-step DDPM with the project's metrics, each beside the real-vs-real floor of as many MNIST
   training digits, checks the release targets (`TARGETS`, see `ddpm_mnist.targets`), and bounds the NLL
   (`ddpm_mnist.evaluation`, on the GPU where there is one); the recommended setting runs again from `--extra_seeds`
   further seeds, so that the card shows how far its metrics move from seed to seed;
2. draws an 8x8 grid of samples, one digit denoised from x_T to x_0, the training loss curve, the per-timestep terms
   of the NLL bound and, when given, the time-to-quality curve of benchmarks/time_to_quality.py;
3. renders the model card with those results and writes the folder exactly as a push would upload it
   (`ddpm_mnist.hub.export_pipeline_folder`), so it can be committed, loaded, or pushed as it is.

A class-conditional run (its pipeline `is_class_conditional`) draws every setting with balanced labels (each digit
equally often) and classifier-free guidance at `--guidance_scale`, scores the class accuracy beside the rest, checks
`COND_TARGETS`, and sweeps the guidance scales `--guidance_scales` (`--sweep_samples` digits each; 0 skips it). Its
pictures: a 10x10 grid with one row per digit, FID against class accuracy over the sweep, test digits completed from
their top half (`DDPMMnistInpaintPipeline`) and an interpolation between two test digits (`ddpm_mnist.interpolate`).
`pretrained/ddpm-mnist-cond-small` was released on a 2-core CPU with fewer samples than the defaults (its card's
note says which):

    python training/release.py runs/cond-release --output_dir pretrained/ddpm-mnist-cond-small \
        --hub_model_id ddpm-mnist/ddpm-mnist-cond-small --scheduler unipc --num_inference_steps 20 \
        --guidance_scale 2 --extra_seeds 0 --ddpm_samples 0 --sweep_samples 100 --nll_images 100 --nll_timesteps 20 \
        --device cpu --note "..."
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.ticker import PercentFormatter
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_mnist import DDPMMnistInpaintPipeline, DDPMMnistPipeline, DDPMMnistScheduler, interpolate
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.errors import UsageError, run_entry_point
from ddpm_mnist.evaluation import (
    DEFAULT_GUIDANCE_SCALES,
    DTYPES,
    ConditionalQuality,
    QualityReference,
    balanced_labels,
    default_device,
    digit_grid,
    generate_digits,
    guidance_sweep,
    keep_half,
    load_nll_digits,
    load_pipeline,
    load_test_digits,
    load_test_labels,
    nll_bound,
    scheduler_steps,
)
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.hub import export_pipeline_folder, render_model_card
from ddpm_mnist.metrics.likelihood import VariationalBound
from ddpm_mnist.metrics.quality import ClassAccuracy, SampleQuality
from ddpm_mnist.pipeline_ddpm_mnist_inpaint import DEFAULT_NUM_INFERENCE_STEPS as INPAINT_STEPS
from ddpm_mnist.schedulers import SCHEDULERS
from ddpm_mnist.targets import ReleaseTargets

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

# The targets of a release, at the recommended scheduler setting: confident digits, every digit near its 10% share,
# and a FID within 2x the real-vs-real floor at the same number of images.
TARGETS = ReleaseTargets(min_confidence=0.95, max_fid_ratio=2.0, digit_shares=(0.07, 0.13))
# A class-conditional release's: the digit asked for, overall and for every digit, confidently, and a FID within 1.5x
# the floor. Its labels are balanced, so the share of each digit says nothing and is no target.
COND_TARGETS = ReleaseTargets(min_confidence=0.97, max_fid_ratio=1.5, min_class_accuracy=0.99, min_digit_accuracy=0.97)
DEFAULT_GUIDANCE_SCALE = 2.0  # the classifier-free guidance a class-conditional card recommends unless told otherwise
STRIP_FRAMES = 11  # x_T, then every 100th step, down to x_0
GRID_PER_DIGIT = 10  # a class-conditional grid: one row per digit 0-9, this many samples each
# The first MNIST test digits (7 2 1 0 4 1 4 9), completed from their top half on a class-conditional card; the first
# two (7 and 2) are the ends of its interpolation, from t = T / INTERPOLATION_T_DIVISOR, where both ends' shapes
# survive (t = 250 of 1000).
TEST_DIGITS = tuple(range(8))
INTERPOLATION_T_DIVISOR = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, each with its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the output_dir of a finished training/train.py run")
    p.add_argument("--output_dir", required=True, help="the release folder to write (must not exist)")
    p.add_argument("--hub_model_id", required=True, help="the Hub id the release would have, user/name")
    p.add_argument("--dataset_name", default=DEFAULT_DATASET, help="MNIST, a Hub id or a local copy")
    p.add_argument("--scheduler", default="ddpm", choices=sorted(SCHEDULERS), help="the scheduler the card recommends")
    p.add_argument("--num_inference_steps", type=int, default=50, help="its steps (ddpm: respaced; default: 50)")
    p.add_argument("--num_samples", type=int, default=1000, help="samples scored at the recommended setting")
    p.add_argument("--ddpm_samples", type=int, default=256, help="samples of 1000-step DDPM (0: skip it)")
    p.add_argument("--reference_images", type=int, default=10_000, help="MNIST test digits to score against")
    p.add_argument("--nll_images", type=int, default=1000, help="test digits for the NLL bound")
    p.add_argument("--nll_timesteps", type=int, default=100, help="NLL timesteps per digit (T-1: exact)")
    p.add_argument("--time_to_quality_image", default=None, help="the PNG of benchmarks/time_to_quality.py, if run")
    p.add_argument("--batch_size", type=int, default=250, help="images per forward pass")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="the UNet's dtype while sampling (x_t and the scheduler stay fp32; the release and its NLL bound are "
        "fp32 whatever this is)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the data subsets")
    p.add_argument(
        "--extra_seeds",
        type=int,
        default=4,
        help="the recommended setting again from seeds seed+1 .. seed+N: the metrics' seed-to-seed spread (0: none)",
    )
    p.add_argument("--device", default=default_device(), help="torch device (default: the GPU where there is one)")
    p.add_argument("--note", default="", help="a paragraph for the card's evaluation section")
    conditional = p.add_argument_group("class-conditional runs")
    conditional.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help=f"the classifier-free guidance the card recommends, its code uses and every setting draws with (default: "
        f"{DEFAULT_GUIDANCE_SCALE:g}; an unconditional run takes none, or 1)",
    )
    conditional.add_argument(
        "--guidance_scales",
        type=float,
        nargs="+",
        default=list(DEFAULT_GUIDANCE_SCALES),
        help="the guidance scales of the sweep, at the recommended scheduler setting (default: %(default)s)",
    )
    conditional.add_argument(
        "--sweep_samples", type=int, default=1000, help="samples per scale of the sweep (default: 1000; 0: skip it)"
    )
    return p.parse_args(argv)


def recommended_guidance(args: argparse.Namespace, conditional: bool) -> float:
    """The guidance every setting draws with: --guidance_scale, by default `DEFAULT_GUIDANCE_SCALE` for a
    class-conditional run and 1 (none) for an unconditional one."""
    if args.guidance_scale is not None:
        return args.guidance_scale
    return DEFAULT_GUIDANCE_SCALE if conditional else 1.0


def is_class_conditional_run(run: Path) -> bool:
    """Whether the run's UNet takes class labels (its config has `num_class_embeds`), read before loading it."""
    return json.loads((run / "unet" / "config.json").read_text()).get("num_class_embeds") is not None


def check_args(args: argparse.Namespace) -> None:
    """Refuse a run folder that is not a finished run, or an existing --output_dir, before any work."""
    run = Path(args.run)
    for name in ("model_index.json", "training.json", "logs", "unet/config.json"):
        if not (run / name).exists():
            raise UsageError(f"{run / name} is missing; pass the output_dir of a finished train.py run.")
    if Path(args.output_dir).exists():
        raise UsageError(f"--output_dir {args.output_dir} exists; pass a new folder (or remove the old release first).")
    if args.num_samples < 64:
        raise UsageError(f"--num_samples must be at least 64 (the card's 8x8 grid), got {args.num_samples}.")
    if args.ddpm_samples < 64 and args.ddpm_samples != 0:
        raise UsageError(f"--ddpm_samples must be 0 (skip 1000-step DDPM) or at least 64, got {args.ddpm_samples}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.extra_seeds < 0:
        raise UsageError(f"--extra_seeds must be 0 (no spread) or more, got {args.extra_seeds}.")
    if args.time_to_quality_image and not Path(args.time_to_quality_image).is_file():
        raise UsageError(
            f"--time_to_quality_image {args.time_to_quality_image} is not a file; pass the PNG that "
            "benchmarks/time_to_quality.py drew, or leave the flag out."
        )
    if is_class_conditional_run(run):
        check_conditional_args(args)
    elif args.guidance_scale not in (None, 1):
        raise UsageError(
            f"--guidance_scale {args.guidance_scale:g} needs a class-conditional run, and {run} is unconditional; "
            "leave the flag out."
        )


def check_conditional_args(args: argparse.Namespace) -> None:
    """Refuse the flags of a class-conditional release that cannot work: too few samples for its grid, guidance below
    1, or a sweep too small to hold every digit."""
    if args.num_samples < 10 * GRID_PER_DIGIT:
        raise UsageError(
            f"--num_samples must be at least {10 * GRID_PER_DIGIT} for a class-conditional run (the card's grid of "
            f"{GRID_PER_DIGIT} samples per digit), got {args.num_samples}."
        )
    for scale in [recommended_guidance(args, conditional=True), *args.guidance_scales]:
        if not scale >= 1:
            raise UsageError(
                f"guidance scale {scale:g} is below 1; pass --guidance_scale and --guidance_scales of 1 (no guidance) "
                "or more."
            )
    if args.sweep_samples != 0 and args.sweep_samples < 10:
        raise UsageError(
            f"--sweep_samples must be 0 (skip the sweep) or at least 10 (every digit), got {args.sweep_samples}."
        )


@dataclass
class ClassResults:
    """What a class-conditional release measures beyond the scores of any release.

    Args:
        guidance_scale: the guidance every setting drew with, the card's recommendation.
        accuracies: the class accuracy of each setting, by the names of the settings' scores.
        spread: the class accuracy of the recommended setting at each further seed, in order.
        sweep: the scores at each guidance scale of the sweep (empty: no sweep).
        sweep_floor: the real-vs-real floor at the sweep's sample count (None: no sweep).
    """

    guidance_scale: float
    accuracies: dict[str, ClassAccuracy]
    spread: list[ClassAccuracy]
    sweep: dict[float, ConditionalQuality]
    sweep_floor: SampleQuality | None


def evaluation_markdown(
    results: dict[str, tuple[SampleQuality, SampleQuality]],
    nll: dict[str, float],
    note: str,
    num_reference: int,
    dtype: str = "fp32",
    seed_spread: Sequence[SampleQuality] = (),
    classes: ClassResults | None = None,
) -> str:
    """The card's evaluation section: a table of every setting beside its floor, the bound and the targets.

    Given the recommended setting's scores at further seeds (`seed_spread`), it adds how far they move from seed to
    seed. A class-conditional release (`classes`) adds the class accuracy of every setting, overall and per digit, and
    the guidance sweep, and is held to `COND_TARGETS`.
    """
    columns = [(name, q) for name, (quality, floor) in results.items() for q in (quality, floor)]
    header = " | ".join(
        f"{name} (N={q.num_images})" if i % 2 == 0 else f"real floor (N={q.num_images})"
        for i, (name, q) in enumerate(columns)
    )
    rows = [f"| metric | {header} |", "| --- |" + " --- |" * len(columns)]
    for key, label in [
        ("fid", "FID (classifier features)"),
        ("kid", "KID"),
        ("precision", "precision (k=3)"),
        ("recall", "recall (k=3)"),
        ("mean_confidence", "mean classifier confidence"),
        ("class_entropy", "entropy of predicted digits (bits; 3.32 = uniform)"),
        ("rarest_class_share", "share of the rarest digit"),
    ]:
        rows.append(f"| {label} | " + " | ".join(f"{getattr(q, key):.4f}" for _, q in columns) + " |")
    histograms = [
        f"- {name}: " + " ".join(f"{d}: {share:.3f}" for d, share in enumerate(quality.class_histogram))
        for name, (quality, _) in results.items()
    ]
    recommended_name, (recommended, floor) = next(iter(results.items()))
    how = "exact over all T terms" if nll["exact"] else f"unbiased estimate from {nll['num_timesteps']} timesteps"
    accuracy = classes.accuracies[recommended_name] if classes else None
    spread_accuracies = [accuracy, *classes.spread] if classes else ()
    return "\n".join(
        [
            f"Measured with ddpm-mnist's own metrics against {num_reference:,} MNIST test digits. FID and KID use the "
            "features of the project's MNIST classifier (99.46% test accuracy), not Inception: they compare with the "
            "real-vs-real floor beside them, never with published FIDs. The `model-index` metadata carries the first "
            f"column. The samples were drawn with the U-Net in {dtype} (x_t and the scheduler in fp32).",
            *(["", class_intro(classes.guidance_scale)] if classes else []),
            "",
            *rows,
            "",
            "Predicted digits (share of samples, 0-9):",
            "",
            *histograms,
            *(["", *class_accuracy_table(results, classes.accuracies)] if classes else []),
            *(["", *sweep_table(classes.sweep, classes.sweep_floor)] if classes and classes.sweep else []),
            "",
            f"NLL bound on {nll['num_images']} test digits ({how}): **{nll['nll_bpd']:.3f} +- "
            f"{nll['nll_bpd_stderr']:.3f} bits/dim** = prior L_T {nll['prior_bpd']:.4f} + diffusion terms "
            f"{nll['diffusion_bpd']:.3f} + decoder L_0 {nll['decoder_bpd']:.3f}."
            + (
                " It bounds the model's unconditional p(x): the U-Net is called without labels, that is with its null "
                "class."
                if classes
                else ""
            ),
            "",
            *(COND_TARGETS if classes else TARGETS).markdown(recommended_name, recommended, floor, accuracy=accuracy),
            *(["", seed_spread_line(recommended, seed_spread, floor, spread_accuracies)] if seed_spread else []),
            *(["", note] if note else []),
        ]
    )


def class_intro(guidance_scale: float) -> str:
    """The paragraph that says how a class-conditional release's samples were drawn and what class accuracy is."""
    return (
        "Every setting draws balanced labels (each digit a tenth of the samples, in order) with classifier-free "
        f"guidance at scale {guidance_scale:g}. The class accuracy is the share of the samples that the classifier "
        "reads as the digit they were drawn as."
    )


def class_accuracy_table(
    results: dict[str, tuple[SampleQuality, SampleQuality]], accuracies: dict[str, ClassAccuracy]
) -> list[str]:
    """The card's table of the class accuracy of every setting, overall and for each digit asked for."""
    rows = [
        f"| {name} (N={quality.num_images}) | {accuracies[name].accuracy:.1%} | "
        + " | ".join(f"{share:.1%}" for share in accuracies[name].per_class)
        + " |"
        for name, (quality, _) in results.items()
    ]
    return [
        "Class accuracy, overall and for each digit asked for:",
        "",
        "| setting | all digits | " + " | ".join(str(digit) for digit in range(10)) + " |",
        "| --- |" + " --- |" * 11,
        *rows,
    ]


def sweep_table(sweep: dict[float, ConditionalQuality], floor: SampleQuality) -> list[str]:
    """The card's table of the guidance sweep: each scale's FID (also over the floor), class accuracy and
    confidence."""
    rows = [
        f"| {scale:g} | {scores.quality.fid:.2f} | {scores.quality.fid / floor.fid:.2f} | "
        f"{scores.accuracy.accuracy:.1%} | {scores.quality.mean_confidence:.3f} |"
        for scale, scores in sweep.items()
    ]
    return [
        f"Guidance sweep at the recommended scheduler setting: {floor.num_images} samples per scale, balanced labels, "
        f"one seed for all scales, against a real-vs-real floor of FID {floor.fid:.2f} at the same N:",
        "",
        "| guidance scale | FID | FID / floor | class accuracy | mean confidence |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]


def seed_spread_line(
    quality: SampleQuality,
    spread: Sequence[SampleQuality],
    floor: SampleQuality,
    accuracies: Sequence[ClassAccuracy] = (),
) -> str:
    """How the recommended setting's metrics move over seeds, as ranges, with the seeds that meet every target.

    `quality` is the card's seed, `spread` the next seeds (as many samples each), all against the same floor. For a
    class-conditional release, `accuracies` are the class accuracies of those seeds, the card's first: the line gives
    their range instead of the rarest digit's share, and counts the seeds that meet `COND_TARGETS`.
    """
    runs = [quality, *spread]

    def span(values: list[float], spec: str) -> str:
        return f"{min(values):{spec}} to {max(values):{spec}}"

    ratios = [q.fid / floor.fid for q in runs]
    if accuracies:
        met = sum(COND_TARGETS.all_met(q, floor, accuracy=a) for q, a in zip(runs, accuracies, strict=True))
        third = f"class accuracy {span([a.accuracy for a in accuracies], '.1%')}"
    else:
        met = sum(TARGETS.all_met(q, floor) for q in runs)
        third = f"a rarest digit at {span([min(q.class_histogram) for q in runs], '.1%')}"
    return (
        f"Seed to seed: {quality.num_images} samples from each of {len(runs)} seeds (the card's and the next "
        f"{len(spread)}) give FID {span([q.fid for q in runs], '.2f')} ({span(ratios, '.2f')}x the floor, mean "
        f"{sum(ratios) / len(runs):.2f}x), mean confidence {span([q.mean_confidence for q in runs], '.3f')} and "
        f"{third}; every target is met at {met} of these {len(runs)} seeds. The verdicts above are the card's seed "
        "alone, and every ratio uses the one floor above (itself one draw of real digits)."
    )


def draw_nll_terms(bound: VariationalBound, path: Path) -> None:
    """Draw L_{t-1} against t (log scale) into `path`, with L_T and L_0 marked: where the bound's bits are spent."""
    t, terms = bound.timestep_curve()
    summary = bound.summary()
    kind = "every t" if bound.exact else f"mean over each of {len(t)} strata of t"
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=120)
    ax.plot(t.numpy(), terms.numpy(), color="tab:purple", linewidth=1.6, marker="" if bound.exact else ".")
    ax.set(xlabel="t", ylabel="L_(t-1) (bits/dim)", yscale="log", title=f"Terms of the NLL bound ({kind})")
    ax.text(
        0.98,
        0.95,
        f"L_0 = {summary['decoder_bpd']:.3f}, L_T = {summary['prior_bpd']:.1e}\n"
        f"sum of L_(t-1) = {summary['diffusion_bpd']:.3f}\ntotal = {summary['nll_bpd']:.3f} bits/dim",
        transform=ax.transAxes,
        ha="right",
        va="top",
    )
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def denoising_strip(pipe: DDPMMnistPipeline, seed: int) -> Image.Image:
    """One digit under 1000-step DDPM, from x_T to x_0 in STRIP_FRAMES frames, upscaled 3x."""
    ddpm = DDPMMnistScheduler.from_config(pipe.scheduler.config)
    num_steps = ddpm.config.num_train_timesteps
    keep = {round(k * num_steps / (STRIP_FRAMES - 1)) - 1 for k in range(1, STRIP_FRAMES)}
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((1, 1, pipe.unet.config.sample_size, pipe.unet.config.sample_size), generator=generator)
    frames = [x_T[0]]

    def keep_frame(pipeline: DDPMMnistPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        if i in keep:
            frames.append(tensors["image"][0].float().cpu())
        return {}

    # The same generator state as x_T's draw: the pipeline's first draw is this x_T.
    saved_scheduler, pipe.scheduler = pipe.scheduler, ddpm
    try:
        pipe(
            num_inference_steps=num_steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            callback_on_step_end=keep_frame,
        )
    finally:
        pipe.scheduler = saved_scheduler
    border = (pipe.unet.config.sample_size - pipe.config.image_size) // 2
    size = pipe.config.image_size
    digits = torch.stack([f[:, border : border + size, border : border + size] for f in frames])
    return digit_grid((digits.clamp(-1, 1) + 1) / 2, cols=len(frames), upscale=3)


def draw_loss_curve(logs: Path, path: Path) -> None:
    """Draw the training loss per step from the run's tensorboard logs (all resumed runs) into `path`, raw and
    smoothed."""
    points: dict[int, float] = {}
    for events in sorted(logs.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            points.update({event.step: event.value for event in accumulator.Scalars("loss")})
    steps = np.array(sorted(points))
    losses = np.array([points[s] for s in steps])
    smooth = np.copy(losses)
    for i in range(1, len(smooth)):  # an exponential moving average, as tensorboard shows it
        smooth[i] = 0.98 * smooth[i - 1] + 0.02 * losses[i]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label="moving average")
    ax.set(xlabel="optimizer step", ylabel="L_simple (MSE on eps)", yscale="log", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def class_grid(samples: torch.Tensor, class_labels: torch.Tensor) -> Image.Image:
    """A grid of class-conditional samples with one row per digit 0-9, the first `GRID_PER_DIGIT` drawn as each."""
    rows = [samples[class_labels == digit][:GRID_PER_DIGIT] for digit in range(10)]
    return digit_grid(torch.cat(rows), cols=GRID_PER_DIGIT, upscale=3)


def draw_guidance_sweep(
    sweep: dict[float, ConditionalQuality], floor: SampleQuality, recommended: float, path: Path
) -> None:
    """Draw class accuracy against FID over the guidance scales into `path`: one point per scale, labelled with it,
    and the real-vs-real floor's FID as a dashed line."""
    fids = [scores.quality.fid for scores in sweep.values()]
    accuracies = [scores.accuracy.accuracy for scores in sweep.values()]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(fids, accuracies, color="tab:green", marker="o", linewidth=1.4)
    for scale, fid, accuracy in zip(sweep, fids, accuracies, strict=True):
        label = f"{scale:g}" + (" (recommended)" if scale == recommended else "")
        ax.annotate(label, (fid, accuracy), textcoords="offset points", xytext=(5, 5))
    ax.axvline(floor.fid, color="grey", linestyle="--", label=f"real-vs-real floor (FID {floor.fid:.2f})")
    ax.set(
        xlabel=f"FID (classifier features, N={floor.num_images})",
        ylabel="class accuracy",
        title="Classifier-free guidance, scale by scale",
    )
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def completion_figure(
    pipe: DDPMMnistPipeline, x_0: torch.Tensor, class_labels: torch.Tensor, guidance_scale: float, seed: int
) -> Image.Image:
    """Test digits x_0 (N, 1, 28, 28) in [-1, 1] completed from their top half as their own digit: rows original, kept
    half (the rest black), completion, upscaled 3x. The inpainting pipeline runs with its defaults (all T steps where
    T is fewer)."""
    inpaint = DDPMMnistInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    keep = keep_half("top")
    completed = inpaint(
        x_0,
        keep,
        class_labels=class_labels,
        guidance_scale=guidance_scale,
        num_inference_steps=min(INPAINT_STEPS, pipe.scheduler.config.num_train_timesteps),
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    kept = torch.where(keep.bool(), x_0, -1.0)
    rows = torch.cat([(x_0 + 1) / 2, (kept + 1) / 2, completed.float().cpu()])
    return digit_grid(rows, cols=len(x_0), upscale=3)


def interpolation_figure(
    pipe: DDPMMnistPipeline, x_a: torch.Tensor, x_b: torch.Tensor, t: int, seed: int
) -> Image.Image:
    """`interpolate` between two test digits (1, 1, 28, 28) in [-1, 1] at timestep t, lambda 0, 0.1, ..., 1, without a
    label, as one row with the two digits at its ends, upscaled 3x."""
    row = interpolate(pipe, x_a, x_b, t=t, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return digit_grid(torch.cat([(x_a + 1) / 2, row.float().cpu(), (x_b + 1) / 2]), cols=len(row) + 2, upscale=3)


def sweep_guidance(
    pipe: DDPMMnistPipeline,
    reference: QualityReference,
    args: argparse.Namespace,
    num_inference_steps: int,
    recommended: ConditionalQuality,
) -> dict[float, ConditionalQuality]:
    """The scores at each of --guidance_scales, at the recommended scheduler setting (none with --sweep_samples 0).

    Where the sweep draws as many samples as the recommended setting, the recommended scale's scores are `recommended`
    itself: the same labels, seed and batches draw the same digits.
    """
    if not args.sweep_samples:
        return {}
    guidance = recommended_guidance(args, conditional=True)
    known = {guidance: recommended} if args.sweep_samples == args.num_samples else {}
    scales = list(dict.fromkeys(args.guidance_scales))
    missing = [scale for scale in scales if scale not in known]
    drawn = {}
    if missing:
        drawn = guidance_sweep(
            pipe,
            reference,
            args.sweep_samples,
            missing,
            scheduler=args.scheduler,
            num_inference_steps=num_inference_steps,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    return {scale: known[scale] if scale in known else drawn[scale] for scale in scales}


def draw_class_pictures(
    pipe: DDPMMnistPipeline,
    classes: ClassResults,
    test_digits: torch.Tensor,
    test_labels: torch.Tensor,
    seed: int,
    folder: Path,
) -> dict[str, str | float | int | None]:
    """A class-conditional release's own pictures in `folder` (samples/): the guidance sweep when there is one, test
    digits completed from their top half, and an interpolation between the first two; returns what
    `render_model_card` takes about them."""
    t = pipe.scheduler.config.num_train_timesteps // INTERPOLATION_T_DIVISOR
    completion_figure(pipe, test_digits, test_labels, classes.guidance_scale, seed).save(folder / "completion.png")
    interpolation_figure(pipe, test_digits[:1], test_digits[1:2], t, seed).save(folder / "interpolation.png")
    if classes.sweep:
        draw_guidance_sweep(classes.sweep, classes.sweep_floor, classes.guidance_scale, folder / "guidance.png")
    return {
        "recommended_guidance_scale": classes.guidance_scale,
        "guidance_image": "samples/guidance.png" if classes.sweep else None,
        "completion_image": "samples/completion.png",
        "interpolation_image": "samples/interpolation.png",
        "interpolation_t": t,
    }


def drop_source_paths(folder: Path) -> None:
    """Remove the `_name_or_path` that diffusers writes into a loaded pipeline's configs: the run's folder on this
    machine means nothing to the release's users."""
    for path in [folder / "model_index.json", *folder.glob("*/*config.json")]:
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def scores_dict(quality: SampleQuality, accuracy: ClassAccuracy | None) -> dict:
    """The JSON summary's scores of samples: the quality, and the class accuracy where there is one."""
    return quality.as_dict() if accuracy is None else ConditionalQuality(quality, accuracy).as_dict()


def main(args: argparse.Namespace) -> None:
    """Check everything, load everything, then sample, score, draw, render the card and write the release."""
    check_args(args)
    run = Path(args.run)
    record = json.loads((run / "training.json").read_text())
    pipe = load_pipeline(run, args.device)
    sampling_pipe = pipe if args.dtype == "fp32" else load_pipeline(run, args.device, args.dtype)
    conditional = pipe.is_class_conditional
    guidance = recommended_guidance(args, conditional)
    print(f"device: {pipe.device} ({describe_device(pipe.device)})")
    recommended_steps = scheduler_steps(pipe, args.scheduler, args.num_inference_steps)
    num_steps = pipe.scheduler.config.num_train_timesteps
    # Every input before any sampling: the reference, the floors, the NLL digits and the test digits a class-conditional
    # release completes and interpolates.
    reference = QualityReference(args.dataset_name, args.reference_images, device=args.device, seed=args.seed)
    settings = [(args.scheduler, recommended_steps, args.num_samples)]
    if args.ddpm_samples and (args.scheduler, recommended_steps) != ("ddpm", num_steps):
        settings.append(("ddpm", num_steps, args.ddpm_samples))
    guided = f", guidance {guidance:g}" if conditional else ""
    sample_counts = {
        f"{SCHEDULERS[name].title}, {steps} steps{guided}": (name, steps, count) for name, steps, count in settings
    }
    floors = {name: reference.floor(count) for name, (_, _, count) in sample_counts.items()}
    sweep_floor = reference.floor(args.sweep_samples) if conditional and args.sweep_samples else None
    x_0 = load_nll_digits(
        pipe, args.dataset_name, nll_images=args.nll_images, nll_timesteps=args.nll_timesteps, seed=args.seed
    )
    if conditional:
        test_digits = load_test_digits(args.dataset_name, TEST_DIGITS)
        test_labels = load_test_labels(args.dataset_name, TEST_DIGITS)

    def class_labels(count: int) -> torch.Tensor | None:
        return balanced_labels(count) if conditional else None

    def draw(scheduler: str, steps: int, count: int, seed: int) -> torch.Tensor:
        return generate_digits(
            sampling_pipe,
            count,
            scheduler=scheduler,
            num_inference_steps=steps,
            seed=seed,
            batch_size=args.batch_size,
            class_labels=class_labels(count),
            guidance_scale=guidance,
        )

    def score(samples: torch.Tensor) -> tuple[SampleQuality, ClassAccuracy | None]:
        if not conditional:
            return reference.score(samples), None
        scores = reference.score_conditional(samples, class_labels(len(samples)))
        return scores.quality, scores.accuracy

    results, accuracies, samples = {}, {}, {}
    for name, (scheduler, steps, count) in sample_counts.items():
        samples[name] = draw(scheduler, steps, count, args.seed)
        quality, accuracies[name] = score(samples[name])
        results[name] = (quality, floors[name])
    recommended_name = next(iter(samples))  # the recommended setting's: what the card's code gives
    quality, accuracy = results[recommended_name][0], accuracies[recommended_name]
    spread = [
        score(draw(args.scheduler, recommended_steps, args.num_samples, args.seed + k))
        for k in range(1, args.extra_seeds + 1)
    ]
    classes = None
    if conditional:
        recommended = ConditionalQuality(quality, accuracy)
        sweep = sweep_guidance(sampling_pipe, reference, args, recommended_steps, recommended)
        classes = ClassResults(guidance, accuracies, [a for _, a in spread], sweep, sweep_floor)
    bound = nll_bound(pipe, x_0, nll_timesteps=args.nll_timesteps, batch_size=args.batch_size, seed=args.seed)
    nll = {**bound.summary(), "num_timesteps": args.nll_timesteps}

    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        (staging / "samples").mkdir()
        grid_source = samples[recommended_name]
        if conditional:
            grid = class_grid(grid_source, class_labels(len(grid_source)))
        else:
            grid = digit_grid(grid_source[:64], upscale=3)
        grid.save(staging / "samples" / "grid.png")
        denoising_strip(pipe, args.seed).save(staging / "samples" / "denoising.png")
        pipe.save_pretrained(staging)
        drop_source_paths(staging)
        draw_loss_curve(run / "logs", staging / "samples" / "loss.png")
        draw_nll_terms(bound, staging / "samples" / "nll_terms.png")
        if args.time_to_quality_image:
            shutil.copyfile(args.time_to_quality_image, staging / "samples" / "time_to_quality.png")
        class_card = {}
        if classes:
            class_card = draw_class_pictures(pipe, classes, test_digits, test_labels, args.seed, staging / "samples")
        card = render_model_card(
            pipe,
            args.hub_model_id,
            dataset_name=record["dataset_name"],
            samples_image="samples/grid.png",
            denoising_image="samples/denoising.png",
            loss_curve_image="samples/loss.png",
            nll_terms_image="samples/nll_terms.png",
            time_to_quality_image="samples/time_to_quality.png" if args.time_to_quality_image else None,
            recommended_scheduler=(args.scheduler, recommended_steps),
            training=record["training"],
            eval_results={
                "fid": round(quality.fid, 3),
                "kid": round(quality.kid, 5),
                "precision": round(quality.precision, 3),
                "recall": round(quality.recall, 3),
                "mean_confidence": round(quality.mean_confidence, 4),
                **({"class_accuracy": round(accuracy.accuracy, 4)} if accuracy else {}),
                "nll_bpd": round(nll["nll_bpd"], 3),
            },
            evaluation=evaluation_markdown(
                results, nll, args.note, reference.num_images, args.dtype, [q for q, _ in spread], classes
            ),
            **class_card,
        )
        card.save(staging / "README.md")
        partial = Path(f"{args.output_dir}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        export_pipeline_folder(staging, partial)
        partial.rename(args.output_dir)
    summary = {
        name: {"quality": scores_dict(q, accuracies[name]), "floor": f.as_dict()} for name, (q, f) in results.items()
    }
    report = {
        "output_dir": args.output_dir,
        "results": summary,
        "seed_spread": [scores_dict(q, a) for q, a in spread],
        "nll": nll,
    }
    if classes:
        report["guidance_scale"] = guidance
        report["guidance_sweep"] = {f"{scale:g}": scores.as_dict() for scale, scores in classes.sweep.items()}
        report["guidance_sweep_floor"] = sweep_floor.as_dict() if sweep_floor else None
    print(json.dumps(report))


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "release.py")
