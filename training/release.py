"""Turn a finished training run into a release folder: measured quality, pictures and the model card.

    python training/release.py runs/final --output_dir pretrained/ddpm-mnist-small \
        --hub_model_id ddpm-mnist/ddpm-mnist-small

It scores samples of the recommended scheduler setting (again from `--extra_seeds` further seeds, for the spread) and
of the paper's 1000-step DDPM, each beside the real-vs-real floor of as many MNIST training digits, checks `TARGETS`
and bounds the NLL; draws an 8x8 grid, one digit denoised from x_T to x_0, the training loss, the NLL bound's terms
and, when given, the curve of benchmarks/time_to_quality.py; then renders the card and writes the folder exactly as a
push would upload it (`ddpm_mnist.hub.export_pipeline_folder`), to commit, load or push as it is.

A class-conditional run draws with balanced labels and guidance, scores the class accuracy too, checks
`COND_TARGETS` and sweeps `--guidance_scales`; its pictures add a grid with one row per digit, FID against class
accuracy over the sweep, test digits completed from their top half and an interpolation between two test digits.
`pretrained/ddpm-mnist-cond-small` was released on a 2-core CPU with fewer samples than the defaults:

    python training/release.py runs/cond-teacher --output_dir pretrained/ddpm-mnist-cond-small \
        --hub_model_id ddpm-mnist/ddpm-mnist-cond-small --scheduler unipc --num_inference_steps 20 \
        --guidance_scale 1.5 --guidance_scales 1 1.5 2 3 --extra_seeds 1 --ddpm_samples 0 --nll_images 100 \
        --nll_timesteps 20 --dtype bf16 --device cpu --note "..."

`--gpu_results` takes, instead of a run, the folder that `benchmarks/gpu_run.sh` brought back from a GPU machine:

    python training/release.py --gpu_results gpu-results --output_dir pretrained/ddpm-mnist \
        --hub_model_id ddpm-mnist/ddpm-mnist

Nothing is sampled then (the flags that would, `RUN_FLAGS`, are refused): the card's quality is what the GPU measured
(`benchmarks/gpu_run.py`), checked against `GPU_TARGETS`, with the run's own training record and exact training
command. The card has no denoising strip and no loss curve (the tensorboard logs are in the archive, under `logs/`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import PercentFormatter
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_mnist import DDPMMnistInpaintPipeline, DDPMMnistPipeline, DDPMMnistScheduler, interpolate
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.errors import UsageError, first_line, run_entry_point
from ddpm_mnist.evaluation import (
    DEFAULT_GUIDANCE_SCALES,
    DTYPES,
    ConditionalQuality,
    QualityReference,
    check_device,
    default_device,
    generate_digits,
    guidance_sweep,
    load_nll_digits,
    load_pipeline,
    load_test_digits,
    load_test_labels,
    nll_bound,
    scheduler_steps,
)
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.hub import export_pipeline_folder
from ddpm_mnist.image_utils import digit_grid, keep_half
from ddpm_mnist.metrics.likelihood import VariationalBound
from ddpm_mnist.metrics.quality import SampleQuality, balanced_class_labels
from ddpm_mnist.model_card import (
    CARD_DATASET,
    INTERPOLATION_T_DIVISOR,
    evaluation_section,
    figure,
    markdown_table,
    model_index_results,
    render_model_card,
)
from ddpm_mnist.pipeline_ddpm_mnist_inpaint import DEFAULT_NUM_INFERENCE_STEPS as INPAINT_STEPS
from ddpm_mnist.schedulers import SCHEDULERS
from ddpm_mnist.targets import ReleaseTargets

# The targets of a release at its recommended scheduler setting: of a run scored here, of a class-conditional one (its
# labels are balanced, so the share of each digit says nothing and is no target) and of the GPU-trained release.
TARGETS = ReleaseTargets(min_confidence=0.95, max_fid_ratio=2.0, digit_shares=(0.07, 0.13))
COND_TARGETS = ReleaseTargets(min_confidence=0.98, max_fid_ratio=1.3, min_class_accuracy=0.995, min_digit_accuracy=0.98)
GPU_TARGETS = ReleaseTargets(min_confidence=0.97, max_fid_ratio=1.3, max_nll_bpd=1.3)
# The classifier-free guidance a class-conditional card recommends unless told otherwise: the released conditional
# model's (pretrained/ddpm-mnist-cond-small; its card says why).
DEFAULT_GUIDANCE_SCALE = 1.5
# A distilled student's targets: (the setting of benchmarks/distillation.py, its figure, the words, the limit, whether
# the figure must reach the limit (else stay below it)); a setting it did not measure is left out.
DISTILLATION_TARGETS = (
    ("student, {steps} steps", "class_accuracy", "class accuracy at {steps} steps, >= 99%", 0.99, True),
    ("student, {steps} steps", "fid_over_teacher", "FID at {steps} steps over the teacher's, <= 1.2x", 1.2, False),
    ("student, 2 steps", "fid_over_teacher", "FID at 2 steps over the teacher's, <= 1.5x", 1.5, False),
    ("timing", "speedup_vs_ddpmpipeline", "speed-up on `DDPMPipeline` at 50 steps, >= 20x", 20.0, True),
    ("timing", "speedup_vs_teacher", "speed-up on the teacher at its setting, >= 8x", 8.0, True),
)
STRIP_FRAMES = 11  # x_T, then every 100th step, down to x_0
GRID_PER_DIGIT = 10  # a class-conditional grid: one row per digit 0-9, this many samples each
# The first MNIST test digits (7 2 1 0 4 1 4 9), completed from their top half on a class-conditional card; the first
# two (7 and 2) are the ends of its interpolation.
TEST_DIGITS = tuple(range(8))
GPU_STAGES = ("train", "evaluate_fast", "evaluate_ddpm", "nll", "grid", "archive")  # what a GPU release needs
# The flags that sample, score and draw a run: a GPU release reads what its run measured, so they are refused there.
RUN_FLAGS = (
    "dataset_name", "scheduler", "num_inference_steps", "num_samples", "ddpm_samples", "reference_images", "nll_images",
    "nll_timesteps", "batch_size", "dtype", "seed", "extra_seeds", "device", "guidance_scale", "guidance_scales",
    "sweep_samples",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, each with its default."""
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the command-line flags, each with its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("run", nargs="?", help="the output_dir of a finished training/train.py run")
    source.add_argument("--gpu_results", help="instead of a run: the folder benchmarks/gpu_run.sh brought back")
    student = "with a finished training/distill.py run: the JSON benchmarks/distillation.py wrote of its student"
    p.add_argument("--distillation_results", help=student)
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
    p.add_argument("--time_to_quality_image", help="the PNG of benchmarks/time_to_quality.py, if run")
    p.add_argument("--batch_size", type=int, default=250, help="images per forward pass")
    dtype = "the UNet's dtype while sampling (x_t and the scheduler stay fp32; the release and its NLL bound are fp32"
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help=dtype + " whatever this is)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the data subsets")
    seeds = "the recommended setting again from seeds seed+1 .. seed+N: the metrics' seed-to-seed spread (0: none)"
    p.add_argument("--extra_seeds", type=int, default=4, help=seeds)
    p.add_argument("--device", default=default_device(), help="torch device (default: the GPU where there is one)")
    p.add_argument("--note", default="", help="a paragraph for the card's evaluation section")
    guided = p.add_argument_group("class-conditional runs")
    scale = "the classifier-free guidance the card recommends, its code uses and every setting draws with (default: "
    scale += f"{DEFAULT_GUIDANCE_SCALE:g}; an unconditional run takes none, or 1)"
    guided.add_argument("--guidance_scale", type=float, help=scale)
    scales = "the guidance scales of the sweep, at the recommended scheduler setting (default: %(default)s)"
    guided.add_argument("--guidance_scales", type=float, nargs="+", default=list(DEFAULT_GUIDANCE_SCALES), help=scales)
    sweep = "samples per scale of the sweep (default: 1000; 0: skip it)"
    guided.add_argument("--sweep_samples", type=int, default=1000, help=sweep)
    return p


@contextmanager
def usage(*flags: str) -> Iterator[None]:
    """Report a library's refusal of the input of `flags` (a ValueError, or an OSError for a path or a folder that
    cannot be read) as a one-line UsageError that names them."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as error:
        raise UsageError(f"{', '.join(flags)}: {first_line(error)}") from error


def recommended_guidance(args: argparse.Namespace, conditional: bool) -> float:
    """--guidance_scale, by default `DEFAULT_GUIDANCE_SCALE` for a class-conditional run and 1 (none) otherwise."""
    default = DEFAULT_GUIDANCE_SCALE if conditional else 1.0
    return default if args.guidance_scale is None else args.guidance_scale


def check_args(args: argparse.Namespace) -> None:
    """Refuse an existing --output_dir, a run folder that is not a finished run, or flags that cannot work, before
    any work (the GPU results themselves are checked as they are read, by `read_gpu_results`)."""
    if Path(args.output_dir).exists():
        raise UsageError(f"--output_dir {args.output_dir} exists; pass a new folder (or remove the old release first).")
    if args.time_to_quality_image and not Path(args.time_to_quality_image).is_file():
        raise UsageError(
            f"--time_to_quality_image {args.time_to_quality_image} is not a file; pass the PNG that "
            "benchmarks/time_to_quality.py drew, or leave the flag out."
        )
    if args.gpu_results is not None and args.distillation_results is not None:
        raise UsageError("--gpu_results and --distillation_results release different runs; pass one of them.")
    measured = "--gpu_results" if args.gpu_results is not None else "--distillation_results"
    if args.gpu_results is not None or args.distillation_results is not None:
        defaults = build_parser()
        for name in RUN_FLAGS:
            if getattr(args, name) != defaults.get_default(name):
                raise UsageError(f"--{name} plays no part with {measured}, which hold the scores; leave it out.")
    if args.gpu_results is not None:
        return
    run = Path(args.run)
    if args.distillation_results is not None:
        check_distillation(run, Path(args.distillation_results))
        return
    for name in ("model_index.json", "training.json", "logs", "unet/config.json"):
        if not (run / name).exists():
            raise UsageError(f"{run / name} is missing; pass the output_dir of a finished train.py run.")
    if args.num_samples < 64:
        raise UsageError(f"--num_samples must be at least 64 (the card's 8x8 grid), got {args.num_samples}.")
    if args.ddpm_samples < 64 and args.ddpm_samples != 0:
        raise UsageError(f"--ddpm_samples must be 0 (skip 1000-step DDPM) or at least 64, got {args.ddpm_samples}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.extra_seeds < 0:
        raise UsageError(f"--extra_seeds must be 0 (no spread) or more, got {args.extra_seeds}.")
    if json.loads((run / "unet" / "config.json").read_text()).get("num_class_embeds") is None:
        if args.guidance_scale not in (None, 1):
            raise UsageError(
                f"--guidance_scale {args.guidance_scale:g} needs a class-conditional run, and {run} is unconditional; "
                "leave the flag out."
            )
        return
    # A class-conditional run: enough samples for its grid, guidance of 1 or more, a sweep that holds every digit.
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


def check_distillation(run: Path, results_file: Path) -> None:
    """Refuse, in one line, a run that is not a finished distill.py run, or results that are not those of
    `benchmarks/distillation.py` with its timing step count among its scored ones."""
    record = run / "training.json"
    if not record.is_file() or "pretrained_teacher_model" not in json.loads(record.read_text())["training"]:
        raise UsageError(f"{run} is not a finished training/distill.py run (its training.json names no teacher).")
    fix = "pass the JSON that benchmarks/distillation.py wrote with --output"
    try:
        results = json.loads(results_file.read_text())
        steps = results["args"]["timing_steps"]
        scored = {"machine", "floor_fid"} <= results.keys() and f"student, {steps} steps" in results["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--distillation_results {results_file} cannot be read ({first_line(e)}); {fix}.") from e
    if not scored or "teacher" not in results["settings"]:
        raise UsageError(
            f"--distillation_results {results_file} lacks the teacher's or the {steps}-step student's scores; {fix}, "
            "with --timing_steps among --num_inference_steps."
        )


# What a release is written from besides its pictures: the pipeline, `render_model_card`'s other arguments, the report.
Release = tuple[DDPMMnistPipeline, dict[str, Any], dict[str, Any]]


def measure_run(args: argparse.Namespace, samples: Path) -> Release:
    """Load every input, then sample, score and bound the NLL of the run, and draw its pictures into `samples`."""
    run = Path(args.run)
    record = json.loads((run / "training.json").read_text())
    with usage("--device"):
        check_device(args.device)
    with usage("run"):
        pipe = load_pipeline(run, args.device)
        sampling_pipe = pipe if args.dtype == "fp32" else load_pipeline(run, args.device, args.dtype)
    conditional = pipe.is_class_conditional
    guidance = recommended_guidance(args, conditional)
    print(f"device: {pipe.device} ({describe_device(pipe.device)})")
    with usage("--num_inference_steps"):
        recommended_steps = scheduler_steps(pipe, args.scheduler, args.num_inference_steps)
    num_steps = pipe.scheduler.config.num_train_timesteps
    # Every input before any sampling: the reference, floors, NLL digits and a class-conditional card's test digits.
    with usage("--dataset_name", "--reference_images"):
        reference = QualityReference(args.dataset_name, args.reference_images, device=args.device, seed=args.seed)
    settings = [(args.scheduler, recommended_steps, args.num_samples)]
    if args.ddpm_samples and (args.scheduler, recommended_steps) != ("ddpm", num_steps):
        settings.append(("ddpm", num_steps, args.ddpm_samples))
    guided = f", guidance {guidance:g}" if conditional else ""
    settings = {f"{SCHEDULERS[name].title}, {steps} steps{guided}": (name, steps, n) for name, steps, n in settings}
    with usage("--dataset_name", "--num_samples", "--ddpm_samples", "--sweep_samples"):
        floors = {name: reference.floor(count) for name, (_, _, count) in settings.items()}
        sweep_floor = reference.floor(args.sweep_samples) if conditional and args.sweep_samples else None
    with usage("--dataset_name", "--nll_images", "--nll_timesteps"):
        x_0 = load_nll_digits(
            pipe, args.dataset_name, nll_images=args.nll_images, nll_timesteps=args.nll_timesteps, seed=args.seed
        )
    if conditional:
        with usage("--dataset_name"):
            test_digits = load_test_digits(args.dataset_name, TEST_DIGITS)
            test_labels = load_test_labels(args.dataset_name, TEST_DIGITS)

    def draw_and_score(
        scheduler: str, steps: int, count: int, seed: int
    ) -> tuple[torch.Tensor, SampleQuality | ConditionalQuality]:
        labels = balanced_class_labels(count) if conditional else None
        how = {"scheduler": scheduler, "num_inference_steps": steps, "seed": seed, "batch_size": args.batch_size}
        digits = generate_digits(sampling_pipe, count, class_labels=labels, guidance_scale=guidance, **how)
        return digits, reference.score_conditional(digits, labels) if conditional else reference.score(digits)

    results, drawn = {}, {}
    for name, (scheduler, steps, count) in settings.items():
        drawn[name], scores = draw_and_score(scheduler, steps, count, args.seed)
        results[name] = (scores, floors[name])
    recommended_name = next(iter(drawn))  # the recommended setting's: what the card's code gives
    spread = [draw_and_score(*settings[recommended_name], args.seed + k)[1] for k in range(1, args.extra_seeds + 1)]
    # The guidance sweep at the recommended scheduler setting. Where it draws as many samples, the recommended scale's
    # scores are the recommended setting's: the same labels, seed and batches draw the same digits.
    sweep = {}
    if conditional and args.sweep_samples:
        scales = list(dict.fromkeys(args.guidance_scales))
        sweep = {guidance: results[recommended_name][0]} if args.sweep_samples == args.num_samples else {}
        missing = [scale for scale in scales if scale not in sweep]
        if missing:
            how = {"scheduler": args.scheduler, "num_inference_steps": recommended_steps, "seed": args.seed}
            sweep |= guidance_sweep(
                sampling_pipe, reference, args.sweep_samples, missing, **how, batch_size=args.batch_size
            )
        sweep = {scale: sweep[scale] for scale in scales}
    bound = nll_bound(pipe, x_0, nll_timesteps=args.nll_timesteps, batch_size=args.batch_size, seed=args.seed)
    nll = {**bound.summary(), "num_timesteps": args.nll_timesteps}

    grid_source = drawn[recommended_name]
    if conditional:  # one row per digit 0-9, the first `GRID_PER_DIGIT` drawn as each
        labels = balanced_class_labels(len(grid_source))
        rows = [grid_source[labels == digit][:GRID_PER_DIGIT] for digit in range(10)]
        grid = digit_grid(torch.cat(rows), cols=GRID_PER_DIGIT, upscale=3)
    else:
        grid = digit_grid(grid_source[:64], upscale=3)
    grid.save(samples / "grid.png")
    denoising_strip(pipe, args.seed).save(samples / "denoising.png")
    draw_loss_curve(run / "logs", samples / "loss.png")
    draw_nll_terms(bound, samples / "nll_terms.png")
    if conditional:
        draw_class_pictures(pipe, guidance, test_digits, test_labels, args.seed, samples)
        if sweep:
            draw_guidance_sweep(sweep, sweep_floor, guidance, samples / "guidance.png")
    report = {
        "output_dir": args.output_dir,
        "results": {name: {"quality": q.as_dict(), "floor": f.as_dict()} for name, (q, f) in results.items()},
        "seed_spread": [scores.as_dict() for scores in spread],
        "nll": nll,
    }
    if conditional:
        report["guidance_scale"] = guidance
        report["guidance_sweep"] = {f"{scale:g}": scores.as_dict() for scale, scores in sweep.items()}
        report["guidance_sweep_floor"] = sweep_floor.as_dict() if sweep_floor else None
    intro = (
        f"Measured with ddpm-mnist's own metrics against {reference.num_images:,} MNIST test digits. FID and KID use "
        "the features of the project's MNIST classifier (99.46% test accuracy), not Inception: they compare with the "
        "real-vs-real floor beside them, never with published FIDs. The `model-index` metadata carries the first "
        f"column. The samples were drawn with the U-Net in {args.dtype} (x_t and the scheduler in fp32)."
    )
    targets = COND_TARGETS if conditional else TARGETS
    closing = [args.note] if args.note else []
    classes = {"guidance_scale": guidance, "sweep": sweep, "sweep_floor": sweep_floor} if conditional else {}
    card = {
        "dataset_name": record["dataset_name"],
        "training": record["training"],
        "recommended_scheduler": (args.scheduler, recommended_steps),
        "recommended_guidance_scale": guidance if conditional else None,
        "eval_results": model_index_results(report["results"][recommended_name]["quality"], nll["nll_bpd"]),
        "evaluation": evaluation_section(intro, results, nll, targets, seed_spread=spread, closing=closing, **classes),
    }
    return pipe, card, report


def read_gpu_results(args: argparse.Namespace, scratch: Path, samples: Path) -> Release:
    """The release of a complete GPU run (else a UsageError naming the gap) from what `benchmarks/gpu_run.sh`
    brought back to --gpu_results: its pipeline unpacked into `scratch`, its grid copied into `samples`."""
    folder = Path(args.gpu_results)
    if not (folder / "results.json").is_file():
        raise UsageError(
            f"--gpu_results {folder} has no results.json; pass the folder that benchmarks/gpu_run.sh wrote."
        )
    with usage("--gpu_results"):
        results = json.loads((folder / "results.json").read_text())
    stages = results["stages"]
    unfinished = [name for name in GPU_STAGES if stages.get(name, {}).get("status") != "ok"]
    if unfinished:
        raise UsageError(f"the GPU run did not finish {', '.join(unfinished)}; see {folder}/stages.log and rerun it.")
    parts = [folder / name for name in stages["archive"]["result"]]
    missing = [part.name for part in parts + [folder / "grid.png"] if not part.is_file()]
    if missing:
        raise UsageError(f"{folder} lacks {', '.join(missing)}; fetch every file the GPU run wrote.")
    archive = scratch / "pipeline.tar.gz"
    archive.write_bytes(b"".join(part.read_bytes() for part in parts))
    with tarfile.open(archive) as tar:
        tar.extractall(scratch / "run", filter="data")
    record = json.loads((scratch / "run" / "training.json").read_text())
    with usage("--gpu_results"):
        pipe = DDPMMnistPipeline.from_pretrained(scratch / "run")
    shutil.copyfile(folder / "grid.png", samples / "grid.png")
    fast, nll, environment = stages["evaluate_fast"]["result"], stages["nll"]["result"], stages["setup"]["result"]
    measured = {
        f"DDPM, {r['steps']} steps": (quality_scores(r), quality_scores(r["floor"]))
        for r in (fast, stages["evaluate_ddpm"]["result"])
    }
    trained_with = (
        f"Trained with `{portable_command(stages['train']['result']['command'])}` (torch {environment['torch']}, "
        f"CUDA {environment['cuda'] or 'none'}); the recipe and its reasons are in `benchmarks/gpu_run.py`."
    )
    intro = (
        f"Measured on the device that trained it ({environment['device']}, {environment['date']}) by "
        "`benchmarks/gpu_run.sh`, with ddpm-mnist's own metrics against the MNIST test digits; samples drawn "
        "with a bf16 U-Net (x_t and the scheduler in fp32). FID and KID use the features of the project's "
        "MNIST classifier, not Inception: compare them with the real-vs-real floor beside them, never with "
        "published FIDs. The `model-index` metadata carries the first column."
    )
    closing = [trained_with, *([args.note] if args.note else [])]
    card = {
        "dataset_name": CARD_DATASET,  # the run read a local copy of it
        "training": record["training"],
        "eval_results": model_index_results(fast, nll["nll_bpd"]),
        "evaluation": evaluation_section(intro, measured, nll, GPU_TARGETS, closing=closing),
    }
    return pipe, card, {"output_dir": args.output_dir, "training": record["training"], "fast": fast, "nll": nll}


def read_distillation(args: argparse.Namespace, samples: Path) -> Release:
    """The release of a distilled student (a finished distill.py run), its quality and speed read from
    --distillation_results (`benchmarks/distillation.py`): nothing is sampled; the run's last grid is the card's."""
    run = Path(args.run)
    results = json.loads(Path(args.distillation_results).read_text())  # checked by `check_distillation`
    settings, timing, floor = results["settings"], results.get("timing"), results["floor_fid"]
    measured = results["args"]  # the benchmark's settings
    record = json.loads((run / "training.json").read_text())["training"]
    teacher = Path(record["pretrained_teacher_model"])
    if teacher.is_dir():  # a local folder (a release): the card names it as pushed beside this one
        record["pretrained_teacher_model"] = f"{args.hub_model_id.split('/')[0]}/{teacher.name}"
    pipe = DDPMMnistPipeline.from_pretrained(run)
    shutil.copyfile(sorted((run / "samples").glob("step-*.png"))[-1], samples / "grid.png")
    steps, guided = measured["timing_steps"], measured["guidance_scale"] > 1
    recommended = settings[f"student, {steps} steps"]
    mean = {key: float(np.mean(recommended[key])) for key in ("fid", "class_accuracy", "mean_confidence")}
    calls = {"teacher": measured["teacher_num_inference_steps"] * (2 if guided else 1)}
    rows = [
        [name, str(calls.get(name, name.split(", ")[-1].split()[0])), ", ".join(f"{f:.2f}" for f in r["fid"]),
         f"{r['fid_over_floor']:.2f}x", f"{r['fid_over_teacher']:.2f}x",
         ", ".join(f"{a:.1%}" for a in r["class_accuracy"]), ", ".join(f"{c:.3f}" for c in r["mean_confidence"])]
        for name, r in settings.items()
    ]  # fmt: skip
    header = ["sampler", "U-Net calls per digit", "FID per seed", "FID / floor", "FID / teacher's", "class accuracy",
              "mean confidence"]  # fmt: skip
    parts = [
        f"Measured with `benchmarks/distillation.py` on {results['machine']}: per setting and seed (seeds "
        f"{', '.join(map(str, measured['seeds']))}), {measured['num_samples']:,} digits with balanced labels, scored "
        "with ddpm-mnist's MNIST classifier against the MNIST test digits (FID on its features, not Inception's; "
        f"the real-vs-real floor at the same N is {floor:.2f}). The teacher draws at its card's setting, "
        f"`{measured['teacher_scheduler']}` on {measured['teacher_num_inference_steps']} steps"
        + (f" at guidance {measured['guidance_scale']} (a doubled batch per step)" if guided else "")
        + "; the student on its own scheduler, one U-Net call a step.",
        markdown_table(header, rows),
    ]
    if timing:
        parts.append(
            f"Time to {measured['timing_samples']:,} digits in batches of {measured['batch_size']}, in one process "
            f"on that CPU ({timing['precision']} U-Nets; diffusers' `DDPMPipeline` in fp32, as its users run it):\n\n"
            + markdown_table(
                ["sampler", "seconds", "the student is"],
                [
                    [f"the student, {steps} steps", f"{timing[f'student_{steps}_steps_s']:.1f}", ""],
                    [
                        "the teacher at its card's setting",
                        f"{timing['teacher_s']:.1f}",
                        f"{timing['speedup_vs_teacher']:.1f}x faster",
                    ],
                    [
                        "`DDPMPipeline`, `DDPMScheduler` on 50 steps, same U-Net",
                        f"{timing['ddpmpipeline_50_steps_fp32_s']:.1f}",
                        f"{timing['speedup_vs_ddpmpipeline']:.1f}x faster",
                    ],
                ],
            )  # fmt: skip
        )
    parts.append(distillation_targets(settings, timing, steps))
    parts.append(
        f"Distilled with `training/distill.py` in {record['training_time']} on {record['hardware']}, "
        f"{record['mixed_precision']}: {record['global_step']:,} steps, {record['teacher_paths']:,} teacher paths."
    )
    parts += [args.note] if args.note else []
    card = {
        "dataset_name": CARD_DATASET,
        "training": record,
        "recommended_scheduler": (None, steps),
        "eval_results": mean,
        "evaluation": "\n\n".join(parts),
    }
    return pipe, card, {"output_dir": args.output_dir, "recommended": mean, "timing": timing}


def distillation_targets(settings: dict, timing: dict | None, steps: int) -> str:
    """The student's targets, each with its figure and verdict, as a Markdown list: `DISTILLATION_TARGETS`."""
    lines = ["**Targets:**", ""]
    for setting, key, words, limit, at_least in DISTILLATION_TARGETS:
        source = timing if setting == "timing" else settings.get(setting.format(steps=steps))
        if source is None:
            continue
        value = source[key] if setting == "timing" else float(np.mean(source[key]))
        met = value >= limit if at_least else value <= limit
        shown = f"{value:.1%}" if key == "class_accuracy" else f"{value:.2f}x"
        lines.append(f"- {words.format(steps=steps)}: {shown} (**{'met' if met else 'missed'}**)")
    return "\n".join(lines)


def quality_scores(result: dict) -> SampleQuality:
    """The scores in a result of `ddpm-mnist evaluate --json` (or in its "floor")."""
    return SampleQuality(**{field.name: result[field.name] for field in fields(SampleQuality)})


def portable_command(command: list[str]) -> str:
    """The GPU run's training command as a user types it: `accelerate launch`, the Hub's MNIST, a relative folder."""
    script = command.index("training/train.py")
    launch_flags = command[command.index("accelerate.commands.launch") + 1 : script]
    flags = [flag for flag in command[script + 1 :] if not flag.startswith(("--dataset_name=", "--output_dir="))]
    where = ["--dataset_name=ylecun/mnist", "--output_dir=ddpm-mnist"]
    return shlex.join(["accelerate", "launch", *launch_flags, "training/train.py", *where, *flags])


def draw_nll_terms(bound: VariationalBound, path: Path) -> None:
    """Draw L_{t-1} against t (log scale) into `path`, with L_T and L_0 marked: where the bound's bits are spent."""
    t, terms = bound.timestep_curve()
    summary = bound.summary()
    kind = "every t" if bound.exact else f"mean over each of {len(t)} strata of t"
    text = (
        f"L_0 = {summary['decoder_bpd']:.3f}, L_T = {summary['prior_bpd']:.1e}\n"
        f"sum of L_(t-1) = {summary['diffusion_bpd']:.3f}\ntotal = {summary['nll_bpd']:.3f} bits/dim"
    )
    with figure(path, (6, 3.4), grid="both") as ax:
        ax.plot(t.numpy(), terms.numpy(), color="tab:purple", linewidth=1.6, marker="" if bound.exact else ".")
        ax.set(xlabel="t", ylabel="L_(t-1) (bits/dim)", yscale="log", title=f"Terms of the NLL bound ({kind})")
        ax.text(0.98, 0.95, text, transform=ax.transAxes, ha="right", va="top")


def denoising_strip(pipe: DDPMMnistPipeline, seed: int) -> Image.Image:
    """One digit under 1000-step DDPM, from x_T to x_0 in STRIP_FRAMES frames, upscaled 3x."""
    ddpm = DDPMMnistScheduler.from_config(pipe.scheduler.config)
    steps = ddpm.config.num_train_timesteps
    shown = {round(k * steps / (STRIP_FRAMES - 1)) - 1 for k in range(1, STRIP_FRAMES)}
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((1, 1, pipe.unet.config.sample_size, pipe.unet.config.sample_size), generator=generator)
    frames = [x_T[0]]

    def keep(pipeline: DDPMMnistPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        if i in shown:
            frames.append(tensors["image"][0].float().cpu())
        return {}

    saved_scheduler, pipe.scheduler = pipe.scheduler, ddpm
    generator.manual_seed(seed)  # the pipeline's first draw is then this x_T
    try:
        pipe(num_inference_steps=steps, generator=generator, output_type="pt", callback_on_step_end=keep)
    finally:
        pipe.scheduler = saved_scheduler
    return digit_grid(pipe.postprocess(torch.stack(frames), "pt"), cols=len(frames), upscale=3)


def draw_loss_curve(logs: Path, path: Path) -> None:
    """Draw the training loss per step of the run's tensorboard logs (all resumed runs), raw and smoothed."""
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
    with figure(path, (6, 3.2)) as ax:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label="moving average")
        ax.set(xlabel="optimizer step", ylabel="L_simple (MSE on eps)", yscale="log", title="Training loss")
        ax.legend()


def draw_guidance_sweep(
    sweep: dict[float, ConditionalQuality], floor: SampleQuality, recommended: float, path: Path
) -> None:
    """Draw class accuracy against FID over the guidance scales into `path`: one point per scale, labelled with it,
    and the real-vs-real floor's FID as a dashed line."""
    fids = [scores.quality.fid for scores in sweep.values()]
    accuracies = [scores.accuracy.accuracy for scores in sweep.values()]
    with figure(path, (6, 3.6)) as ax:
        ax.plot(fids, accuracies, color="tab:green", marker="o", linewidth=1.4)
        for scale, fid, accuracy in zip(sweep, fids, accuracies, strict=True):
            label = f"{scale:g}" + (" (recommended)" if scale == recommended else "")
            ax.annotate(label, (fid, accuracy), textcoords="offset points", xytext=(5, 5))
        ax.axvline(floor.fid, color="grey", linestyle="--", label=f"real-vs-real floor (FID {floor.fid:.2f})")
        ax.set(xlabel=f"FID (classifier features, N={floor.num_images})", ylabel="class accuracy")
        ax.set_title("Classifier-free guidance, scale by scale")
        ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.legend(loc="lower right")


def draw_class_pictures(
    pipe: DDPMMnistPipeline, guidance_scale: float, x_0: torch.Tensor, labels: torch.Tensor, seed: int, folder: Path
) -> None:
    """Into `folder`, upscaled 3x: test digits x_0 (N, 1, 28, 28) in [-1, 1] completed from their top half as their
    own digit by the inpainting pipeline's defaults (all T steps where T is fewer), in rows original, kept half (the
    rest black) and completion; and `interpolate` between the first two at the card's t, without a label, in a row."""
    inpaint = DDPMMnistInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    keep = keep_half("top")
    steps = min(INPAINT_STEPS, pipe.scheduler.config.num_train_timesteps)
    options = {"class_labels": labels, "guidance_scale": guidance_scale, "num_inference_steps": steps}
    completed = inpaint(x_0, keep, **options, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    kept = torch.where(keep.bool(), x_0, -1.0)
    rows = torch.cat([(x_0 + 1) / 2, (kept + 1) / 2, completed.float().cpu()])
    digit_grid(rows, cols=len(x_0), upscale=3).save(folder / "completion.png")
    x_a, x_b = x_0[:1], x_0[1:2]
    t = pipe.scheduler.config.num_train_timesteps // INTERPOLATION_T_DIVISOR
    row = interpolate(pipe, x_a, x_b, t=t, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    ends = torch.cat([(x_a + 1) / 2, row.float().cpu(), (x_b + 1) / 2])
    digit_grid(ends, cols=len(row) + 2, upscale=3).save(folder / "interpolation.png")


def write_release(pipe: DDPMMnistPipeline, card: dict[str, Any], staging: Path, args: argparse.Namespace) -> None:
    """Save the pipeline beside the pictures in `staging/samples`, render its card with every picture there, and
    write the folder a push uploads to --output_dir: whole or not at all (exported beside it, then renamed)."""
    pipe.save_pretrained(staging)
    # diffusers writes the run's folder on this machine into a loaded pipeline's configs (`_name_or_path`): drop it.
    for path in [staging / "model_index.json", *staging.glob("*/*config.json")]:
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if args.time_to_quality_image:
        shutil.copyfile(args.time_to_quality_image, staging / "samples" / "time_to_quality.png")
    pictures = {path.stem: f"samples/{path.name}" for path in sorted((staging / "samples").glob("*.png"))}
    render_model_card(pipe, args.hub_model_id, pictures=pictures, **card).save(staging / "README.md")
    partial = Path(f"{args.output_dir}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    export_pipeline_folder(staging, partial)
    partial.rename(args.output_dir)


def main(args: argparse.Namespace) -> None:
    """Check everything, then score the run (or read the GPU's results), draw, render the card and write the release;
    print the results as one line of JSON."""
    check_args(args)
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(scratch) / "release"
        (staging / "samples").mkdir(parents=True)
        if args.gpu_results is not None:
            pipe, card, report = read_gpu_results(args, Path(scratch), staging / "samples")
        elif args.distillation_results is not None:
            pipe, card, report = read_distillation(args, staging / "samples")
        else:
            pipe, card, report = measure_run(args, staging / "samples")
        write_release(pipe, card, staging, args)
    print(json.dumps(report))


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "release.py")
