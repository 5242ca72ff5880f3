"""Distil a DDPM pipeline into a student that draws in 1 to 8 steps: `accelerate launch training/distill.py --help`.

Top to bottom: the flags and their checks; the settings a resumed run must keep; and `main`: the teacher at its
recommended sampler and guidance, the student (a copy of the teacher's U-Net that learns to predict v), optimizer and
EMA, resume, the loop, and the student's pipeline folder with its model card. Each step draws new teacher paths from
noise and trains the student to predict, from states on them, where they end (`ddpm_mnist.distillation`); no dataset
is read. The run folder's machinery (lock, checkpoints, resume check, stop, progress, grids) is the one `train.py`
uses, `ddpm_mnist.training_utils`.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env, set_seed
from diffusers.optimization import get_scheduler

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.distillation import STUDENT_PREDICTION_TYPES, distillation_batch, distillation_loss, student_scheduler
from ddpm_mnist.errors import UsageError, WorkFailed, run_entry_point, usage_errors
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.schedulers import SCHEDULERS
from ddpm_mnist.training_utils import (
    OutputDirLock,
    SampleGrids,
    StopRequest,
    TrainingProgress,
    add_optimizer_flags,
    add_run_flags,
    check_hub_target,
    check_ranges,
    check_run_folder,
    claim_run_folder,
    find_checkpoint,
    grid_pipeline,
    make_accelerator,
    make_ema,
    parse_with_config,
    progress_bar,
    save_checkpoint,
    save_run,
    stop_reason,
)

logger = get_logger(__name__)
DEFAULT_TEACHER = "pretrained/ddpm-mnist-cond-small"
TEACHER_SCHEDULERS = [name for name in SCHEDULERS if name != "ddpm"]  # DDPM's ancestral steps add noise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, in `train.py`'s vocabulary (diffusers' LCM scripts name the teacher the same way)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    teacher = p.add_argument_group("teacher").add_argument
    teacher("--pretrained_teacher_model", default=DEFAULT_TEACHER, help="the teacher pipeline (a folder or Hub id)")
    teacher("--teacher_scheduler", default="unipc", choices=TEACHER_SCHEDULERS, help="the teacher's sampler: a "
            "deterministic one, so that a path's end is a function of its states")  # fmt: skip
    teacher("--teacher_num_inference_steps", type=int, default=20, help="the teacher's steps per path")
    teacher("--guidance_scale", type=float, default=1.5, help="the teacher's classifier-free guidance, which the "
            "student learns to draw with in one U-Net call per step (1: none)")  # fmt: skip
    teacher("--class_dropout_prob", type=float, default=0.1, help="the share of paths drawn with the null class (any "
            "digit, unguided), so that the student draws without a label too")  # fmt: skip
    student = p.add_argument_group("student").add_argument
    student("--prediction_type", default="v_prediction", choices=STUDENT_PREDICTION_TYPES, help="the student's target")
    student("--states_per_path", type=int, default=4, help="states of each teacher path trained on: the first (pure "
            "noise, where every draw begins) and others chosen at random")  # fmt: skip
    train = p.add_argument_group("optimization").add_argument
    train("--output_dir", default="ddpm-mnist-student", help="pipeline, card, samples, checkpoints, logs")
    train("--train_batch_size", type=int, default=8, help="new teacher paths per step and process")
    train("--max_train_steps", type=int, default=2000, help="optimizer steps")
    train("--overwrite_output_dir", action="store_true", help="replace the run an existing --output_dir holds")
    train("--seed", type=int, default=0, help="seed of the student's noise and labels; each process adds its rank")
    add_optimizer_flags(train, learning_rate=1e-4, lr_warmup_steps=100, ema_max_decay=0.999)
    io = p.add_argument_group("checkpoints, samples, logging, Hub").add_argument
    add_run_flags(io)
    io("--num_inference_steps", type=int, default=4, help="student steps of the sample grids and the card's code")
    return parse_with_config(p, argv)


# Each numeric flag's range, in words, as a test, and the flags it holds for; None means "not set" for optional ones.
RANGES = {
    "positive": (
        lambda v: v > 0,
        "teacher_num_inference_steps train_batch_size max_train_steps learning_rate max_grad_norm states_per_path "
        "checkpointing_steps checkpoints_total_limit save_images_steps num_samples num_inference_steps",
    ),
    "at least 1": (lambda v: v >= 1, "guidance_scale"),
    "at least 0": (lambda v: v >= 0, "lr_warmup_steps adam_weight_decay adam_epsilon"),
    "in [0, 1)": (lambda v: 0 <= v < 1, "adam_beta1 adam_beta2 class_dropout_prob"),
    "in (0, 1]": (lambda v: 0 < v <= 1, "ema_max_decay"),
}


def check_args(args: argparse.Namespace) -> dict:
    """Refuse bad flags with one line each, before the teacher's weights are read; return the teacher's U-Net config."""
    with usage_errors(*" ".join(names for _, names in RANGES.values()).split()):
        check_ranges(vars(args), RANGES)
    if args.states_per_path > args.teacher_num_inference_steps:
        raise UsageError(
            f"--states_per_path {args.states_per_path} exceeds the {args.teacher_num_inference_steps} states of a "
            "teacher path (--teacher_num_inference_steps); pass at most that many."
        )
    try:
        unet_config = dict(DDPMMnistUNet.load_config(args.pretrained_teacher_model, subfolder="unet"))
        schedule = DDPMMnistScheduler.load_config(args.pretrained_teacher_model, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--pretrained_teacher_model {args.pretrained_teacher_model} is not a pipeline with unet/ and scheduler/ "
            f"folders; pass a trained run's folder or a released model, such as {DEFAULT_TEACHER}."
        ) from e
    for name in ("teacher_num_inference_steps", "num_inference_steps"):
        if getattr(args, name) > schedule["num_train_timesteps"]:
            raise UsageError(
                f"--{name} {getattr(args, name)} exceeds the teacher's {schedule['num_train_timesteps']} diffusion "
                "steps; pass at most that many."
            )
    if args.guidance_scale > 1 and unet_config.get("num_class_embeds") is None:
        raise UsageError(
            f"--guidance_scale {args.guidance_scale} needs a class-conditional teacher, and "
            f"{args.pretrained_teacher_model} is unconditional; pass --guidance_scale 1."
        )
    with usage_errors("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "hub_model_id", "push_to_hub"):
        check_run_folder(Path(args.output_dir), args.resume_from_checkpoint, args.overwrite_output_dir)
        if args.push_to_hub:  # the full user/name, so that the model card's code names the repo the push creates
            args.hub_model_id = check_hub_target(args.hub_model_id or Path(args.output_dir).name)
    return unet_config


# Settings a resumed run must share with its checkpoint, and settings that may change (logged).
DISTILLATION_FLAGS = (
    "pretrained_teacher_model teacher_scheduler teacher_num_inference_steps guidance_scale class_dropout_prob "
    "prediction_type states_per_path train_batch_size seed learning_rate lr_scheduler lr_warmup_steps adam_beta1 "
    "adam_beta2 adam_weight_decay adam_epsilon use_ema ema_max_decay ema_inv_gamma ema_power"
).split()
RESUME_MUST_KEEP = [*DISTILLATION_FLAGS, "unet_config", "num_processes"]
RESUME_MAY_CHANGE = ["max_train_steps", "mixed_precision"]


def distillation_record(args: argparse.Namespace, progress: TrainingProgress, accelerator: Accelerator) -> dict:
    """The run's settings and numbers, for the model card and `training.json`."""
    paths = progress.global_step * args.train_batch_size * accelerator.num_processes
    return {
        **{name: getattr(args, name) for name in DISTILLATION_FLAGS},
        "global_step": progress.global_step,
        "teacher_paths": paths,
        "images_seen": paths * args.states_per_path,
        "total_batch_size": args.train_batch_size * accelerator.num_processes * args.states_per_path,
        "max_grad_norm": args.max_grad_norm,
        "mixed_precision": "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision,
        "hardware": f"{accelerator.num_processes} x {describe_device(accelerator.device)}",
        "training_time": f"{progress.train_seconds / 60:.1f} minutes",
    }


def main(args: argparse.Namespace) -> None:
    """Distil, top to bottom: inputs checked, teacher, student, optimizer and EMA, resume, the loop, the student's
    pipeline folder."""
    unet_config = check_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    output_dir, checkpoints_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator will read it
    lock = OutputDirLock(output_dir)  # one run per folder: held (open) until main returns
    settings = {name: getattr(args, name) for name in DISTILLATION_FLAGS + RESUME_MAY_CHANGE}
    settings.update(unet_config=unet_config, num_processes=state.num_processes)
    resume_path = find_checkpoint(checkpoints_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    with usage_errors("output_dir"):
        claim_run_folder(
            state, lock, resume_path, settings, RESUME_MUST_KEEP, RESUME_MAY_CHANGE, args.overwrite_output_dir
        )
    accelerator = make_accelerator(output_dir, args.logging_dir, args.mixed_precision, log_with=args.logger)

    # The teacher at its sampler and guidance (in the run's precision: it only infers), and the student: the teacher's
    # U-Net, whose output now reads as the student's prediction type, on the student's few-step DDIM.
    teacher = DDPMMnistPipeline.from_pretrained(args.pretrained_teacher_model).to(accelerator.device)
    student_sampler = student_scheduler(teacher.scheduler, args.prediction_type)  # on the teacher's noise schedule
    teacher.scheduler = SCHEDULERS[args.teacher_scheduler].from_config(teacher.scheduler.config)
    if accelerator.mixed_precision == "bf16":
        teacher.unet.to(torch.bfloat16)
    teacher.unet.eval().requires_grad_(False)
    teacher.set_progress_bar_config(disable=True)
    student = DDPMMnistUNet.from_pretrained(args.pretrained_teacher_model, subfolder="unet")
    set_seed(args.seed, device_specific=True)  # each process draws its own paths; checkpoints keep its RNG
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )  # fmt: skip
    warmup, total = args.lr_warmup_steps * state.num_processes, args.max_train_steps * state.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    student, optimizer, lr_scheduler = accelerator.prepare(student.train(), optimizer, lr_scheduler)
    ema = make_ema(accelerator.unwrap_model(student), args)
    progress = TrainingProgress()  # EMA first, as train.py registers them
    accelerator.register_for_checkpointing(*[saved for saved in (ema, progress) if saved is not None])
    if resume_path is not None:
        accelerator.load_state(str(resume_path))  # weights, optimizer, lr, EMA, progress and every process's RNG
        logger.info(f"resumed from {resume_path} at step {progress.global_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"no checkpoint in {checkpoints_dir}; starting from scratch")
    accelerator.init_trackers("ddpm-mnist-distill", config={k: v for k, v in vars(args).items() if v is not None})
    paths_per_step = args.train_batch_size * accelerator.num_processes
    logger.info(
        f"distilling {args.pretrained_teacher_model} ({args.teacher_scheduler}, {args.teacher_num_inference_steps} "
        f"steps, guidance {args.guidance_scale}) into a {args.prediction_type} student: {args.max_train_steps} steps "
        f"of {paths_per_step} paths, {args.states_per_path} states each"
    )
    batch = dict(
        batch_size=args.train_batch_size, num_inference_steps=args.teacher_num_inference_steps,
        guidance_scale=args.guidance_scale, class_dropout_prob=args.class_dropout_prob,
        states_per_path=args.states_per_path,
    )  # fmt: skip
    grids = SampleGrids(output_dir, args.num_samples, args.num_inference_steps, args.seed)
    stop, reason = StopRequest(), "finished" if progress.global_step >= args.max_train_steps else None
    progress.start_clock()
    with progress_bar(progress, args.max_train_steps, disable=not accelerator.is_local_main_process) as bar:
        while reason is None:
            x_t, t, y, x_0 = distillation_batch(teacher, **batch)
            loss = distillation_loss(student, student_sampler, x_t, t, y, x_0)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            if ema is not None:
                ema.step(accelerator.unwrap_model(student).parameters())
            mean_loss = progress.end_step(accelerator, loss.item(), stop)
            if not math.isfinite(mean_loss):  # a failure: the run ends without a checkpoint of the broken weights
                raise WorkFailed(
                    f"the loss became {mean_loss} at step {progress.global_step}; lower --learning_rate, then resume "
                    f"from the last good checkpoint in {checkpoints_dir}."
                )
            reason = stop_reason(progress, stop.requested, args.max_train_steps)
            paths_per_second = progress.steps_per_second() * paths_per_step
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm.item()}
            accelerator.log({**logs, "paths_per_second": paths_per_second}, step=progress.global_step)
            bar.set_postfix(loss=f"{mean_loss:.4f}", paths_s=f"{paths_per_second:.1f}", refresh=False)
            bar.update()
            if progress.global_step % args.checkpointing_steps == 0 or reason is not None:
                save_checkpoint(
                    accelerator, checkpoints_dir, progress.global_step, args.checkpoints_total_limit, settings
                )
            if progress.global_step % args.save_images_steps == 0 and accelerator.is_main_process:
                grids.save(
                    accelerator,
                    grid_pipeline(accelerator.unwrap_model(student), student_sampler, ema),
                    progress.global_step,
                )

    if reason == "stopped on request":
        logger.info(f"stopped at step {progress.global_step} on request; resume with --resume_from_checkpoint latest")
    elif accelerator.is_main_process:
        pipeline = grid_pipeline(accelerator.unwrap_model(student), student_sampler, ema)
        save_run(
            accelerator, pipeline, grids, progress.global_step, args.hub_model_id or output_dir.name,
            dataset_name=DEFAULT_DATASET, training=distillation_record(args, progress, accelerator),
            samples_scheduler=(None, args.num_inference_steps), push_to_hub=args.push_to_hub,
            hub_private_repo=args.hub_private_repo,
        )  # fmt: skip
        logger.info(f"{reason} at step {progress.global_step}: saved the student and its model card to {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "distill.py")
