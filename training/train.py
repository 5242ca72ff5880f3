"""Train a DDPM on MNIST: `accelerate launch training/train.py --help`.

Top to bottom: the flags and their checks; the settings a resumed run must keep; data; the loss of Algorithm 1 (Ho et
al. 2020); the optimizer; sample grids; and `main`: data, model and noise schedule, the step count (a time budget given
alone becomes one, measured once at the start and kept on resume), optimizer and EMA, resume, the loop, and the final
pipeline folder with its model card. The run folder's machinery (lock, checkpoints, resume check, stop, progress) is
`ddpm_mnist.training_utils`.
"""

from __future__ import annotations

import argparse
import logging
import math
from functools import partial
from itertools import islice
from pathlib import Path

import datasets
import pyarrow
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env, set_seed
from diffusers.optimization import get_scheduler

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.data import (
    DEFAULT_DATASET,
    ImagePreprocessor,
    TrainingData,
    check_readable,
    class_count,
    load_image_stream,
)
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
    min_snr_weight,
    parse_with_config,
    progress_bar,
    recorded_settings,
    resumed_batches,
    save_checkpoint,
    save_run,
    stop_reason,
    time_budget_steps,
)
from ddpm_mnist.unet_ddpm_mnist import PRESETS

logger = get_logger(__name__)
NAN_FIX = "lower --learning_rate or use --mixed_precision fp32, then resume from the last good checkpoint in"


# ----------------------------------------------------------------------------------------------------------------------
# Flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, named as in diffusers' `train_unconditional.py`; `--config` reads them from JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data").add_argument
    data("--dataset_name", default=DEFAULT_DATASET, help="Hub dataset id, or a local folder/parquet")
    data("--dataset_config_name", help="the dataset's config name")
    data("--image_column", default="image", help="the column holding the images")
    data("--label_column", default="label", help="the column of class ids (with --class_conditional)")
    data("--random_flip", action="store_true", help="random horizontal flips (wrong for digits)")
    data("--shuffle_buffer_size", type=int, default=10_000, help="examples in the shuffle buffer")
    data("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")
    data("--decode_once", action="store_true", help="decode every image once into memory (MNIST: 47 MB) and "
         "shuffle exactly each epoch, instead of streaming through the shuffle buffer: far faster")  # fmt: skip
    model = p.add_argument_group("model and noise schedule").add_argument
    model("--preset", default="mnist", choices=sorted(PRESETS), help="a DDPMMnistUNet preset")
    model("--model_config_name_or_path", help="a UNet config.json (overrides --preset)")
    model("--pretrained_model_name_or_path", help="start from this pipeline's UNet (a folder or Hub id; its config "
          "overrides --preset), for example to fine-tune an unconditional model into a conditional one")  # fmt: skip
    model("--class_conditional", action="store_true", help="learn p(x|y) from --label_column, for classifier-free "
          "guidance (a class embedding that a pretrained UNet lacks starts at zero)")  # fmt: skip
    model("--class_dropout_prob", type=float, default=0.1, help="the share of labels replaced by the null class")
    model("--class_embedding_lr", type=float, help="the class embedding's peak learning rate (default --learning_rate)")
    model("--ddpm_num_steps", type=int, default=1000, help="T, the number of diffusion steps")
    model("--ddpm_beta_schedule", default="linear", help="the beta schedule (the paper's: linear)")
    model("--prediction_type", default="epsilon", choices=["epsilon", "sample", "v_prediction"], help="the target")
    model("--variance_type", default="fixed_small", choices=["fixed_small", "fixed_large"], help="sigma_t^2 choice")
    train = p.add_argument_group("optimization").add_argument
    train("--output_dir", default="ddpm-mnist", help="pipeline, card, samples, checkpoints, logs")
    train("--overwrite_output_dir", action="store_true", help="replace the run an existing --output_dir holds")
    train("--seed", type=int, default=0, help="seed of the weights and data order; each process's noise adds its rank")
    train("--train_batch_size", type=int, default=128, help="batch size per process")
    train("--max_train_steps", type=int, help="optimizer steps (overrides --num_epochs)")
    train("--max_train_minutes", type=float, help="a time budget. Alone, it becomes the optimizer steps that fit, "
          "measured at the start and kept on resume; beside a step or epoch budget, it stops the run")  # fmt: skip
    train("--num_epochs", type=int, help="passes over the data (default 100)")
    train("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    train("--snr_gamma", type=float, help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual)")
    add_optimizer_flags(train, learning_rate=2e-4, lr_warmup_steps=5000, ema_max_decay=0.9999)
    io = p.add_argument_group("checkpoints, samples, logging, Hub").add_argument
    add_run_flags(io)
    io("--scheduler", default="ddpm", choices=list(SCHEDULERS), help="scheduler of the grids and the card's code")
    io("--num_inference_steps", "--ddpm_num_inference_steps", type=int, default=1000, help="steps of the sample grids")
    return parse_with_config(p, argv)


# Each numeric flag's range, in words, as a test, and the flags it holds for; None means "not set" for optional ones.
RANGES = {
    "positive": (
        lambda v: v > 0,
        "train_batch_size gradient_accumulation_steps checkpointing_steps save_images_steps num_samples "
        "num_inference_steps ddpm_num_steps learning_rate max_grad_norm max_train_steps num_epochs max_train_minutes "
        "snr_gamma checkpoints_total_limit shuffle_buffer_size class_embedding_lr",
    ),
    "at least 0": (lambda v: v >= 0, "lr_warmup_steps adam_weight_decay adam_epsilon dataloader_num_workers"),
    "in [0, 1)": (lambda v: 0 <= v < 1, "adam_beta1 adam_beta2 class_dropout_prob"),
    "in (0, 1]": (lambda v: 0 < v <= 1, "ema_max_decay"),
}


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags with one line each, before any data, model or output folder is touched."""
    with usage_errors(*" ".join(names for _, names in RANGES.values()).split()):
        check_ranges(vars(args), RANGES)
    if args.class_embedding_lr is not None and not args.class_conditional:
        raise UsageError("--class_embedding_lr sets the class embedding's learning rate; add --class_conditional.")
    if args.num_inference_steps > args.ddpm_num_steps:
        raise UsageError(
            f"--num_inference_steps {args.num_inference_steps} exceeds the {args.ddpm_num_steps} diffusion steps "
            "(--ddpm_num_steps); sample with at most that many."
        )
    channels = {model_config(args).get(key, 1) for key in ("in_channels", "out_channels")}  # the UNet's default: 1
    if channels != {1}:
        source = args.model_config_name_or_path or f"--preset {args.preset}"
        raise UsageError(
            f"{source} is a model of {max(channels)}-channel images, and MNIST digits have one channel; use "
            "--preset mnist (32x32), mnist-small or tiny."
        )
    with usage_errors("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "hub_model_id", "push_to_hub"):
        check_run_folder(Path(args.output_dir), args.resume_from_checkpoint, args.overwrite_output_dir)
        if args.push_to_hub:  # the full user/name, so that the model card's code names the repo the push creates
            args.hub_model_id = check_hub_target(args.hub_model_id or Path(args.output_dir).name)


def model_config(args: argparse.Namespace) -> dict:
    """The UNet's config: --pretrained_model_name_or_path's, the --model_config_name_or_path file, or the --preset."""
    if args.pretrained_model_name_or_path is not None:
        try:
            return dict(DDPMMnistUNet.load_config(args.pretrained_model_name_or_path, subfolder="unet"))
        except (OSError, ValueError) as e:
            raise UsageError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is not a pipeline with a unet/ "
                "folder; pass a trained run's folder or a released model, such as pretrained/ddpm-mnist-small."
            ) from e
    if args.model_config_name_or_path is None:
        return dict(PRESETS[args.preset])
    path = Path(args.model_config_name_or_path)
    config_file = path / "config.json" if path.is_dir() else path
    try:
        if not config_file.is_file():
            raise FileNotFoundError(config_file)
        return dict(DDPMMnistUNet.load_config(config_file))
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--model_config_name_or_path {path} is not a readable UNet config.json; pass the path of one, such as "
            "training/recipes/mnist-small-nodrop.json."
        ) from e


def load_pretrained_weights(unet: DDPMMnistUNet, name_or_path: str) -> None:
    """Copy a pipeline's UNet weights into `unet`, whose config is that UNet's (see `model_config`).

    A class embedding the pretrained UNet lacks starts at zero: the conditional model then begins as exactly the
    unconditional one, for every label, and learns what each class adds.
    """
    pretrained = DDPMMnistUNet.from_pretrained(name_or_path, subfolder="unet")
    missing, unexpected = unet.load_state_dict(pretrained.state_dict(), strict=False)
    if unexpected:
        raise UsageError(
            f"--pretrained_model_name_or_path {name_or_path} is a class-conditional model; continue it with "
            "--class_conditional."
        )
    if missing:  # only the class embedding: every other key comes from the same config
        torch.nn.init.zeros_(unet.class_embedding.weight)


# ----------------------------------------------------------------------------------------------------------------------
# What a resumed run must keep


# Settings a resumed run must share with its checkpoint (else the resumed run is not the run that was checkpointed, or
# the checkpoint's optimizer and EMA states silently override the new values), and settings that may change, logged.
RESUME_MUST_KEEP = (
    "unet_config ddpm_num_steps ddpm_beta_schedule prediction_type variance_type train_batch_size "
    "gradient_accumulation_steps num_processes seed learning_rate lr_scheduler lr_warmup_steps adam_beta1 adam_beta2 "
    "adam_weight_decay adam_epsilon snr_gamma use_ema ema_max_decay ema_inv_gamma ema_power class_dropout_prob "
    "pretrained_model_name_or_path class_embedding_lr"
).split()
RESUME_MAY_CHANGE = (
    "dataset_name label_column decode_once random_flip max_train_steps num_epochs max_train_minutes mixed_precision"
).split()
# Recorded for a class-conditional run only.
CLASS_SETTINGS = ("class_dropout_prob", "label_column", "class_embedding_lr")


def run_settings(args: argparse.Namespace, num_processes: int, num_classes: int | None = None) -> dict:
    """The settings a checkpoint records, for `check_resume` to compare with a resumed run's.

    `num_classes` (None: unconditional) is that of the training data's labels: the UNet's `num_class_embeds`. The
    step count a time budget alone became, `planned_train_steps`, is added once it is known (see `step_budget`).
    """
    settings = {name: getattr(args, name) for name in RESUME_MUST_KEEP + RESUME_MAY_CHANGE if hasattr(args, name)}
    unet_config = model_config(args)
    if num_classes is not None:
        unet_config["num_class_embeds"] = num_classes
    else:  # a conditional run's config.json without --class_conditional trains an unconditional model
        unet_config.pop("num_class_embeds", None)
        settings.update(dict.fromkeys(CLASS_SETTINGS))
    return {**settings, "unet_config": unet_config, "num_processes": num_processes, "planned_train_steps": None}


def time_budget_alone(args: argparse.Namespace) -> bool:
    """Whether --max_train_minutes is the only budget: it then becomes a step count (see `step_budget`)."""
    return args.max_train_minutes is not None and args.max_train_steps is None and args.num_epochs is None


def step_budget(args: argparse.Namespace, steps_per_epoch: int, resume_path: Path | None) -> int | None:
    """The run's optimizer steps: --max_train_steps, else --num_epochs (default 100) epochs, else those that
    --max_train_minutes alone became in the checkpoint resumed with the same budget; None while still to measure."""
    if not time_budget_alone(args):
        return args.max_train_steps or (args.num_epochs or 100) * steps_per_epoch
    recorded = recorded_settings(resume_path) if resume_path else {}
    return recorded.get("planned_train_steps") if recorded.get("max_train_minutes") == args.max_train_minutes else None


# ----------------------------------------------------------------------------------------------------------------------
# Data, loss, optimizer


def load_training_data(args: argparse.Namespace, num_processes: int) -> tuple[TrainingData, int, int | None]:
    """The training split, checked readable (before any full scan), the optimizer steps of one epoch, and the number
    of classes of its labels with --class_conditional (None without).

    Every process takes the same whole number of optimizer steps per epoch; an epoch's remainder of examples waits for
    the next epoch's shuffle.
    """
    label_column = args.label_column if args.class_conditional else None
    preprocess = ImagePreprocessor(model_config(args).get("sample_size", 28), random_flip=args.random_flip)
    with usage_errors("dataset_name", "image_column", "label_column"):
        stream = load_image_stream(
            args.dataset_name, "train", args.dataset_config_name, args.image_column, label_column
        )
        num_classes = class_count(stream, args.dataset_name) if args.class_conditional else None
        check_readable(stream, preprocess, args.dataset_name)
    data = TrainingData(
        stream,
        preprocess,
        batch_size=args.train_batch_size,
        seed=args.seed,
        decode_once=args.decode_once,
        shuffle_buffer_size=args.shuffle_buffer_size,
        num_workers=args.dataloader_num_workers,
    )
    steps_per_epoch = data.num_examples // num_processes // args.train_batch_size // args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise UsageError(
            f"{data.num_examples} examples over {num_processes} processes give no full batch of "
            f"{args.train_batch_size} x {args.gradient_accumulation_steps}; lower --train_batch_size."
        )
    return data, steps_per_epoch, num_classes


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMMnistScheduler,
    x_0: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    snr_gamma: float | None = None,
    class_dropout_prob: float = 0.0,
    null_class_label: int | None = None,
) -> torch.Tensor:
    """L_simple (eq. 14) of a batch, or its min-SNR-weighted form: Algorithm 1's loss.

    t ~ U{0..T-1} and eps ~ N(0, I) come from this process's own generator (seeded with the seed plus the rank), then
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4), and the network regresses the target of the scheduler's
    prediction type: eps, x_0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0. With `class_labels` the network sees
    each image's class, replaced by `null_class_label` with probability `class_dropout_prob`, so that one network learns
    both eps(x_t, y) and eps(x_t) for classifier-free guidance (Ho & Salimans 2022, Algorithm 1).
    """
    prediction_type = noise_scheduler.config.prediction_type
    eps = torch.randn_like(x_0)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x_0.shape[0],), device=x_0.device)
    if class_labels is not None:
        dropped = torch.rand(x_0.shape[0], device=x_0.device) < class_dropout_prob
        class_labels = class_labels.masked_fill(dropped, null_class_label)
    x_t = noise_scheduler.add_noise(x_0, eps, t)
    target = {"epsilon": eps, "sample": x_0}.get(prediction_type)
    if target is None:
        target = noise_scheduler.get_velocity(x_0, eps, t)
    prediction = unet(x_t, t, class_labels).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        loss = loss * min_snr_weight(noise_scheduler, t, snr_gamma, prediction_type)
    return loss.mean()


def make_optimizer(
    unet: DDPMMnistUNet, args: argparse.Namespace, num_processes: int, max_train_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its learning-rate schedule over the run's steps (stepped once per process per optimizer step, as
    accelerate does). With --class_embedding_lr, the class embedding is a second parameter group at its own peak."""
    groups = [{"params": list(unet.parameters())}]
    if args.class_embedding_lr is not None:
        own = list(unet.class_embedding.parameters())
        rest = [p for p in unet.parameters() if all(p is not q for q in own)]
        groups = [{"params": rest}, {"params": own, "lr": args.class_embedding_lr}]
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer = torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    warmup, total = args.lr_warmup_steps * num_processes, max_train_steps * num_processes
    return optimizer, get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)


# ----------------------------------------------------------------------------------------------------------------------
# Sample grids, the record of the run, the machine


def sample_grids(args: argparse.Namespace) -> SampleGrids:
    """The run's sample grids, as --num_samples, --num_inference_steps and --seed draw them."""
    return SampleGrids(Path(args.output_dir), args.num_samples, args.num_inference_steps, args.seed)


def save_pipeline(
    accelerator: Accelerator,
    pipeline: DDPMMnistPipeline,
    noise_scheduler: DDPMMnistScheduler,
    progress: TrainingProgress,
    args: argparse.Namespace,
) -> None:
    """The pipeline folder of the run: EMA weights with the noise scheduler, the last step's sample grid, the model
    card (its code drawing as the grids did) and `training.json`; then the push, with --push_to_hub."""
    repo_id = args.hub_model_id or Path(args.output_dir).name
    save_run(
        accelerator, pipeline, sample_grids(args), progress.global_step, repo_id, dataset_name=args.dataset_name,
        training=training_record(args, progress, accelerator), scheduler=noise_scheduler,
        samples_scheduler=(args.scheduler, args.num_inference_steps), push_to_hub=args.push_to_hub,
        hub_private_repo=args.hub_private_repo,
    )  # fmt: skip


def training_record(args: argparse.Namespace, progress: TrainingProgress, accelerator: Accelerator) -> dict:
    """The run's settings and numbers, for the model card and `training.json`."""
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    card_flags = (
        "pretrained_model_name_or_path learning_rate class_embedding_lr lr_scheduler lr_warmup_steps adam_beta1 "
        "adam_beta2 adam_weight_decay max_grad_norm use_ema ema_max_decay ema_inv_gamma ema_power"
    ).split()
    return {
        **{name: getattr(args, name) for name in card_flags},
        "global_step": progress.global_step,
        "images_seen": progress.global_step * total_batch_size,
        "total_batch_size": total_batch_size,
        "mixed_precision": "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision,
        "hardware": f"{accelerator.num_processes} x {describe_device(accelerator.device)}",
        "training_time": f"{progress.train_seconds / 60:.1f} minutes",
    }


def configure_libraries() -> None:
    """Logging, and the Arrow and `datasets` settings that keep streaming from stalling.

    `datasets` hands Arrow Python file objects, and Arrow's CPU thread pool can then deadlock at exit or in
    `to_batches` (apache/arrow#45214, #50482); one Arrow thread avoids it and costs nothing here. With that, the 5 s
    `datasets` sleeps whenever a stream ends (its own guard for the same issue) would only stall start-up and every
    epoch's end, so it is turned off.
    """
    pyarrow.set_cpu_count(1)
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)


# ----------------------------------------------------------------------------------------------------------------------
# The run


def main(args: argparse.Namespace) -> None:
    """Train, top to bottom: inputs checked, data, model, optimizer and EMA, resume, the loop, the pipeline folder."""
    check_args(args)
    configure_libraries()
    output_dir, checkpoints_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"
    accumulation = args.gradient_accumulation_steps  # batches per optimizer step
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator will read it
    # One training per folder: a folder another training holds is refused first, before any checkpoint or data is read.
    lock = OutputDirLock(output_dir)  # held (open) until main returns
    with usage_errors("output_dir"):
        if state.is_main_process and output_dir.is_dir():
            lock.acquire()
    data, steps_per_epoch, num_classes = load_training_data(args, state.num_processes)
    settings = run_settings(args, state.num_processes, num_classes)
    resume_path = find_checkpoint(checkpoints_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    with usage_errors("output_dir"):
        max_train_steps = step_budget(args, steps_per_epoch, resume_path)  # None: measured once the model is built
        claim_run_folder(
            state, lock, resume_path, settings, RESUME_MUST_KEEP, RESUME_MAY_CHANGE, args.overwrite_output_dir
        )
    accelerator = make_accelerator(output_dir, args.logging_dir, args.mixed_precision, accumulation, args.logger)

    # Model (identical on every process: one seed) and the forward process q(x_t | x_0) of the paper.
    set_seed(args.seed)
    unet = DDPMMnistUNet.from_config(settings["unet_config"])
    if args.pretrained_model_name_or_path is not None and resume_path is None:
        load_pretrained_weights(unet, args.pretrained_model_name_or_path)
    noise_scheduler = DDPMMnistScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        variance_type=args.variance_type,
    )
    # The sample grids use --scheduler (the pipeline's DDPM, Algorithm 2, by default) on the same schedule.
    sample_scheduler = SCHEDULERS[args.scheduler].from_config(noise_scheduler.config)
    # From here on each process draws its own timesteps, noise and dropout (seed + rank); checkpoints keep its RNG.
    set_seed(args.seed, device_specific=True)
    unet = accelerator.prepare(unet).train()
    loss_settings = dict(snr_gamma=args.snr_gamma, class_dropout_prob=args.class_dropout_prob)
    loss_fn = partial(diffusion_loss, unet, noise_scheduler, **loss_settings, null_class_label=num_classes)
    # The data is not prepared: accelerate would shard the already-split stream a second time.
    shard = steps_per_epoch * accumulation, accelerator.process_index, accelerator.num_processes, accelerator.device
    if max_train_steps is None:  # --max_train_minutes alone: the steps it fits, measured now and kept in checkpoints
        trial = resumed_batches(data, TrainingProgress(), *shard)
        max_train_steps = time_budget_steps(accelerator, args.max_train_minutes, unet, loss_fn, trial, accumulation)
    settings["planned_train_steps"] = max_train_steps if time_budget_alone(args) else None

    # Optimizer, learning-rate schedule and EMA of the weights (the released weights are the EMA).
    optimizer, lr_scheduler = make_optimizer(accelerator.unwrap_model(unet), args, state.num_processes, max_train_steps)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    logger.info(f"learning-rate schedule: {args.lr_scheduler} over {max_train_steps} steps")
    ema = make_ema(accelerator.unwrap_model(unet), args)
    progress = TrainingProgress()  # EMA first: checkpoints hold them as custom_checkpoint_0.pkl and _1.pkl
    accelerator.register_for_checkpointing(*[saved for saved in (ema, progress) if saved is not None])
    if resume_path is not None:
        accelerator.load_state(str(resume_path))  # weights, optimizer, lr, EMA, progress and every process's RNG
        logger.info(f"resumed from {resume_path} at step {progress.global_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"no checkpoint in {checkpoints_dir}; starting from scratch")

    accelerator.init_trackers("ddpm-mnist", config={k: v for k, v in vars(args).items() if v is not None})
    total_batch_size = args.train_batch_size * accelerator.num_processes * accumulation
    logger.info(
        f"{data.num_examples} examples, {sum(p.numel() for p in unet.parameters()):,} parameters, {max_train_steps} "
        f"steps of {total_batch_size} images ({accelerator.num_processes} processes, {steps_per_epoch} steps per epoch)"
    )
    # --max_train_minutes beside a step or epoch budget limits the training time (alone, it became the step count).
    time_limit = None if args.max_train_minutes is None or time_budget_alone(args) else 60 * args.max_train_minutes
    stop, batches = StopRequest(), resumed_batches(data, progress, *shard)
    reason = "finished" if progress.global_step >= max_train_steps else None
    progress.start_clock()
    with progress_bar(progress, max_train_steps, time_limit, disable=not accelerator.is_local_main_process) as bar:
        while reason is None:
            # One optimizer step: `accumulation` batches of Algorithm 1.
            for batch in islice(batches, accumulation):
                with accelerator.accumulate(unet):
                    loss = loss_fn(*batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            mean_loss = progress.end_step(accelerator, loss.item(), stop)
            if not math.isfinite(mean_loss):  # a failure: the run ends without a checkpoint of the broken weights
                raise WorkFailed(
                    f"the loss became {mean_loss} at step {progress.global_step}; {NAN_FIX} {checkpoints_dir}."
                )
            reason = stop_reason(progress, stop.requested, max_train_steps, time_limit)

            images_per_second = progress.steps_per_second() * total_batch_size
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm.item()}
            logs.update(images_per_second=images_per_second, **({"ema_decay": ema.cur_decay_value} if ema else {}))
            accelerator.log(logs, step=progress.global_step)
            left = {"left": bar.format_interval(max(0, time_limit - progress.train_seconds))} if time_limit else {}
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_second:.0f}", **left,
                            refresh=False)  # fmt: skip
            bar.update()  # draws the bar, once per step
            if progress.global_step % args.checkpointing_steps == 0 or reason is not None:
                # Also at the end of every run, so that it can be continued with a larger budget.
                save_checkpoint(
                    accelerator, checkpoints_dir, progress.global_step, args.checkpoints_total_limit, settings
                )
            if progress.global_step % args.save_images_steps == 0 and accelerator.is_main_process:
                pipeline = grid_pipeline(accelerator.unwrap_model(unet), sample_scheduler, ema)
                sample_grids(args).save(accelerator, pipeline, progress.global_step)

    if reason == "stopped on request":
        logger.info(f"stopped at step {progress.global_step} on request; resume with --resume_from_checkpoint latest")
    elif accelerator.is_main_process:
        pipeline = grid_pipeline(accelerator.unwrap_model(unet), sample_scheduler, ema)
        save_pipeline(accelerator, pipeline, noise_scheduler, progress, args)
        logger.info(f"{reason} at step {progress.global_step}: saved the pipeline and its model card to {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "train.py")
