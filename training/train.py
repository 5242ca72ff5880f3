"""Train a DDPM on MNIST: `accelerate launch training/train.py --help`.

Top to bottom: the flags and their checks; the run's folder (its lock, its checkpoints, and the settings a resumed run
must keep); the loss of Algorithm 1 (Ho et al. 2020); the one decision to stop; sample grids; and `main`: data, model
and noise schedule, optimizer and EMA, resume, the loop, and the final pipeline folder with its model card.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import psutil
import pyarrow
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers import SchedulerMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from tqdm.auto import tqdm

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.data import (
    DEFAULT_DATASET,
    ImagePreprocessor,
    TrainingData,
    check_readable,
    class_count,
    load_image_stream,
)
from ddpm_mnist.errors import UsageError, WorkFailed, run_entry_point
from ddpm_mnist.evaluation import digit_grid
from ddpm_mnist.hardware import auto_mixed_precision, describe_device, idle_cores_warning
from ddpm_mnist.hub import check_push_access, push_training_run, save_training_run
from ddpm_mnist.schedulers import SCHEDULERS
from ddpm_mnist.unet_ddpm_mnist import PRESETS

logger = get_logger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
SETTINGS_FILE = "training_settings.json"  # in every checkpoint: what a resumed run must keep (see `run_settings`)
TIME_SCHEDULE_STEPS = 100_000  # the resolution of a learning-rate schedule over a time budget (see `make_optimizer`)
# The pipeline files of a finished run: what --overwrite_output_dir replaces, with the checkpoints, samples and logs.
RUN_FILES = (
    "model_index.json",
    "pipeline_ddpm_mnist.py",
    "unet",
    "scheduler",
    "README.md",
    "training.json",
    "checkpoints",
    "samples",
    "logs",
)


# ----------------------------------------------------------------------------------------------------------------------
# Flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, named as in diffusers' `train_unconditional.py`; `--config` reads them from JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="a JSON file of flag values (keys as the flags, without dashes)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=DEFAULT_DATASET, help="Hub dataset id, or a local folder/parquet")
    data.add_argument("--dataset_config_name", default=None, help="the dataset's config name")
    data.add_argument("--image_column", default="image", help="the column holding the images")
    data.add_argument("--label_column", default="label", help="the column of class ids (with --class_conditional)")
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
    model.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="start from this pipeline's UNet (a folder or Hub id; its config overrides --preset), for example to "
        "fine-tune a released unconditional model into a conditional one (the new class embedding starts at zero)",
    )
    model.add_argument(
        "--class_conditional",
        action="store_true",
        help="learn p(x|y) from --label_column, for classifier-free guidance (the UNet gets num_class_embeds)",
    )
    model.add_argument(
        "--class_dropout_prob",
        type=float,
        default=0.1,
        help="with --class_conditional, the share of labels replaced by the null class (Ho & Salimans 2022)",
    )
    model.add_argument(
        "--class_embedding_lr",
        type=float,
        default=None,
        help="with --class_conditional, the class embedding's peak learning rate (default --learning_rate); a larger "
        "one lets a fine-tuned model start using the labels it did not have",
    )
    model.add_argument("--ddpm_num_steps", type=int, default=1000, help="T, the number of diffusion steps")
    model.add_argument("--ddpm_beta_schedule", default="linear", help="the beta schedule (the paper's: linear)")
    model.add_argument(
        "--prediction_type", default="epsilon", choices=["epsilon", "sample", "v_prediction"], help="the target"
    )
    model.add_argument(
        "--variance_type", default="fixed_small", choices=["fixed_small", "fixed_large"], help="sigma_t^2 choice"
    )
    train = p.add_argument_group("optimization")
    train.add_argument("--output_dir", default="ddpm-mnist", help="pipeline, card, samples, checkpoints, logs")
    train.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace the run an existing --output_dir holds"
    )
    train.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and data order; each process's noise adds its rank"
    )
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
    train.add_argument(
        "--lr_scheduler",
        default="constant_with_warmup",
        help="a diffusers get_scheduler name; it runs over the step budget, or over --max_train_minutes given alone",
    )
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
    train.add_argument(
        "--mixed_precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: bf16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with AMX-BF16 or "
        "AVX512-BF16), else fp32; an accelerate config's fp16/bf16 also wins over auto",
    )
    io = p.add_argument_group("checkpoints, samples, logging, Hub")
    io.add_argument("--checkpointing_steps", type=int, default=1000, help="save a checkpoint every N steps")
    io.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    io.add_argument(
        "--resume_from_checkpoint", default=None, help="'latest', or a checkpoint folder in --output_dir/checkpoints"
    )
    io.add_argument("--save_images_steps", type=int, default=1000, help="save a grid of EMA samples every N steps")
    io.add_argument("--num_samples", type=int, default=16, help="digits in each sample grid")
    io.add_argument(
        "--scheduler", default="ddpm", choices=list(SCHEDULERS), help="the scheduler that draws the sample grids"
    )
    io.add_argument(
        "--num_inference_steps",
        "--ddpm_num_inference_steps",
        type=int,
        default=1000,
        help="sampling steps of the sample grids",
    )
    io.add_argument("--logger", default="tensorboard", help="an accelerate tracker (tensorboard, wandb, ...)")
    io.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    io.add_argument("--push_to_hub", action="store_true", help="upload the final pipeline to the Hub")
    io.add_argument("--hub_model_id", default=None, help="the Hub repo, user/name (default: output_dir's name)")
    io.add_argument("--hub_private_repo", action="store_true", help="create the Hub repo private")
    args = p.parse_args(argv)
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            p.error(f"--config {args.config} is not a readable JSON file ({e}).")
        unknown = sorted(set(config) - set(vars(args)))
        if unknown:
            p.error(f"{args.config} has unknown keys: {', '.join(unknown)}; use the flag names without dashes.")
        p.set_defaults(**config)
        args = p.parse_args(argv)  # flags given on the command line still win
    return args


# Flags that must be positive (> 0) or at least zero; None means "not set" for the optional ones.
POSITIVE = (
    "train_batch_size gradient_accumulation_steps checkpointing_steps save_images_steps num_samples "
    "num_inference_steps ddpm_num_steps learning_rate max_grad_norm max_train_steps num_epochs max_train_minutes "
    "snr_gamma checkpoints_total_limit shuffle_buffer_size class_embedding_lr"
).split()
NON_NEGATIVE = "lr_warmup_steps adam_weight_decay adam_epsilon dataloader_num_workers".split()


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags with one line each, before any data, model or output folder is touched."""
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be positive, got {value}.")
    for name in NON_NEGATIVE:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be at least 0, got {getattr(args, name)}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(args, name)}.")
    if not 0 <= args.class_dropout_prob < 1:
        raise UsageError(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.")
    if args.class_embedding_lr is not None and not args.class_conditional:
        raise UsageError("--class_embedding_lr sets the class embedding's learning rate; add --class_conditional.")
    if not 0 < args.ema_max_decay <= 1:
        raise UsageError(f"--ema_max_decay must be in (0, 1], got {args.ema_max_decay}.")
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
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; pass a folder (new, or one of your runs to resume).")
    if args.resume_from_checkpoint not in (None, "latest"):
        checkpoint = Path(args.resume_from_checkpoint)
        if not checkpoint.is_dir():
            raise UsageError(
                f"--resume_from_checkpoint {checkpoint} is not a folder; pass 'latest' or one of "
                f"{output_dir / 'checkpoints'}/checkpoint-N."
            )
        if checkpoint.resolve().parent != (output_dir / "checkpoints").resolve():
            raise UsageError(
                f"--resume_from_checkpoint {checkpoint} is not in {output_dir / 'checkpoints'}; checkpoints are read "
                "only from the run's own --output_dir: pass that run's folder as --output_dir."
            )
    holds = run_in(output_dir)
    if holds and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {output_dir} already holds {holds}; continue it with --resume_from_checkpoint latest, "
            "replace it with --overwrite_output_dir, or pass a new folder."
        )
    if args.push_to_hub:
        repo_id = args.hub_model_id or output_dir.name
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise UsageError(f"--hub_model_id is not a valid repo id ({e}); pass one like user/ddpm-mnist.") from e
        try:
            # The full user/name, so that the model card's code names the repo the push creates.
            args.hub_model_id = check_push_access(repo_id)
        except ValueError as e:
            raise UsageError(f"--push_to_hub needs a Hub token that can write to {repo_id}: {e}") from e


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
# The run's folder: one training at a time, checkpoints that are whole or absent, and what a resume must keep


def run_in(output_dir: Path) -> str | None:
    """What run `output_dir` holds, in words: a finished run's pipeline, or checkpoints; None if neither."""
    if (output_dir / "model_index.json").is_file():
        return "a finished run (model_index.json)"
    if find_checkpoint(output_dir / "checkpoints", "latest") is not None:
        return "a run's checkpoints"
    return None


class OutputDirLock:
    """An exclusive lock on `output_dir/.train.lock`, held for the whole run by the main process.

    `flock` locks belong to the open file: the kernel releases them when the process ends however it ends, so a killed
    run never leaves a stale lock behind.
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / ".train.lock"
        self.file = None

    def acquire(self) -> None:
        """Create the folder if needed and take the lock (once); a UsageError if another training holds it."""
        if self.file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # noqa: SIM115  (held open for the life of the run)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise UsageError(
                f"--output_dir {self.path.parent} is in use by another training ({holder}); wait for it to end, or "
                "pass another --output_dir."
            ) from e
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()


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
    """The settings a checkpoint records (`SETTINGS_FILE`), for `check_resume` to compare with a resumed run's.

    `num_classes` (None: unconditional) is that of the training data's labels: the UNet's `num_class_embeds`.
    """
    settings = {name: getattr(args, name) for name in RESUME_MUST_KEEP + RESUME_MAY_CHANGE if hasattr(args, name)}
    unet_config = model_config(args)
    if num_classes is not None:
        unet_config["num_class_embeds"] = num_classes
    else:  # a conditional run's config.json without --class_conditional trains an unconditional model
        unet_config.pop("num_class_embeds", None)
        settings.update(dict.fromkeys(CLASS_SETTINGS))
    return {**settings, "unet_config": unet_config, "num_processes": num_processes}


def check_resume(checkpoint: Path, settings: dict) -> list[str]:
    """Refuse to resume `checkpoint` with other settings than it was written with; return the allowed changes.

    Also refuses a checkpoint whose weights cannot be read (a truncated or corrupt safetensors file), before any model
    is built.
    """
    recorded = checkpoint / SETTINGS_FILE
    if not recorded.is_file():
        raise UsageError(f"{checkpoint} has no {SETTINGS_FILE}: it is not a checkpoint of this script; start anew.")
    saved = json.loads(recorded.read_text())
    differ = setting_changes(saved, settings, RESUME_MUST_KEEP)
    if differ:
        changes = "; ".join(differ)
        raise UsageError(
            f"cannot resume {checkpoint} with other settings ({changes}); resume with the checkpoint's settings, or "
            "start a new run in another --output_dir."
        )
    for weights in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise UsageError(
                f"{weights} is damaged ({e}); resume from an earlier checkpoint by path, or delete {checkpoint}."
            ) from e
    return setting_changes(saved, settings, RESUME_MAY_CHANGE)


def setting_changes(saved: dict, current: dict, names: list[str], prefix: str = "") -> list[str]:
    """`name: old -> new` for each of `names` whose value differs; a dict (the UNet config) key by key."""
    changes = []
    for name in names:
        old, new = saved.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(k for k in old.keys() | new.keys() if not k.startswith("_"))
            changes += setting_changes(old, new, keys, prefix=f"{prefix}{name}.")
        elif json.dumps(old) != json.dumps(new):
            changes.append(f"{prefix}{name}: {old} -> {new}")
    return changes


def find_checkpoint(checkpoints_dir: Path, resume_from: str) -> Path | None:
    """The checkpoint folder to resume from: the given one, or the highest complete `checkpoint-N` for latest."""
    if resume_from != "latest":
        return Path(resume_from)
    steps = [int(m[1]) for d in checkpoints_dir.glob("checkpoint-*") if (m := CHECKPOINT_PATTERN.match(d.name))]
    return checkpoints_dir / f"checkpoint-{max(steps)}" if steps else None


def save_checkpoint(
    accelerator: Accelerator, checkpoints_dir: Path, step: int, total_limit: int | None, settings: dict
) -> None:
    """`save_state` into a temporary folder, then rename it: `latest` only ever sees whole checkpoints.

    Old checkpoints beyond `total_limit` are renamed before they are deleted, for the same reason. A checkpoint of this
    step that exists already is the very state being saved (the run resumed from it and took no step), and is kept.
    """
    final, partial = checkpoints_dir / f"checkpoint-{step}", checkpoints_dir / f"tmp-checkpoint-{step}"
    if final.is_dir():
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # what a killed run may have left
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        os.replace(partial, final)
        kept = sorted(
            (d for d in checkpoints_dir.iterdir() if CHECKPOINT_PATTERN.match(d.name)),
            key=lambda d: int(d.name.split("-")[1]),
        )
        for old in kept[: -total_limit if total_limit else 0]:
            doomed = old.with_name(f"deleting-{old.name}")
            os.replace(old, doomed)
            shutil.rmtree(doomed)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def clear_output_dir(output_dir: Path) -> None:
    """--overwrite_output_dir: remove the previous run's pipeline, checkpoints, samples and logs (nothing else)."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----------------------------------------------------------------------------------------------------------------------
# The loss and the decision to stop


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


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMMnistScheduler,
    x_0: torch.Tensor,
    snr_gamma: float | None,
    class_labels: torch.Tensor | None = None,
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


def stop_reason(
    progress: TrainingProgress, mean_loss: float, signalled: bool, max_train_steps: int, args: argparse.Namespace
) -> str | None:
    """The one decision, taken after every optimizer step on numbers all processes share: why the run stops, or None.

    A loss that is no longer finite is a failure: the run ends without a checkpoint of the broken weights.
    """
    if not math.isfinite(mean_loss):
        raise WorkFailed(
            f"the loss became {mean_loss} at step {progress.global_step}; the last good checkpoint stays in "
            f"{Path(args.output_dir) / 'checkpoints'}. Lower --learning_rate or use --mixed_precision fp32, then "
            "resume."
        )
    if signalled:
        return "stopped on request"
    if progress.global_step >= max_train_steps:
        return "finished"
    if args.max_train_minutes is not None and progress.train_seconds >= 60 * args.max_train_minutes:
        return "finished (time budget spent)"
    return None


def resumed_batches(
    data: TrainingData, progress: TrainingProgress, batches_per_epoch: int, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batches (x_0, labels) epoch after epoch from where `progress` stands; an epoch's remainder waits for the next."""
    while True:
        for batch in islice(data.batches(progress.epoch, rank, world), progress.batches_in_epoch, batches_per_epoch):
            progress.batches_in_epoch += 1
            yield batch
        progress.epoch += 1
        progress.batches_in_epoch = 0


# ----------------------------------------------------------------------------------------------------------------------
# Sample grids


def grid_pipeline(unet: DDPMMnistUNet, scheduler: SchedulerMixin, ema: EMAModel | None) -> DDPMMnistPipeline:
    """A pipeline around a copy of the weights to sample and save: the EMA ones when there is an EMA."""
    unet = copy.deepcopy(unet).eval()
    if ema is not None:
        ema.copy_to(unet.parameters())
    pipeline = DDPMMnistPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_sample_grid(
    accelerator: Accelerator, pipeline: DDPMMnistPipeline, step: int, args: argparse.Namespace
) -> Path:
    """A fixed-seed grid of samples, `samples/step-N.png`, upscaled 4x (nearest) so that digits are readable.

    A class-conditional model draws one row per class (`--num_samples` rounded up to whole rows). Also sent to
    tensorboard. Returns the grid's path.
    """
    generator = torch.Generator(device=pipeline.device).manual_seed(args.seed)
    rows, cols = None, None
    if pipeline.is_class_conditional:
        rows = pipeline.unet.config.num_class_embeds
        cols = math.ceil(args.num_samples / rows)
    images = pipeline(
        batch_size=None if rows else args.num_samples,
        class_labels=torch.arange(rows).repeat_interleave(cols) if rows else None,
        generator=generator,
        num_inference_steps=args.num_inference_steps,
        output_type="pt",
    ).images
    grid = digit_grid(images, cols=cols, upscale=4)
    path = sample_grid_path(args, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HW")
    return path


def sample_grid_path(args: argparse.Namespace, step: int) -> Path:
    """Where the sample grid of `step` goes."""
    return Path(args.output_dir) / "samples" / f"step-{step:07d}.png"


# ----------------------------------------------------------------------------------------------------------------------
# The pieces main puts together


def resolve_mixed_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The mixed precision to train with, in accelerate's words ("no" for fp32), and why: an explicit choice, an
    accelerate config's fp16/bf16, or auto."""
    if requested != "auto":
        return requested.replace("fp32", "no"), "--mixed_precision"
    configured = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # set by `accelerate launch` from its config
    if configured in ("fp16", "bf16"):
        return configured, "the accelerate config"
    return auto_mixed_precision(device), f"automatic for {describe_device(device)}"


def load_training_data(
    args: argparse.Namespace, sample_size: int, num_processes: int
) -> tuple[TrainingData, int, int | None]:
    """The training split, checked readable (before any full scan), the optimizer steps of one epoch, and the number
    of classes of its labels with --class_conditional (None without).

    Every process takes the same whole number of optimizer steps per epoch; an epoch's remainder of examples waits for
    the next epoch's shuffle.
    """
    label_column = args.label_column if args.class_conditional else None
    stream = load_image_stream(args.dataset_name, "train", args.dataset_config_name, args.image_column, label_column)
    num_classes = class_count(stream, args.dataset_name) if args.class_conditional else None
    preprocess = ImagePreprocessor(sample_size, random_flip=args.random_flip)
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


def lr_over_time(args: argparse.Namespace) -> bool:
    """Whether the learning-rate schedule runs over the time budget (given, with no step or epoch budget)."""
    return args.max_train_minutes is not None and args.max_train_steps is None and args.num_epochs is None


def make_optimizer(
    unet: DDPMMnistUNet,
    args: argparse.Namespace,
    num_processes: int,
    max_train_steps: int,
    progress: TrainingProgress,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its learning-rate schedule (stepped once per process per optimizer step, as accelerate does).

    The schedule runs over the step budget, or, given a time budget and no step or epoch budget
    (`--max_train_minutes` alone), over the time budget: each step's learning rate is the named schedule's decay at
    the share of the time budget spent so far (`progress.train_seconds`), times its warm-up (in steps, as diffusers
    counts them), so that a decaying schedule reaches its end when the time does, however long the warm-up takes.
    A time budget changed on resume re-times the rest of the schedule, as a changed step budget does.
    """
    # With --class_embedding_lr, the class embedding is a second parameter group at its own peak rate.
    groups = [{"params": list(unet.parameters())}]
    if args.class_embedding_lr is not None:
        own = list(unet.class_embedding.parameters())
        rest = [p for p in unet.parameters() if all(p is not q for q in own)]
        groups = [{"params": rest}, {"params": own, "lr": args.class_embedding_lr}]
    optimizer = torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    warmup = args.lr_warmup_steps * num_processes
    if not lr_over_time(args):
        return optimizer, get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=warmup,
            num_training_steps=max_train_steps * num_processes,
        )

    # The named schedule's multipliers on a stand-in optimizer: its warm-up, and its decay over `TIME_SCHEDULE_STEPS`
    # steps, read at the share of the budget spent.
    def multipliers(num_warmup_steps: int) -> Callable[[int], float]:
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
        return get_scheduler(
            args.lr_scheduler,
            optimizer=stand_in,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_warmup_steps + TIME_SCHEDULE_STEPS,
        ).lr_lambdas[0]

    warm_up, decay = multipliers(warmup), multipliers(0)
    budget_seconds = 60 * args.max_train_minutes

    def multiplier(step: int) -> float:
        spent = min(progress.train_seconds / budget_seconds, 1.0)
        return (warm_up(step) if step < warmup else 1.0) * decay(round(spent * TIME_SCHEDULE_STEPS))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def progress_bar(args: argparse.Namespace, progress: TrainingProgress, max_train_steps: int, disable: bool) -> tqdm:
    """The training bar, against the budget that ends the run: seconds of the time budget when one is given (what is
    left then counts down to the time that stops the run), else optimizer steps."""
    if args.max_train_minutes is not None:
        budget = 60 * args.max_train_minutes
        return tqdm(total=budget, initial=min(progress.train_seconds, budget), unit="s", disable=disable,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")  # fmt: skip
    return tqdm(total=max_train_steps, initial=progress.global_step, unit="step", disable=disable)


class StopRequest:
    """SIGINT/SIGTERM set `requested`: the run finishes its step, writes a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum: int, frame: object) -> None:
        self.requested = True


def training_record(
    args: argparse.Namespace, progress: TrainingProgress, accelerator: Accelerator, total_batch_size: int
) -> dict:
    """The run's settings and numbers, for the model card and `training.json`."""
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


# ----------------------------------------------------------------------------------------------------------------------
# The run


def main(args: argparse.Namespace) -> None:
    check_args(args)
    # `datasets` hands Arrow Python file objects, and Arrow's CPU thread pool can then deadlock at exit or in
    # `to_batches` (apache/arrow#45214, #50482); one Arrow thread avoids it and costs nothing here. With that, the 5 s
    # `datasets` sleeps whenever a stream ends (its own guard for the same issue) would only stall start-up and every
    # epoch's end, so it is turned off.
    pyarrow.set_cpu_count(1)
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    output_dir, checkpoints_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator will read it
    # One training per folder: a folder another training holds is refused first, before any checkpoint or data is read.
    lock = OutputDirLock(output_dir)  # held (open) until main returns
    if state.is_main_process and output_dir.is_dir():
        lock.acquire()
    mixed_precision, why = resolve_mixed_precision(args.mixed_precision, state.device)
    data, steps_per_epoch, num_classes = load_training_data(
        args, model_config(args).get("sample_size", 28), state.num_processes
    )
    settings = run_settings(args, state.num_processes, num_classes)
    resume_path = find_checkpoint(checkpoints_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    changes = check_resume(resume_path, settings) if resume_path else []
    max_train_steps = args.max_train_steps or (args.num_epochs or 100) * steps_per_epoch

    # Only now, with every input checked, does a new output folder come into being (and its lock).
    if state.is_main_process:
        lock.acquire()
        if args.overwrite_output_dir and resume_path is None:
            clear_output_dir(output_dir)
    state.wait_for_everyone()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logger.info(f"mixed precision: {'fp32' if mixed_precision == 'no' else mixed_precision} ({why})")
    if state.device.type == "cpu":
        # Physical cores, at most as many as this process may run on (on Linux, a container's share of them).
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cores = min(psutil.cpu_count(logical=False) or 1, allowed)
        if idle := idle_cores_warning(torch.get_num_threads(), state.num_processes, cores):
            logger.warning(idle)
    for change in changes:
        logger.info(f"resuming with a changed setting, {change}")

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
    # From here on each process draws its own timesteps, noise and dropout (seed + rank). Checkpoints keep each
    # process's random state, so a resumed run draws what the uninterrupted one would have.
    set_seed(args.seed, device_specific=True)

    # Optimizer, learning-rate schedule and EMA of the weights (the released weights are the EMA). The data is not
    # prepared: accelerate would shard the already-split stream a second time.
    progress = TrainingProgress()
    optimizer, lr_scheduler = make_optimizer(unet, args, accelerator.num_processes, max_train_steps, progress)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    lr_budget = f"{args.max_train_minutes:g} minutes" if lr_over_time(args) else f"{max_train_steps} steps"
    logger.info(f"learning-rate schedule: {args.lr_scheduler} over {lr_budget}")
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
    accelerator.register_for_checkpointing(progress)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))  # weights, optimizer, lr, EMA, progress and every process's RNG
        logger.info(f"resumed from {resume_path} at step {progress.global_step}")
        if lr_over_time(args):
            logger.warning(
                f"the learning rate follows the clock (--max_train_minutes alone): it continues from the recorded "
                f"{progress.train_seconds / 60:.1f} minutes, but the steps ahead take other times than they would "
                "have, so this run will not equal an uninterrupted one bit for bit; give --max_train_steps for that."
            )
    elif args.resume_from_checkpoint:
        logger.info(f"no checkpoint in {checkpoints_dir}; starting from scratch")

    if accelerator.is_main_process:
        accelerator.init_trackers("ddpm-mnist", config={k: v for k, v in vars(args).items() if v is not None})
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{data.num_examples} examples, {sum(p.numel() for p in unet.parameters()):,} parameters, {max_train_steps} "
        f"steps of {total_batch_size} images ({accelerator.num_processes} processes, {steps_per_epoch} steps per epoch)"
    )
    stop = StopRequest()
    batches_per_epoch = steps_per_epoch * args.gradient_accumulation_steps
    batches = resumed_batches(data, progress, batches_per_epoch, accelerator.process_index, accelerator.num_processes)
    bar = progress_bar(args, progress, max_train_steps, disable=not accelerator.is_local_main_process)
    start_time, start_step, last_time = time.time(), progress.global_step, time.time()
    reason = "finished" if progress.global_step >= max_train_steps else None
    unet.train()
    with bar:
        while reason is None:
            # One optimizer step: gradient_accumulation_steps batches of Algorithm 1.
            for x_0, class_labels in islice(batches, args.gradient_accumulation_steps):
                with accelerator.accumulate(unet):
                    if class_labels is not None:
                        class_labels = class_labels.to(accelerator.device)
                    x_0 = x_0.to(accelerator.device)
                    loss = diffusion_loss(
                        unet, noise_scheduler, x_0, args.snr_gamma, class_labels, args.class_dropout_prob, num_classes
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            progress.global_step += 1
            # One collective per step: the mean loss, whether any process was signalled, and the main process's clock
            # (the others send 0), so that every process takes the same decision and records the same time.
            now = time.time()
            seconds = progress.train_seconds + now - last_time if accelerator.is_main_process else 0.0
            shared = accelerator.reduce(torch.tensor([loss.item(), stop.requested, seconds], device=accelerator.device))
            mean_loss, stop.requested = shared[0].item() / accelerator.num_processes, bool(shared[1])
            progress.train_seconds, last_time = shared[2].item(), now
            reason = stop_reason(progress, mean_loss, stop.requested, max_train_steps, args)

            images_per_second = (progress.global_step - start_step) * total_batch_size / (now - start_time)
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm.item()}
            logs.update(images_per_second=images_per_second, **({"ema_decay": ema.cur_decay_value} if ema else {}))
            accelerator.log(logs, step=progress.global_step)
            bar.set_postfix(
                step=f"{progress.global_step}/{max_train_steps}",
                loss=f"{mean_loss:.4f}",
                lr=f"{logs['lr']:.2e}",
                img_s=f"{images_per_second:.0f}",
                refresh=False,  # the update below draws the bar once per step
            )
            bar.update(progress.train_seconds - bar.n if args.max_train_minutes is not None else 1)
            if progress.global_step % args.checkpointing_steps == 0 or reason is not None:
                # Also at the end of every run, so that it can be continued with a larger budget.
                save_checkpoint(
                    accelerator, checkpoints_dir, progress.global_step, args.checkpoints_total_limit, settings
                )
            if progress.global_step % args.save_images_steps == 0 and accelerator.is_main_process:
                pipeline = grid_pipeline(accelerator.unwrap_model(unet), sample_scheduler, ema)
                save_sample_grid(accelerator, pipeline, progress.global_step, args)

    if reason == "stopped on request":
        logger.info(f"stopped at step {progress.global_step} on request; resume with --resume_from_checkpoint latest")
    elif accelerator.is_main_process:
        # The pipeline folder: EMA weights (safetensors), scheduler, a sample grid and the model card.
        pipeline = grid_pipeline(accelerator.unwrap_model(unet), sample_scheduler, ema)
        grid_path = sample_grid_path(args, progress.global_step)
        if not grid_path.exists():  # the last step may have drawn its grid already
            save_sample_grid(accelerator, pipeline, progress.global_step, args)
        pipeline.scheduler = noise_scheduler
        repo_id = args.hub_model_id or output_dir.name
        save_training_run(
            pipeline,
            output_dir,
            repo_id,
            dataset_name=args.dataset_name,
            training=training_record(args, progress, accelerator, total_batch_size),
            samples_image=grid_path.relative_to(output_dir).as_posix(),
        )
        logger.info(f"{reason} at step {progress.global_step}: saved the pipeline and its model card to {output_dir}")
        if args.push_to_hub:
            logger.info(f"pushed {output_dir} to {push_training_run(output_dir, repo_id, args.hub_private_repo)}")
    accelerator.end_training()


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "train.py")
