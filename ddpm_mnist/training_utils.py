"""What training scripts share (diffusers' name for such a module): the run folder, its Accelerator, its progress.

A run trains in one folder (`output_dir`) that ends up holding its pipeline, `checkpoints/`, `samples/` and `logs/`.
These pieces keep that folder sound for any accelerate script, whatever its flags: one training per folder, only whole
checkpoints, each with the settings a resume must keep, an exact resume of the data order, and a clean stop after a
whole step. It needs the package's `train` extra (accelerate). Bad input is refused with a ValueError that names the
arguments (`output_dir`); an entry point turns those names into its flags with `ddpm_mnist.errors.usage_errors`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Protocol

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast
from diffusers import SchedulerMixin
from diffusers.training_utils import compute_snr
from safetensors import safe_open
from tqdm.auto import tqdm

from .hardware import auto_mixed_precision, describe_device, idle_cores_warning

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
