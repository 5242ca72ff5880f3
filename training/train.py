"""Train a DDPM on MNIST: `accelerate launch training/train.py --help`.

Top to bottom: arguments, data, model and noise schedule, optimizer and EMA, resume, the loop
(Algorithm 1 of Ho et al. 2020 with L_simple), checkpoints and sample grids, and the final pipeline folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import make_image_grid
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.data import (
    DEFAULT_DATASET,
    ImagePreprocessor,
    count_examples,
    decode_stream,
    epoch_order,
    load_image_stream,
    shuffled_shard,
)
from ddpm_mnist.hub import check_push_access, push_pipeline_folder, render_model_card
from ddpm_mnist.unet_ddpm_mnist import PRESETS

logger = get_logger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, named as in diffusers' `train_unconditional.py`; `--config` reads them from JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="a JSON file of flag values (keys as the flags, without dashes)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=DEFAULT_DATASET, help="Hub dataset id, or a local folder/parquet")
    data.add_argument("--dataset_config_name", default=None, help="the dataset's config name")
    data.add_argument("--image_column", default="image", help="the column holding the images")
    data.add_argument("--random_flip", action="store_true", help="random horizontal flips (wrong for digits)")
    data.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="examples in the shuffle buffer")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")
    data.add_argument(
        "--decode_once",
        action="store_true",
        help="decode every image once into memory (MNIST: 47 MB) and shuffle exactly each epoch, instead of "
        "streaming through the shuffle buffer; far faster data, for datasets that fit in memory",
    )
    model = p.add_argument_group("model and noise schedule")
    model.add_argument("--preset", default="mnist", choices=sorted(PRESETS), help="a DDPMMnistUNet preset")
    model.add_argument("--model_config_name_or_path", default=None, help="a UNet config.json (overrides --preset)")
    model.add_argument("--ddpm_num_steps", type=int, default=1000, help="T, the number of diffusion steps")
    model.add_argument("--ddpm_beta_schedule", default="linear", help="the beta schedule (the paper's: linear)")
    model.add_argument(
        "--prediction_type",
        default="epsilon",
        choices=["epsilon", "sample", "v_prediction"],
        help="the target",
    )
    model.add_argument(
        "--variance_type",
        default="fixed_small",
        choices=["fixed_small", "fixed_large"],
        help="sigma_t^2 choice",
    )
    train = p.add_argument_group("optimization")
    train.add_argument("--output_dir", default="ddpm-mnist", help="pipeline, card, samples, checkpoints, logs")
    train.add_argument("--seed", type=int, default=0, help="seed of weights, noise, timesteps and data order")
    train.add_argument("--train_batch_size", type=int, default=128, help="batch size per process")
    train.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    train.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="stop and save the pipeline once training time, summed over resumed runs, passes this",
    )
    train.add_argument("--num_epochs", type=int, default=None, help="passes over the data (default 100)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    train.add_argument("--learning_rate", type=float, default=2e-4, help="peak learning rate (the paper's)")
    train.add_argument("--lr_scheduler", default="constant_with_warmup", help="a diffusers get_scheduler name")
    train.add_argument("--lr_warmup_steps", type=int, default=5000, help="learning-rate warm-up steps")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    train.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
    train.add_argument(
        "--snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual)"
    )
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="EMA of weights")
    train.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA decay after warm-up")
    train.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inv_gamma")
    train.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warm-up power")
    train.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="overrides accelerate")
    io = p.add_argument_group("checkpoints, samples, logging, Hub")
    io.add_argument("--checkpointing_steps", type=int, default=1000, help="save a checkpoint every N steps")
    io.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    io.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    io.add_argument("--save_images_steps", type=int, default=1000, help="save a grid of EMA samples every N steps")
    io.add_argument("--num_sample_images", type=int, default=16, help="images in each sample grid")
    io.add_argument("--sample_scheduler", default="ddpm", choices=["ddpm", "ddim"], help="sampler of the sample grids")
    io.add_argument("--ddpm_num_inference_steps", type=int, default=1000, help="sampling steps of the grids")
    io.add_argument("--logger", default="tensorboard", help="an accelerate tracker (tensorboard, wandb, ...)")
    io.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    io.add_argument("--push_to_hub", action="store_true", help="upload the final pipeline to the Hub")
    io.add_argument("--hub_model_id", default=None, help="the Hub repo, user/name (default: output_dir's name)")
    io.add_argument("--hub_private_repo", action="store_true", help="create the Hub repo private")
    args = p.parse_args(argv)
    if args.config:
        with open(args.config) as f:
            config = json.load(f)
        unknown = sorted(set(config) - set(vars(args)))
        if unknown:
            p.error(f"{args.config} has unknown keys: {', '.join(unknown)}; use the flag names without dashes.")
        p.set_defaults(**config)
        args = p.parse_args(argv)  # flags given on the command line still win
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments with one line each, before any data or model is touched."""
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "save_images_steps",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be at least 1, got {args.max_train_steps}.")
    for name in ("max_train_minutes", "snr_gamma"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.model_config_name_or_path and not os.path.isfile(args.model_config_name_or_path):
        raise FileNotFoundError(f"--model_config_name_or_path {args.model_config_name_or_path} is not a file.")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder; pass a checkpoint folder "
            "or 'latest'."
        )
    if args.push_to_hub:
        repo_id = args.hub_model_id or Path(args.output_dir).name
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ValueError(f"--hub_model_id is not a valid repo id ({e}); pass one like user/ddpm-mnist.") from e
        try:
            # The full user/name, so that the model card's code names the repo the push creates.
            args.hub_model_id = check_push_access(repo_id)
        except ValueError as e:
            raise ValueError(f"--push_to_hub needs a Hub token that can write to {repo_id}: {e}") from e


class TrainingProgress:
    """Where training stands: optimizer steps, epoch, and batches of this epoch already consumed.

    Saved in every checkpoint (accelerate's `register_for_checkpointing`), so a resumed run skips exactly the
    batches it had trained on. The data order is a pure function of (seed, epoch, process), so the position
    is all that needs saving; `datasets`' own `state_dict()` cannot do this exactly, since it drops the
    shuffle buffer.
    """

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.train_seconds = 0.0  # wall time over all runs that led here

    def state_dict(self) -> dict[str, float]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, float]) -> None:
        vars(self).update(state)


def find_checkpoint(checkpoints_dir: Path, resume_from: str) -> Path | None:
    """The checkpoint folder to resume from: the given one, or the highest complete `checkpoint-N` for latest."""
    if resume_from != "latest":
        return Path(resume_from)
    steps = [int(m[1]) for d in checkpoints_dir.glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.match(d.name))]
    return checkpoints_dir / f"checkpoint-{max(steps)}" if steps else None


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, total_limit: int | None) -> None:
    """`save_state` into a temporary folder, then rename it: `latest` never sees half a checkpoint."""
    final = checkpoints_dir / f"checkpoint-{step}"
    partial = checkpoints_dir / f"tmp-checkpoint-{step}"
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        kept = sorted(
            (d for d in checkpoints_dir.iterdir() if CHECKPOINT_PATTERN.match(d.name)),
            key=lambda d: int(d.name.split("-")[1]),
        )
        for old in kept[: -total_limit if total_limit else 0]:
            shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def min_snr_weight(
    noise_scheduler: DDPMMnistScheduler, t: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-example loss weight of min-SNR-gamma (Hang et al. 2023): min(SNR_t, gamma) over the target's own weight."""
    snr = compute_snr(noise_scheduler, t)  # SNR_t = abar_t / (1 - abar_t)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # x_0 prediction


def release_pipeline(
    unet: DDPMMnistUNet, scheduler: DDPMMnistScheduler | DDIMScheduler, ema: EMAModel | None
) -> DDPMMnistPipeline:
    """A pipeline around a copy of the weights to release: the EMA ones when there is an EMA."""
    unet = copy.deepcopy(unet).eval()
    if ema is not None:
        ema.copy_to(unet.parameters())
    pipeline = DDPMMnistPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main(args: argparse.Namespace) -> None:
    check_args(args)
    # `datasets` hands Arrow Python file objects, and Arrow's CPU thread pool can then deadlock at exit or in
    # `to_batches` (apache/arrow#45214, #50482); one Arrow thread avoids it and costs nothing here, where
    # decoding PNGs, not reading parquet, is the work.
    pyarrow.set_cpu_count(1)
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    set_seed(args.seed)
    resume_path = find_checkpoint(checkpoints_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None

    # Data: each process streams its own shuffled share of the examples, decoded a batch at a time.
    stream = load_image_stream(args.dataset_name, "train", args.dataset_config_name, args.image_column)
    num_examples = count_examples(stream)

    # Model and the forward process q(x_t | x_0) of the paper.
    if args.model_config_name_or_path:
        unet = DDPMMnistUNet.from_config(DDPMMnistUNet.load_config(args.model_config_name_or_path))
    else:
        unet = DDPMMnistUNet.from_preset(args.preset)
    noise_scheduler = DDPMMnistScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        variance_type=args.variance_type,
    )
    # The sample grids use DDPM (Algorithm 2) or, faster, DDIM on the same schedule.
    sample_scheduler = noise_scheduler
    if args.sample_scheduler == "ddim":
        sample_scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    preprocess = ImagePreprocessor(unet.config.sample_size, random_flip=args.random_flip)
    digits = decode_stream(stream, preprocess) if args.decode_once else None
    # Every process takes the same whole number of optimizer steps per epoch; a remainder of examples waits for
    # the next epoch's shuffle.
    steps_per_epoch = (
        num_examples // accelerator.num_processes // args.train_batch_size // args.gradient_accumulation_steps
    )
    batches_per_epoch = steps_per_epoch * args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"{num_examples} examples over {accelerator.num_processes} processes give no full batch of "
            f"{args.train_batch_size} x {args.gradient_accumulation_steps}; lower --train_batch_size."
        )
    max_train_steps = args.max_train_steps or (args.num_epochs or 100) * steps_per_epoch

    # Optimizer, learning-rate schedule and EMA of the weights (the released weights are the EMA).
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    # The DataLoader is not prepared: accelerate would shard the already-split stream a second time.
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = None
    if args.use_ema:
        ema = EMAModel(
            accelerator.unwrap_model(unet).parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    if resume_path is not None:
        accelerator.load_state(str(resume_path))  # weights, optimizer, lr, EMA, progress and every RNG
        logger.info(f"resumed from {resume_path} at step {progress.global_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"no checkpoint in {checkpoints_dir}; starting from scratch")

    if accelerator.is_main_process:
        accelerator.init_trackers("ddpm-mnist", config={k: v for k, v in vars(args).items() if v is not None})
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    num_parameters = sum(p.numel() for p in unet.parameters())
    logger.info(
        f"{num_examples} examples, {num_parameters:,} parameters, {max_train_steps} steps of {total_batch_size} "
        f"images ({accelerator.num_processes} processes, {steps_per_epoch} steps per epoch)"
    )

    # SIGINT/SIGTERM: finish the current step, write a checkpoint, exit cleanly.
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    progress_bar = tqdm(
        total=max_train_steps, initial=progress.global_step, disable=not accelerator.is_local_main_process
    )
    start_time, images_at_start = time.time(), progress.global_step * total_batch_size
    last_time = start_time
    unet.train()
    out_of_time = False
    while progress.global_step < max_train_steps and not (stop_requested or out_of_time):
        share = dict(
            seed=args.seed, epoch=progress.epoch, rank=accelerator.process_index, world_size=accelerator.num_processes
        )
        if digits is not None:
            order = epoch_order(len(digits), **share)
            batches = (preprocess.scale(digits[indices]) for indices in order.split(args.train_batch_size))
        else:
            batches = DataLoader(
                shuffled_shard(stream, buffer_size=args.shuffle_buffer_size, **share),
                batch_size=args.train_batch_size,
                collate_fn=preprocess,
                num_workers=args.dataloader_num_workers,
                generator=torch.Generator(),  # its own seed draw must not advance the global RNG that resume restores
            )
        # A resumed epoch skips the batches already trained on.
        for x_0 in islice(batches, progress.batches_in_epoch, batches_per_epoch):
            x_0 = x_0.to(accelerator.device)
            # Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4).
            eps = torch.randn_like(x_0)
            t = torch.randint(0, args.ddpm_num_steps, (x_0.shape[0],), device=x_0.device)
            x_t = noise_scheduler.add_noise(x_0, eps, t)
            if args.prediction_type == "epsilon":
                target = eps
            elif args.prediction_type == "sample":
                target = x_0
            else:
                target = noise_scheduler.get_velocity(x_0, eps, t)
            with accelerator.accumulate(unet):
                loss = F.mse_loss(unet(x_t, t).sample.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if args.snr_gamma is not None:
                    loss = loss * min_snr_weight(noise_scheduler, t, args.snr_gamma, args.prediction_type)
                loss = loss.mean()  # L_simple (eq. 14), or its min-SNR-weighted form
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done, on every process.
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            progress.global_step += 1
            progress.train_seconds += time.time() - last_time
            last_time = time.time()
            # One collective per step: the mean loss, whether any process was asked to stop, and whether the
            # time budget is spent (decided on the main process's clock, so every process agrees).
            out_of_time = (
                args.max_train_minutes is not None
                and accelerator.is_main_process
                and progress.train_seconds >= 60 * args.max_train_minutes
            )
            flags = accelerator.reduce(torch.tensor([loss.item(), stop_requested, out_of_time], device=x_0.device))
            mean_loss = flags[0].item() / accelerator.num_processes
            stop_requested, out_of_time = bool(flags[1] > 0), bool(flags[2] > 0)
            if not math.isfinite(mean_loss):
                progress_bar.close()
                raise FloatingPointError(
                    f"the loss became {mean_loss} at step {progress.global_step}; the last good checkpoint stays "
                    f"in {checkpoints_dir}. Lower --learning_rate or use --mixed_precision no, then resume."
                )
            images_per_second = (progress.global_step * total_batch_size - images_at_start) / (time.time() - start_time)
            logs = {
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": grad_norm.item(),
                "images_per_second": images_per_second,
            }
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=progress.global_step)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.0f}")

            # Also at the end of the run, so that it can be continued with a larger budget.
            run_ends = progress.global_step >= max_train_steps or stop_requested or out_of_time
            if progress.global_step % args.checkpointing_steps == 0 or run_ends:
                save_checkpoint(accelerator, checkpoints_dir, progress.global_step, args.checkpoints_total_limit)
            if progress.global_step % args.save_images_steps == 0 and accelerator.is_main_process:
                pipeline = release_pipeline(accelerator.unwrap_model(unet), sample_scheduler, ema)
                save_sample_grid(accelerator, pipeline, output_dir, progress.global_step, args)
            if run_ends:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    progress_bar.close()

    if stop_requested:
        logger.info(f"stopped at step {progress.global_step} on request; resume with --resume_from_checkpoint latest")
        accelerator.end_training()
        return

    # The pipeline folder: EMA weights (safetensors), scheduler, a sample grid and the model card.
    if accelerator.is_main_process:
        pipeline = release_pipeline(accelerator.unwrap_model(unet), sample_scheduler, ema)
        grid_path = output_dir / "samples" / f"step-{progress.global_step:07d}.png"
        if not grid_path.exists():  # the last step may have drawn its grid already
            save_sample_grid(accelerator, pipeline, output_dir, progress.global_step, args)
        pipeline.scheduler = noise_scheduler
        pipeline.save_pretrained(output_dir)
        repo_id = args.hub_model_id or output_dir.name
        card_flags = (
            "learning_rate lr_scheduler lr_warmup_steps adam_beta1 adam_beta2 adam_weight_decay max_grad_norm "
            "use_ema ema_max_decay ema_inv_gamma ema_power"
        ).split()
        training = {name: getattr(args, name) for name in card_flags}
        training.update(
            global_step=progress.global_step,
            images_seen=progress.global_step * total_batch_size,
            total_batch_size=total_batch_size,
            mixed_precision=accelerator.mixed_precision,
            hardware=f"{accelerator.num_processes} x {describe_device(accelerator.device)}",
            training_time=f"{progress.train_seconds / 60:.1f} minutes",
        )
        # The run's record, for re-rendering the card later (training/release.py); never pushed.
        (output_dir / "training.json").write_text(
            json.dumps({"dataset_name": args.dataset_name, "training": training}, indent=2)
        )
        card = render_model_card(
            pipeline,
            repo_id,
            dataset_name=args.dataset_name,
            samples_image=grid_path.relative_to(output_dir).as_posix(),
            training=training,
        )
        card.save(output_dir / "README.md")
        logger.info(f"saved the pipeline and its model card to {output_dir}")
        if args.push_to_hub:
            push(output_dir, repo_id, args.hub_private_repo)
    accelerator.end_training()


def save_sample_grid(
    accelerator: Accelerator,
    pipeline: DDPMMnistPipeline,
    output_dir: Path,
    step: int,
    args: argparse.Namespace,
) -> None:
    """Sample a fixed-seed grid from the pipeline, save it under `samples/` and log it to the trackers."""
    generator = torch.Generator(device=pipeline.device).manual_seed(args.seed)
    images = pipeline(
        batch_size=args.num_sample_images,
        generator=generator,
        num_inference_steps=args.ddpm_num_inference_steps,
        output_type="pil",
    ).images
    rows = int(math.sqrt(len(images)))
    grid = make_image_grid(images, rows=rows, cols=math.ceil(len(images) / rows))
    path = output_dir / "samples" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def describe_device(device: torch.device) -> str:
    """A human name for the training device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def push(output_dir: Path, repo_id: str, private: bool) -> None:
    """Upload the pipeline folder with card, samples and remote code (never checkpoints or logs); say how to retry."""
    try:
        commit_url = push_pipeline_folder(output_dir, repo_id, private=private)
    except Exception as e:  # whatever failed (network, Hub, quota), the folder is complete and can be pushed alone
        call = f"push_pipeline_folder({json.dumps(str(output_dir))}, {json.dumps(repo_id)}{', private=True' * private})"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"the upload to {repo_id} failed ({reason}); {output_dir} is intact. Retry the upload alone with: "
            f"python -c {shlex.quote('from ddpm_mnist.hub import push_pipeline_folder; ' + call)}"
        ) from e
    logger.info(f"pushed {output_dir} to {commit_url}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
