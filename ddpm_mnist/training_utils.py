"""What training scripts share (diffusers' name for such a module): the run folder, its Accelerator, its progress.

A run trains in one folder (`output_dir`) that ends up holding its pipeline, `checkpoints/`, `samples/` and `logs/`.
These pieces keep that folder sound for any accelerate script, whatever its flags: one training per folder, only whole
checkpoints, each with the settings a resume must keep, an exact resume of the data order, and a clean stop after a
whole step. It needs the package's `train` extra (accelerate). Bad input is refused with a ValueError that names the
arguments (`output_dir`); an entry point turns those names into its flags with `ddpm_mnist.errors.usage_errors`.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast
from diffusers import SchedulerMixin
from diffusers.training_utils import EMAModel, compute_snr
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from tqdm.auto import tqdm

from .hardware import auto_mixed_precision, describe_device, idle_cores_warning
from .hub import check_push_access, push_training_run, save_training_run
from .image_utils import SAMPLE_GRID_UPSCALE, digit_grid
from .pipeline_ddpm_mnist import DDPMMnistPipeline

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
SETTINGS_FILE = "training_settings.json"  # in every checkpoint: the run's settings, for `check_resume`
# What a run writes into its folder: the pipeline and its card (`ddpm_mnist.hub.save_training_run`), checkpoints,
# sample grids and logs; what `clear_output_dir` removes.
RUN_FILES = tuple(
    "model_index.json pipeline_ddpm_mnist.py remote_code_utils.py unet scheduler README.md training.json checkpoints "
    "samples logs".split()
)
MEASURE_SECONDS = 10.0  # the longest `time_budget_steps` times its trial steps (a twentieth of a budget under 200 s)


def make_accelerator(
    output_dir: Path,
    logging_dir: str = "logs",
    mixed_precision: str = "auto",
    gradient_accumulation_steps: int = 1,
    log_with: str | None = None,
) -> Accelerator:
    """The Accelerator of a run in `output_dir`, its trackers writing to `output_dir/logging_dir`.

    `mixed_precision` is "fp32", "fp16", "bf16" or "auto": an accelerate config's fp16/bf16 if `accelerate launch` has
    one, else bf16 where the device computes it natively (`ddpm_mnist.hardware.auto_mixed_precision`), else fp32. The
    choice is logged with its reason; on a CPU, so is a warning when the processes' threads would leave cores idle.
    """
    state = PartialState()
    chosen, why = mixed_precision.replace("fp32", "no"), "as asked"
    configured = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # set by `accelerate launch` from its config
    if mixed_precision == "auto" and configured in ("fp16", "bf16"):
        chosen, why = configured, "the accelerate config"
    elif mixed_precision == "auto":
        chosen, why = auto_mixed_precision(state.device), f"automatic for {describe_device(state.device)}"
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=chosen,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)),
    )
    logger.info(f"mixed precision: {'fp32' if chosen == 'no' else chosen} ({why})")
    if state.device.type == "cpu":
        # Physical cores, at most as many as this process may run on (on Linux, a container's share of them).
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cores = min(psutil.cpu_count(logical=False) or 1, allowed)
        if warning := idle_cores_warning(torch.get_num_threads(), state.num_processes, cores):
            logger.warning(warning)
    return accelerator


def run_in(output_dir: Path) -> str | None:
    """What run `output_dir` holds, in words: a finished run's pipeline, or checkpoints; None if neither."""
    if (output_dir / "model_index.json").is_file():
        return "a finished run (model_index.json)"
    if find_checkpoint(output_dir / "checkpoints", "latest") is not None:
        return "a run's checkpoints"
    return None


def clear_output_dir(output_dir: Path) -> None:
    """Remove a previous run's pipeline, checkpoints, samples and logs from `output_dir` (`RUN_FILES`, nothing else)."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a training script's flags, with `--config`: a JSON file of flag values (keys as the flags, without
    dashes) that sets their defaults, flags given on the command line still winning. Unknown keys are refused."""
    parser.add_argument("--config", help="a JSON file of flag values (keys as the flags, without dashes)")
    args = parser.parse_args(argv)
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            parser.error(f"--config {args.config} is not a readable JSON file ({e}).")
        unknown = sorted(set(config) - set(vars(args)))
        if unknown:
            parser.error(f"{args.config} has unknown keys: {', '.join(unknown)}; use the flag names without dashes.")
        parser.set_defaults(**config)
        args = parser.parse_args(argv)
    return args


def add_optimizer_flags(
    add: Callable[..., Any], learning_rate: float, lr_warmup_steps: int, ema_max_decay: float
) -> None:
    """The optimizer, learning-rate schedule, EMA and precision flags every training script shares, through a parser
    group's `add_argument` (`add`), with the script's own defaults for the three named."""
    add("--learning_rate", type=float, default=learning_rate, help="peak learning rate")
    add("--lr_scheduler", default="constant_with_warmup", help="a diffusers get_scheduler name, over the run's steps")
    add("--lr_warmup_steps", type=int, default=lr_warmup_steps, help="learning-rate warm-up steps")
    add("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    add("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
    add("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="EMA of weights")
    add("--ema_max_decay", type=float, default=ema_max_decay, help="EMA decay after warm-up")
    add("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inv_gamma")
    add("--ema_power", type=float, default=3 / 4, help="EMA warm-up power")
    add("--mixed_precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: bf16 where the "
        "hardware computes it natively (a CUDA GPU with bf16; a CPU with AMX-BF16 or AVX512-BF16), else fp32; an "
        "accelerate config's fp16/bf16 also wins over auto")  # fmt: skip


def add_run_flags(add: Callable[..., Any]) -> None:
    """The run folder's checkpoint, sample-grid, logging and Hub flags every training script shares."""
    add("--checkpointing_steps", type=int, default=1000, help="save a checkpoint every N steps")
    add("--checkpoints_total_limit", type=int, help="keep at most N checkpoints")
    add("--resume_from_checkpoint", help="'latest', or a checkpoint folder in --output_dir/checkpoints")
    add("--save_images_steps", type=int, default=1000, help="save a grid of EMA samples every N steps")
    add("--num_samples", type=int, default=16, help="digits in each sample grid")
    add("--logger", default="tensorboard", help="an accelerate tracker (tensorboard, wandb, ...)")
    add("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    add("--push_to_hub", action="store_true", help="upload the final pipeline to the Hub")
    add("--hub_model_id", help="the Hub repo, user/name (default: output_dir's name)")
    add("--hub_private_repo", action="store_true", help="create the Hub repo private")


def make_ema(unet: torch.nn.Module, args: argparse.Namespace) -> EMAModel | None:
    """The exponential moving average of the weights, with warm-up (the released weights), as `add_optimizer_flags`'
    flags set it; None with --no-use_ema."""
    if not args.use_ema:
        return None
    decay, inv_gamma, power = args.ema_max_decay, args.ema_inv_gamma, args.ema_power
    return EMAModel(unet.parameters(), decay=decay, use_ema_warmup=True, inv_gamma=inv_gamma, power=power)


def check_ranges(settings: Mapping[str, Any], ranges: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Refuse a setting outside its range: `ranges` maps the range in words ("positive") to its test and the names of
    the settings it holds for; a ValueError `name must be <words>, got <value>.`. None means "not set"."""
    for words, (allowed, names) in ranges.items():
        for name in names.split():
            value = settings.get(name)
            if value is not None and not allowed(value):
                raise ValueError(f"{name} must be {words}, got {value}.")


def check_run_folder(output_dir: Path, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> None:
    """Refuse an `output_dir` that is a file, a checkpoint to resume outside its `checkpoints/`, and a folder holding a
    run that is neither resumed nor to be overwritten: a ValueError naming the arguments, before any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} is a file; pass a folder (new, or one of your runs to resume).")
    checkpoint = None if resume_from_checkpoint in (None, "latest") else Path(resume_from_checkpoint)
    if checkpoint is not None and not checkpoint.is_dir():
        raise ValueError(
            f"resume_from_checkpoint {checkpoint} is not a folder; pass 'latest' or one of "
            f"{output_dir / 'checkpoints'}/checkpoint-N."
        )
    if checkpoint is not None and checkpoint.resolve().parent != (output_dir / "checkpoints").resolve():
        raise ValueError(
            f"resume_from_checkpoint {checkpoint} is not in {output_dir / 'checkpoints'}; checkpoints are read only "
            "from the run's own output_dir: pass that run's folder as output_dir."
        )
    holds = run_in(output_dir)
    if holds and resume_from_checkpoint is None and not overwrite_output_dir:
        raise ValueError(
            f"output_dir {output_dir} already holds {holds}; continue it with resume_from_checkpoint latest, "
            "replace it with overwrite_output_dir, or pass a new folder."
        )


def check_hub_target(repo_id: str) -> str:
    """The full user/name of `repo_id` once the Hub token is known to write to it; a ValueError naming
    `hub_model_id` or `push_to_hub` otherwise, before any work."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"hub_model_id is not a valid repo id ({e}); pass one like user/ddpm-mnist.") from e
    try:
        return check_push_access(repo_id)
    except ValueError as e:
        raise ValueError(f"push_to_hub needs a Hub token that can write to {repo_id}: {e}") from e


class OutputDirLock:
    """An exclusive lock on `output_dir/.train.lock`, held for the whole run by the main process.

    `flock` locks belong to the open file: the kernel releases them when the process ends however it ends, so a killed
    run never leaves a stale lock behind.
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / ".train.lock"
        self.file = None

    def acquire(self) -> None:
        """Create the folder if needed and take the lock (once); a ValueError if another training holds it."""
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
            raise ValueError(
                f"output_dir {self.path.parent} is in use by another training ({holder}); wait for it to end, or "
                "pass another output_dir."
            ) from e
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()


def claim_run_folder(
    state: PartialState,
    lock: OutputDirLock,
    resume_path: Path | None,
    settings: dict,
    must_keep: list[str],
    may_change: list[str],
    overwrite_output_dir: bool = False,
) -> None:
    """Make the lock's folder this run's, on every process: the checkpoint to resume checked against `settings` (see
    `check_resume`), the lock taken by the main process (the folder created only now, with every input checked), and a
    previous run cleared with `overwrite_output_dir` when not resuming. A ValueError names `output_dir`."""
    if state.is_main_process and lock.path.parent.is_dir():
        lock.acquire()  # a folder another training holds is refused first, before any checkpoint is read
    if resume_path is not None:
        check_resume(resume_path, settings, must_keep, may_change)  # logs the changes it allows
    if state.is_main_process:
        lock.acquire()
        if overwrite_output_dir and resume_path is None:
            clear_output_dir(lock.path.parent)
    state.wait_for_everyone()


class TrainingProgress:
    """Where training stands: optimizer steps, epoch, batches of this epoch already consumed, and training time.

    Saved in every checkpoint (accelerate's `register_for_checkpointing`), so a resumed run skips exactly the
    batches it had trained on. The data order is a pure function of (seed, epoch, process), so the position
    is all that needs saving; `datasets`' own `state_dict()` cannot do this exactly, since it drops the
    shuffle buffer.
    """

    STATE = ("global_step", "epoch", "batches_in_epoch", "train_seconds")

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.train_seconds = 0.0  # wall time of the training loop over all runs that led here
        self.clock = self.started = time.time()  # when `train_seconds` was last brought up to date, and this run began
        self.start_step = 0  # where this run began (these three are not saved)

    def state_dict(self) -> dict[str, float]:
        """The position and time, as `accelerator.save_state` pickles them."""
        return {name: getattr(self, name) for name in self.STATE}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a checkpoint's position and time."""
        vars(self).update(state)

    def start_clock(self) -> None:
        """Count training time from now: what came before (start-up, loading) is not training."""
        self.clock = self.started = time.time()
        self.start_step = self.global_step

    def steps_per_second(self) -> float:
        """The rate of this run's optimizer steps since `start_clock`."""
        return (self.global_step - self.start_step) / (time.time() - self.started)

    def end_step(self, accelerator: Accelerator, loss: float, stop: StopRequest) -> float:
        """Count an optimizer step and share its numbers in one collective; return the loss averaged over processes.

        The collective also tells every process whether any was asked to stop (into `stop`) and the main process's
        clock (into `train_seconds`; the others send 0), so that all take the same decision and record the same time.
        """
        now = time.time()
        seconds = self.train_seconds + now - self.clock if accelerator.is_main_process else 0.0
        shared = accelerator.reduce(torch.tensor([loss, stop.requested, seconds], device=accelerator.device))
        self.global_step += 1
        self.train_seconds, self.clock, stop.requested = shared[2].item(), now, bool(shared[1])
        return shared[0].item() / accelerator.num_processes


class Batches(Protocol):
    """Training data whose order is a pure function of (epoch, rank, world size), as `ddpm_mnist.data.TrainingData`."""

    def batches(self, epoch: int, rank: int, world_size: int) -> Iterable[tuple[torch.Tensor | None, ...]]: ...


def resumed_batches(
    data: Batches, progress: TrainingProgress, batches_per_epoch: int, rank: int, world: int, device: torch.device
) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """Batches on `device`, epoch after epoch from where `progress` stands; an epoch's remainder waits for the next."""
    while True:
        for batch in islice(data.batches(progress.epoch, rank, world), progress.batches_in_epoch, batches_per_epoch):
            progress.batches_in_epoch += 1
            yield tuple(None if tensor is None else tensor.to(device) for tensor in batch)
        progress.epoch += 1
        progress.batches_in_epoch = 0


def recorded_settings(checkpoint: Path) -> dict:
    """The settings `checkpoint` was written with (its `SETTINGS_FILE`)."""
    recorded = checkpoint / SETTINGS_FILE
    if not recorded.is_file():
        raise ValueError(f"{checkpoint} has no {SETTINGS_FILE}: it is not a checkpoint of this script; start anew.")
    return json.loads(recorded.read_text())


def check_resume(checkpoint: Path, settings: dict, must_keep: list[str], may_change: list[str]) -> list[str]:
    """Refuse to resume `checkpoint` with other `must_keep` settings than it was written with; log and return the
    changes of the `may_change` ones, `name: old -> new`.

    `must_keep` are those without which the resumed run is not the run that was checkpointed, or whose new values the
    checkpoint's optimizer and EMA states would silently override. Also refuses a checkpoint whose weights cannot be
    read (a truncated or corrupt safetensors file), before any model is built.
    """
    saved = recorded_settings(checkpoint)
    differ = setting_changes(saved, settings, must_keep)
    if differ:
        raise ValueError(
            f"cannot resume {checkpoint} with other settings ({'; '.join(differ)}); resume with the checkpoint's "
            "settings, or start a new run in another output_dir."
        )
    for weights in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(
                f"{weights} is damaged ({e}); resume from an earlier checkpoint by path, or delete {checkpoint}."
            ) from e
    changes = setting_changes(saved, settings, may_change)
    for change in changes:
        logger.info(f"resuming with a changed setting, {change}")
    return changes


def setting_changes(saved: dict, current: dict, names: list[str], prefix: str = "") -> list[str]:
    """`name: old -> new` for each of `names` whose value differs; a dict (a model config) key by key."""
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


class StopRequest:
    """SIGINT/SIGTERM set `requested`: the run finishes its step, writes a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum: int, frame: object) -> None:
        """The signal handler: ask the run to stop after its current step."""
        self.requested = True


def stop_reason(
    progress: TrainingProgress, stop_requested: bool, max_train_steps: int, max_train_seconds: float | None = None
) -> str | None:
    """Why the run stops after this step, or None: taken on numbers all processes share (see `end_step`)."""
    if stop_requested:
        return "stopped on request"
    if progress.global_step >= max_train_steps:
        return "finished"
    if max_train_seconds is not None and progress.train_seconds >= max_train_seconds:
        return "finished (time budget spent)"
    return None


def time_budget_steps(
    accelerator: Accelerator,
    minutes: float,
    model: torch.nn.Module,
    loss: Callable[..., torch.Tensor],
    batches: Iterator[tuple],
    gradient_accumulation_steps: int = 1,
) -> int:
    """The optimizer steps that fill `minutes` of training at the throughput measured now; the same on every process.

    A trial step is a training step's forward and backward passes, `loss(*batch)` over `gradient_accumulation_steps`
    of `batches`; its gradients are then dropped and its random draws undone, so that weights, optimizer and random
    states are as before and the run that follows is exactly the run of the step count returned. The first trial,
    which pays for start-up (data, kernels), is not timed; the others run for a twentieth of the budget, at most
    `MEASURE_SECONDS`, and at least once. Optimizer, EMA, checkpoints and sample grids are not in the measure: the run
    takes somewhat longer than the budget.
    """

    def trial_step() -> None:
        for batch in islice(batches, gradient_accumulation_steps):
            value = loss(*batch)
            accelerator.backward(value)
        value.item()  # waits for the device, as a training step's read-back of its loss does
        model.zero_grad(set_to_none=True)

    device = accelerator.device
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        trial_step()
        start, steps, done = time.perf_counter(), 0, False
        while not done:  # the main process's clock decides, so that every process takes as many trial steps
            trial_step()
            steps, elapsed = steps + 1, time.perf_counter() - start
            done = broadcast(torch.tensor([float(elapsed >= min(MEASURE_SECONDS, 3 * minutes))], device=device)).item()
    steps_per_second = broadcast(torch.tensor([steps / elapsed], device=device)).item()
    planned = max(1, int(60 * minutes * steps_per_second))
    logger.info(f"time budget of {minutes:g} minutes: {planned} steps at {steps_per_second:.3g} steps/s")
    return planned


def min_snr_weight(
    noise_scheduler: SchedulerMixin, t: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-example loss weight of min-SNR-gamma (Hang et al. 2023): min(SNR_t, gamma) over the target's own weight."""
    snr = compute_snr(noise_scheduler, t)  # SNR_t = abar_t / (1 - abar_t)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # x_0 prediction


def progress_bar(
    progress: TrainingProgress, max_train_steps: int, time_limit: float | None = None, disable: bool = False
) -> tqdm:
    """The run's bar: optimizer steps done of the run's total, its time left, and the rate of this run's steps. Under a
    `time_limit` (seconds), which may end the run before its steps, the bar has no total: steps done and their rate."""
    total = None if time_limit else max(max_train_steps, progress.global_step)
    return tqdm(total=total, initial=progress.global_step, unit="step", disable=disable)


def grid_pipeline(unet: torch.nn.Module, scheduler: SchedulerMixin, ema: EMAModel | None) -> DDPMMnistPipeline:
    """A pipeline around a copy of the weights to sample and save: the EMA ones when there is an EMA."""
    unet = copy.deepcopy(unet).eval()
    if ema is not None:
        ema.copy_to(unet.parameters())
    pipeline = DDPMMnistPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class SampleGrids:
    """The run's fixed-seed sample grids, `output_dir/samples/step-N.png`, upscaled (nearest) so that digits are
    readable: `num_samples` digits on `num_inference_steps` steps of the pipeline's scheduler; a class-conditional
    model draws one row per class (`num_samples` rounded up to whole rows)."""

    output_dir: Path
    num_samples: int
    num_inference_steps: int
    seed: int

    def path(self, step: int) -> Path:
        """Where the grid of `step` goes."""
        return self.output_dir / "samples" / f"step-{step:07d}.png"

    def save(self, accelerator: Accelerator, pipeline: DDPMMnistPipeline, step: int) -> Path:
        """Draw and save the grid of `step` (also sent to tensorboard); return its path."""
        generator = torch.Generator(device=pipeline.device).manual_seed(self.seed)
        rows, cols = None, None
        if pipeline.is_class_conditional:
            rows = pipeline.unet.config.num_class_embeds
            cols = math.ceil(self.num_samples / rows)
        images = pipeline(
            batch_size=None if rows else self.num_samples,
            class_labels=torch.arange(rows).repeat_interleave(cols) if rows else None,
            generator=generator,
            num_inference_steps=self.num_inference_steps,
            output_type="pt",
        ).images
        grid = digit_grid(images, cols=cols, upscale=SAMPLE_GRID_UPSCALE)
        path = self.path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HW")
        return path


def save_run(
    accelerator: Accelerator,
    pipeline: DDPMMnistPipeline,
    grids: SampleGrids,
    step: int,
    repo_id: str,
    *,
    dataset_name: str,
    training: dict[str, Any],
    samples_scheduler: tuple[str | None, int],
    scheduler: SchedulerMixin | None = None,
    push_to_hub: bool = False,
    hub_private_repo: bool = False,
) -> None:
    """The run's pipeline folder (`grids.output_dir`): the weights (safetensors) with `scheduler` (by default the
    pipeline's own), the last step's sample grid (drawn with the pipeline's scheduler, as the run's grids), the model
    card (its code drawing with `samples_scheduler`, as the grids) and `training.json`; then the push to `repo_id`, with
    `push_to_hub`."""
    output_dir, grid_path = grids.output_dir, grids.path(step)
    if not grid_path.exists():  # the last step may have drawn its grid already
        grids.save(accelerator, pipeline, step)
    if scheduler is not None:
        pipeline.scheduler = scheduler
    save_training_run(
        pipeline, output_dir, repo_id, dataset_name=dataset_name, training=training,
        samples_image=grid_path.relative_to(output_dir).as_posix(), samples_scheduler=samples_scheduler,
    )  # fmt: skip
    if push_to_hub:
        logger.info(f"pushed {output_dir} to {push_training_run(output_dir, repo_id, hub_private_repo)}")
