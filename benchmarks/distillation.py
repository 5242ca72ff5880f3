"""A distilled student against its teacher: quality at each step count, and the time to 1,000 digits.

    python benchmarks/distillation.py pretrained/ddpm-mnist-cond-small-4step \\
        --pretrained_teacher_model pretrained/ddpm-mnist-cond-small --dataset_name ylecun/mnist \\
        --output benchmarks/results/distillation.json

Quality: for each seed, --num_samples digits with balanced labels (each digit equally often) from the student on its
own scheduler at each of --num_inference_steps, and from the teacher at its recommended setting (--teacher_scheduler
on --teacher_num_inference_steps, --guidance_scale), scored against the MNIST test digits with the package's
classifier: class accuracy, mean confidence, and FID beside the real-vs-real floor at the same N and beside the
teacher's FID of the same seed. FIDs come from the project's MNIST classifier, not Inception: compare them only with
each other.

Speed: the seconds to draw --timing_samples digits in batches of --batch_size, each after a one-batch warm-up, of the
student at --timing_steps steps and of the teacher at its setting, both in the precision the package picks for the
machine (bf16 where native, else fp32), and of diffusers' `DDPMPipeline` with `DDPMScheduler` on 50 steps around the
teacher's U-Net in fp32, as a diffusers user would run it. All three run in one process, naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.errors import UsageError, run_entry_point, usage_errors
from ddpm_mnist.evaluation import QualityReference, generate_digits, load_pipeline
from ddpm_mnist.hardware import auto_mixed_precision, describe_device
from ddpm_mnist.metrics.quality import balanced_class_labels
from ddpm_mnist.schedulers import SCHEDULERS

DIFFUSERS_STEPS = 50  # DDPMPipeline's baseline: DDPMScheduler respaced to 50 steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, each with its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="the student pipeline (a folder or Hub id)")
    p.add_argument("--pretrained_teacher_model", required=True, help="the teacher pipeline (a folder or Hub id)")
    p.add_argument("--dataset_name", default=DEFAULT_DATASET, help="MNIST, a Hub id or a local copy")
    steps = "the student's step counts"
    p.add_argument("--num_inference_steps", type=int, nargs="+", default=[1, 2, 4, 8], help=steps)
    p.add_argument("--teacher_scheduler", default="unipc", choices=list(SCHEDULERS), help="the teacher's sampler")
    p.add_argument("--teacher_num_inference_steps", type=int, default=20, help="the teacher's steps")
    p.add_argument("--guidance_scale", type=float, default=1.5, help="the teacher's guidance")
    p.add_argument("--num_samples", type=int, default=1000, help="digits per setting and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds")
    p.add_argument("--timing_samples", type=int, default=1000, help="digits per timing (0: no timing)")
    p.add_argument("--timing_steps", type=int, default=4, help="the student's steps in the timing")
    p.add_argument("--batch_size", type=int, default=250, help="digits per pipeline call")
    p.add_argument("--output", help="write the results as JSON here")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags in one line before any model is loaded."""
    for name in ("num_samples", "batch_size", "teacher_num_inference_steps", "timing_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}.")
    if min(args.num_inference_steps) < 1:
        raise UsageError(f"--num_inference_steps must be positive, got {args.num_inference_steps}.")
    if args.timing_samples < 0:
        raise UsageError(f"--timing_samples must be 0 (no timing) or more, got {args.timing_samples}.")
    if args.guidance_scale < 1:
        raise UsageError(f"--guidance_scale must be at least 1 (1: none), got {args.guidance_scale}.")
    if args.output and Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a folder; pass the path of a JSON file to write.")


def score_settings(args: argparse.Namespace, student: DDPMMnistPipeline, teacher: DDPMMnistPipeline) -> dict:
    """Every setting's scores for each seed, and the floor."""
    reference = QualityReference(args.dataset_name)
    floor = reference.floor(args.num_samples).fid
    labels = balanced_class_labels(args.num_samples)
    teacher_setting = dict(scheduler=args.teacher_scheduler, num_inference_steps=args.teacher_num_inference_steps,
                           guidance_scale=args.guidance_scale)  # fmt: skip
    settings = {"teacher": (teacher, teacher_setting)}
    for steps in args.num_inference_steps:
        settings[f"student, {steps} steps"] = (student, dict(scheduler=None, num_inference_steps=steps))
    results = {}
    for name, (pipe, setting) in settings.items():
        scores = []
        for seed in args.seeds:
            digits = generate_digits(
                pipe, args.num_samples, class_labels=labels, seed=seed, batch_size=args.batch_size, **setting
            )
            scores.append(reference.score_conditional(digits, labels))
        results[name] = {
            "fid": [s.quality.fid for s in scores],
            "class_accuracy": [s.accuracy.accuracy for s in scores],
            "mean_confidence": [s.quality.mean_confidence for s in scores],
        }
        print(f"{name}: FID {results[name]['fid']}, accuracy {results[name]['class_accuracy']}", flush=True)
    teacher_fid = results["teacher"]["fid"]
    for result in results.values():
        result["fid_over_floor"] = statistics.mean(result["fid"]) / floor
        result["fid_over_teacher"] = statistics.mean(f / t for f, t in zip(result["fid"], teacher_fid, strict=True))
    return {"floor_fid": floor, "settings": results}


def seconds_to_draw(
    pipe: DiffusionPipeline, num_samples: int, batch_size: int, conditional: bool = True, **call: object
) -> float:
    """Wall seconds for `num_samples` digits in calls of `batch_size` (balanced labels where `conditional`), after one
    warm-up call."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)

    def draw(size: int) -> None:
        batch = {"class_labels": balanced_class_labels(size)} if conditional else {"batch_size": size}
        pipe(generator=generator, output_type="np", **batch, **call)

    draw(batch_size)
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        draw(min(batch_size, num_samples - first))
    return time.perf_counter() - start


def time_settings(args: argparse.Namespace) -> dict:
    """Seconds to --timing_samples digits: the student, the teacher, and DDPMPipeline on the teacher's U-Net; and the
    student's speed-ups."""
    precision = "bf16" if auto_mixed_precision("cpu") == "bf16" else "fp32"
    student = load_pipeline(args.student, dtype=precision)
    teacher = load_pipeline(args.pretrained_teacher_model, dtype=precision)
    teacher.scheduler = SCHEDULERS[args.teacher_scheduler].from_config(teacher.scheduler.config)
    fp32_unet = teacher.unet if precision == "fp32" else load_pipeline(args.pretrained_teacher_model).unet
    baseline = DDPMPipeline(fp32_unet, DDPMScheduler.from_config(teacher.scheduler.config))
    n, batch = args.timing_samples, args.batch_size
    student_s = seconds_to_draw(student, n, batch, num_inference_steps=args.timing_steps)
    teacher_s = seconds_to_draw(
        teacher, n, batch, num_inference_steps=args.teacher_num_inference_steps, guidance_scale=args.guidance_scale
    )
    diffusers_s = seconds_to_draw(baseline, n, batch, conditional=False, num_inference_steps=DIFFUSERS_STEPS)
    print(f"{n} digits: student {student_s:.1f} s, teacher {teacher_s:.1f} s, DDPMPipeline {diffusers_s:.1f} s")
    return {
        "precision": precision,
        f"student_{args.timing_steps}_steps_s": student_s,
        "teacher_s": teacher_s,
        f"ddpmpipeline_{DIFFUSERS_STEPS}_steps_fp32_s": diffusers_s,
        "speedup_vs_ddpmpipeline": diffusers_s / student_s,
        "speedup_vs_teacher": teacher_s / student_s,
    }


def main() -> None:
    """Check the flags, score every setting, time the three samplers, print (and write) the results as JSON."""
    args = parse_args()
    check_args(args)
    with usage_errors("pretrained_teacher_model", "dataset_name", student="STUDENT"):
        student, teacher = load_pipeline(args.student), load_pipeline(args.pretrained_teacher_model)
        results = {"machine": describe_device("cpu"), "args": vars(args)}
        results |= score_settings(args, student, teacher)
    if args.timing_samples:
        results["timing"] = time_settings(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    run_entry_point(main, "distillation.py")
