"""A fault campaign: kill training with SIGKILL at random moments, resume it each time, and compare the end.

    python benchmarks/fault_campaign.py --kills 20 --checkpoint_kills 4 --max_train_steps 40 --seed 1

Trains the `tiny` preset on an MNIST-layout folder (by default 96 random digits written for the campaign) twice:
once without interruption, and once killed `--kills` times, each time resumed with `--resume_from_checkpoint latest`.
The first `--checkpoint_kills` kills land while a checkpoint is being written (the moment its temporary folder
exists); the others at a random moment inside a random step: once the progress bar reaches a step drawn from a
window after the resumed checkpoint, after a further random delay of up to 0.1 s. After every kill
each `checkpoint-N` folder must be whole (every file there, every safetensors tensor readable). At the end the final
training weights (the last checkpoint's `model.safetensors`) and the released EMA weights must equal the uninterrupted
run's, byte for byte. Prints the figures as one JSON object (kills, kills during a checkpoint write, steps redone,
checkpoints found damaged, bytes that differ) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
# The files every checkpoint of a single-process run with EMA holds (accelerate's names, and the run's settings).
CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                    "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "training_settings.json"}  # fmt: skip
EMA_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs in all (at least 2)")
    p.add_argument("--checkpoint_kills", type=int, default=1, help="of them, kills during a checkpoint write")
    p.add_argument("--max_train_steps", type=int, default=24, help="optimizer steps of the run")
    p.add_argument("--checkpointing_steps", type=int, default=3, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--dataset_name", default=None, help="an MNIST-layout folder (default: 96 random digits)")
    p.add_argument("--output_dir", default=None, help="where the two runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.kills < 2 or not 1 <= args.checkpoint_kills <= args.kills:
        p.error("--kills must be at least 2, and --checkpoint_kills between 1 and --kills.")
    if args.max_train_steps < args.kills + 2 * args.checkpointing_steps:
        p.error("--max_train_steps must be at least --kills + 2 x --checkpointing_steps.")
    return args


def train_command(args: argparse.Namespace, data: Path, output_dir: Path) -> list[str]:
    """train.py on the tiny preset, fp32, resuming from the latest checkpoint whenever there is one."""
    return [
        sys.executable, str(TRAIN), f"--dataset_name={data}", f"--output_dir={output_dir}", "--preset=tiny",
        "--train_batch_size=16", "--lr_warmup_steps=4", "--mixed_precision=fp32", "--num_samples=4",
        "--num_inference_steps=4", "--save_images_steps=100000", "--shuffle_buffer_size=32",
        f"--max_train_steps={args.max_train_steps}", f"--checkpointing_steps={args.checkpointing_steps}",
        "--resume_from_checkpoint=latest",
    ]  # fmt: skip


def damaged_checkpoints(checkpoints_dir: Path) -> list[str]:
    """The `checkpoint-N` folders that are not whole: a missing file, or weights that cannot be read."""
    damaged = []
    for checkpoint in sorted(checkpoints_dir.glob("checkpoint-*")):
        missing = CHECKPOINT_FILES - {p.name for p in checkpoint.iterdir()}
        try:
            load_file(checkpoint / "model.safetensors")
        except Exception as e:  # noqa: BLE001  (any failure to read counts as damage)
            missing.add(f"model.safetensors unreadable: {e}")
        if missing:
            damaged.append(f"{checkpoint.name}: {', '.join(sorted(missing))}")
    return damaged


def latest_step(checkpoints_dir: Path) -> int:
    """The step of the checkpoint `--resume_from_checkpoint latest` takes (0: none)."""
    steps = [int(m[1]) for d in checkpoints_dir.glob("checkpoint-*") if (m := re.match(r"checkpoint-(\d+)$", d.name))]
    return max(steps, default=0)


def run_until_killed(command: list[str], kill_now: Callable[[str], bool]) -> tuple[bool, str]:
    """Run `command` and SIGKILL it once `kill_now(its stderr so far)` holds; (whether it was killed, its stderr).

    The stderr is read by a thread all along, so that a full pipe never stalls the run.
    """
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: process.stderr.read(1), "")))
    reader.start()
    while process.poll() is None and not kill_now("".join(stderr[-4000:])):
        time.sleep(0.001)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    reader.join()
    return killed, "".join(stderr)


def inside_step(step: int, delay: float, max_train_steps: int) -> Callable[[str], bool]:
    """A kill condition: `delay` seconds have passed since the progress bar showed `step`."""
    reached_at: list[float] = []

    def condition(stderr: str) -> bool:
        if not reached_at and step_reached(stderr, max_train_steps) >= step:
            reached_at.append(time.time())
        return bool(reached_at) and time.time() >= reached_at[0] + delay

    return condition


def step_reached(stderr: str, max_train_steps: int) -> int:
    """The last optimizer step the progress bar showed before the kill (0 if it never showed one)."""
    shown = re.findall(rf"(\d+)/{max_train_steps} \[", stderr)
    return int(shown[-1]) if shown else 0


def differing_bytes(a: Path, b: Path) -> int:
    """How many bytes of the tensors in two safetensors files differ (all of them, if the tensors do not match)."""
    tensors_a, tensors_b = load_file(a), load_file(b)
    if tensors_a.keys() != tensors_b.keys():
        return sum(t.nbytes for t in tensors_a.values())
    return sum(
        int((np.frombuffer(t.tobytes(), np.uint8) != np.frombuffer(tensors_b[k].tobytes(), np.uint8)).sum())
        for k, t in tensors_a.items()
    )


def run_campaign(args: argparse.Namespace, work: Path) -> dict:
    """The uninterrupted run, the killed-and-resumed run, and the figures comparing them."""
    data = Path(args.dataset_name) if args.dataset_name else None
    if data is None:
        sys.path.insert(0, str(ROOT))
        from tests.utils import write_mnist_folder

        data = write_mnist_folder(work / "data", np.random.default_rng(0), num_train=96, num_test=16)
    whole, killed = work / "whole", work / "killed"
    subprocess.run(train_command(args, data, whole), check=True, capture_output=True)
    rng = random.Random(args.seed)
    figures = {"kills": 0, "kills_during_checkpoint_write": 0, "steps_redone": 0, "damaged_checkpoints": []}
    command, checkpoints = train_command(args, data, killed), killed / "checkpoints"
    while figures["kills"] < args.kills:
        if figures["kills_during_checkpoint_write"] < args.checkpoint_kills:
            # While a checkpoint is being written: its temporary folder exists.
            hit, stderr = run_until_killed(command, lambda _: any(checkpoints.glob("tmp-checkpoint-*")))
            figures["kills_during_checkpoint_write"] += hit
        else:
            # A random step after the checkpoint it resumes from, in a window that spreads the kills left over the steps
            # left, and a random moment inside it. A run may get a step or two past its kill step before the signal
            # lands, so the last window ends two checkpoint intervals before the end.
            first, last = latest_step(checkpoints) + 1, args.max_train_steps - 2 * args.checkpointing_steps
            if first > last:
                raise RuntimeError("the run reached its end before the last kill; use more --max_train_steps")
            kills_left = args.kills - figures["kills"]
            step = rng.randint(first, first + (last - first) // kills_left)
            hit, stderr = run_until_killed(command, inside_step(step, rng.uniform(0, 0.1), args.max_train_steps))
        if not hit:
            raise RuntimeError("a run finished before its kill; use more --max_train_steps")
        figures["kills"] += 1
        figures["steps_redone"] += max(0, step_reached(stderr, args.max_train_steps) - latest_step(checkpoints))
        figures["damaged_checkpoints"] += damaged_checkpoints(checkpoints)
    subprocess.run(command, check=True, capture_output=True)
    final = f"checkpoints/checkpoint-{args.max_train_steps}/model.safetensors"
    figures["training_weight_bytes_that_differ"] = differing_bytes(whole / final, killed / final)
    figures["ema_weight_bytes_that_differ"] = differing_bytes(whole / EMA_WEIGHTS, killed / EMA_WEIGHTS)
    figures["ema_files_identical"] = (whole / EMA_WEIGHTS).read_bytes() == (killed / EMA_WEIGHTS).read_bytes()
    return figures


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.output_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        figures = run_campaign(args, work)
    print(json.dumps(figures))
    same = figures["training_weight_bytes_that_differ"] == figures["ema_weight_bytes_that_differ"] == 0
    return 0 if same and figures["ema_files_identical"] and not figures["damaged_checkpoints"] else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
