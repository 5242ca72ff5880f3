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
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.deprecation import DTYPE_RENAMES, renamed_values
from ddpm_mnist.errors import UsageError, run_entry_point
from ddpm_mnist.evaluation import (
    DTYPES,
    SCHEDULERS,
    QualityReference,
    default_device,
    digit_grid,
    generate_digits,
    load_nll_digits,
    load_pipeline,
    nll_bound,
    scheduler_steps,
)
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.hub import export_pipeline_folder, render_model_card
from ddpm_mnist.metrics.likelihood import VariationalBound
from ddpm_mnist.metrics.quality import SampleQuality
from ddpm_mnist.targets import ReleaseTargets

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SCHEDULER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": "DPM-Solver++", "unipc": "UniPC"}
# The targets of a release, at the recommended scheduler setting: confident digits, every digit near its 10% share,
# and a FID within 2x the real-vs-real floor at the same number of images.
TARGETS = ReleaseTargets(min_confidence=0.95, max_fid_ratio=2.0, digit_shares=(0.07, 0.13))
STRIP_FRAMES = 11  # x_T, then every 100th step, down to x_0


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
        type=renamed_values(DTYPE_RENAMES, "--dtype"),
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
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse a run folder that is not a finished run, or an existing --output_dir, before any work."""
    run = Path(args.run)
    for name in ("model_index.json", "training.json", "logs"):
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


def evaluation_markdown(
    results: dict[str, tuple[SampleQuality, SampleQuality]],
    nll: dict[str, float],
    note: str,
    num_reference: int,
    dtype: str = "fp32",
    seed_spread: Sequence[SampleQuality] = (),
) -> str:
    """The card's evaluation section: a table of every setting beside its floor, the bound and the targets.

    Given the recommended setting's scores at further seeds (`seed_spread`), it adds how far they move from seed to
    seed.
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
    return "\n".join(
        [
            f"Measured with ddpm-mnist's own metrics against {num_reference:,} MNIST test digits. FID and KID use the "
            "features of the project's MNIST classifier (99.46% test accuracy), not Inception: they compare with the "
            "real-vs-real floor beside them, never with published FIDs. The `model-index` metadata carries the first "
            f"column. The samples were drawn with the U-Net in {dtype} (x_t and the scheduler in fp32).",
            "",
            *rows,
            "",
            "Predicted digits (share of samples, 0-9):",
            "",
            *histograms,
            "",
            f"NLL bound on {nll['num_images']} test digits ({how}): **{nll['nll_bpd']:.3f} +- "
            f"{nll['nll_bpd_stderr']:.3f} bits/dim** = prior L_T {nll['prior_bpd']:.4f} + diffusion terms "
            f"{nll['diffusion_bpd']:.3f} + decoder L_0 {nll['decoder_bpd']:.3f}.",
            "",
            *TARGETS.markdown(recommended_name, recommended, floor),
            *(["", seed_spread_line(recommended, seed_spread, floor)] if seed_spread else []),
            *(["", note] if note else []),
        ]
    )


def seed_spread_line(quality: SampleQuality, spread: Sequence[SampleQuality], floor: SampleQuality) -> str:
    """How the recommended setting's metrics move over seeds, as ranges, with the seeds that meet every target.

    `quality` is the card's seed, `spread` the next seeds (as many samples each), all against the same floor.
    """
    runs = [quality, *spread]

    def span(values: list[float], spec: str) -> str:
        return f"{min(values):{spec}} to {max(values):{spec}}"

    ratios = [q.fid / floor.fid for q in runs]
    met = sum(TARGETS.all_met(q, floor) for q in runs)
    return (
        f"Seed to seed: {quality.num_images} samples from each of {len(runs)} seeds (the card's and the next "
        f"{len(spread)}) give FID {span([q.fid for q in runs], '.2f')} ({span(ratios, '.2f')}x the floor, mean "
        f"{sum(ratios) / len(runs):.2f}x), mean confidence {span([q.mean_confidence for q in runs], '.3f')} and a "
        f"rarest digit at {span([min(q.class_histogram) for q in runs], '.1%')}; every target is met at {met} "
        f"of these {len(runs)} seeds. The verdicts above are the card's seed alone, and every ratio uses the one floor "
        "above (itself one draw of real digits)."
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


def main(args: argparse.Namespace) -> None:
    """Check everything, load everything, then sample, score, draw, render the card and write the release."""
    check_args(args)
    run = Path(args.run)
    record = json.loads((run / "training.json").read_text())
    pipe = load_pipeline(run, args.device)
    sampling_pipe = pipe if args.dtype == "fp32" else load_pipeline(run, args.device, args.dtype)
    print(f"device: {pipe.device} ({describe_device(pipe.device)})")
    recommended_steps = scheduler_steps(pipe, args.scheduler, args.num_inference_steps)
    num_steps = pipe.scheduler.config.num_train_timesteps
    # Every input before any sampling: the reference, both floors and the NLL digits.
    reference = QualityReference(args.dataset_name, args.reference_images, device=args.device, seed=args.seed)
    settings = [(args.scheduler, recommended_steps, args.num_samples)]
    if args.ddpm_samples and (args.scheduler, recommended_steps) != ("ddpm", num_steps):
        settings.append(("ddpm", num_steps, args.ddpm_samples))
    sample_counts = {f"{SCHEDULER_NAMES[name]}, {steps} steps": (name, steps, count) for name, steps, count in settings}
    floors = {name: reference.floor(count) for name, (_, _, count) in sample_counts.items()}
    x_0 = load_nll_digits(
        pipe, args.dataset_name, nll_images=args.nll_images, nll_timesteps=args.nll_timesteps, seed=args.seed
    )

    def draw(scheduler: str, steps: int, count: int, seed: int) -> torch.Tensor:
        return generate_digits(
            sampling_pipe, count, scheduler=scheduler, num_inference_steps=steps, seed=seed, batch_size=args.batch_size
        )

    results, samples = {}, {}
    for name, (scheduler, steps, count) in sample_counts.items():
        samples[name] = draw(scheduler, steps, count, args.seed)
        results[name] = (reference.score(samples[name]), floors[name])
    grid_source = samples[next(iter(samples))]  # the recommended setting's: what the card's code gives
    seed_spread = [
        reference.score(draw(args.scheduler, recommended_steps, args.num_samples, args.seed + k))
        for k in range(1, args.extra_seeds + 1)
    ]
    bound = nll_bound(pipe, x_0, nll_timesteps=args.nll_timesteps, batch_size=args.batch_size, seed=args.seed)
    nll = {**bound.summary(), "num_timesteps": args.nll_timesteps}

    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        (staging / "samples").mkdir()
        digit_grid(grid_source[:64], upscale=3).save(staging / "samples" / "grid.png")
        denoising_strip(pipe, args.seed).save(staging / "samples" / "denoising.png")
        pipe.save_pretrained(staging)
        draw_loss_curve(run / "logs", staging / "samples" / "loss.png")
        draw_nll_terms(bound, staging / "samples" / "nll_terms.png")
        if args.time_to_quality_image:
            shutil.copyfile(args.time_to_quality_image, staging / "samples" / "time_to_quality.png")
        quality, _ = next(iter(results.values()))
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
                "nll_bpd": round(nll["nll_bpd"], 3),
            },
            evaluation=evaluation_markdown(results, nll, args.note, reference.num_images, args.dtype, seed_spread),
        )
        card.save(staging / "README.md")
        partial = Path(f"{args.output_dir}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        export_pipeline_folder(staging, partial)
        partial.rename(args.output_dir)
    summary = {name: {"quality": q.as_dict(), "floor": f.as_dict()} for name, (q, f) in results.items()}
    spread = [q.as_dict() for q in seed_spread]
    print(json.dumps({"output_dir": args.output_dir, "results": summary, "seed_spread": spread, "nll": nll}))


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "release.py")
