"""The one-shot GPU run: prove training and sampling on CUDA, measure them, train the seed's model.

    bash benchmarks/gpu_run.sh OUT_DIR [--dry-run]      (gpu_run.sh does the set-up, then runs this file)

Each stage is a child process with its own log and time limit, so that a failing stage is recorded and the others
still run (those that need its output are skipped): set-up (gpu_run.sh), the CUDA tests, throughput against diffusers
at equal architecture, training of the seed's model (the `mnist` preset in bf16, for what is left of the budget, at
most 5 minutes), then evaluation with the `ddpm-mnist` CLI: 10,000 samples of DDPM on 50 respaced steps and 1,000 of
1000-step DDPM, each beside its real floor, the exact NLL bound on 1,000 test digits and a grid. At most 8 files come
back in OUT_DIR: `results.json` (rewritten after every stage), `train.log`, `stages.log`, `grid.png` and the pipeline
without checkpoints in parts under 16 MB (`pipeline.tar.gz.00`, `.01`, ...), packed right after training so that a
run stopped at the command's limit still brings back the weights; `training/release.py --gpu_results OUT_DIR` turns
them into `pretrained/ddpm-mnist/` on the CPU. `--dry-run` runs every stage at toy sizes on the CPU (`DRY`), each on
one thread; `tests/test_gpu_run.py` runs it.

The training recipe, for a few minutes of one H100 instead of the paper's 800k steps of 128 at lr 2e-4 (10.6 hours
of a TPU v3-8 at its 2,688 images/s, for CIFAR10):
- batch 256: twice the paper's, so that each step's kernels fill the GPU (at batch 128 the 32x32 U-Net's small
  convolutions and the per-step EMA and loss read-back leave it idle between launches); still about 230 steps per
  epoch of the 60,000 digits, so a few minutes make thousands of optimizer steps.
- lr 4e-4 (the paper's 2e-4 scaled linearly with the batch), 500 warm-up steps instead of 5,000 (which would outlast
  a run of a few thousand steps), then cosine decay to zero at the last step: a short run gains most from ending at a
  small learning rate, which averages out the noise of the last steps much as a long EMA would. The cosine needs the
  number of steps in advance: the training seconds times the throughput stage's bf16 images/s of our U-Net
  (`THROUGHPUT_KEY`; 4,000 where that figure is missing) times 0.7 for the loop's own costs (EMA update, data, loss
  read-back, gradient clipping), over the batch. `--max_train_minutes` stops the run in any case.
- EMA max decay 0.9995 with the default warm-up (inv_gamma 1, power 3/4): after n steps the decay is
  min(0.9995, 1 - (1 + n)^(-3/4)), about 0.9975 at 3,000 steps, so the released weights average the last ~400
  steps, the last part of the cosine's descent; the cap only binds past 25,000 steps (a longer budget), where the
  paper's 0.9999 would still average over more steps than such a run has.
- everything else as the seed (and the paper): AdamW betas (0.9, 0.999), no weight decay, gradients clipped at 1,
  L_simple on eps, seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from ddpm_mnist.errors import UsageError, WorkFailed, run_entry_point
from ddpm_mnist.hardware import describe_device

ROOT = Path(__file__).resolve().parents[1]
# The GPU machine has no network: benchmarks/stage_gpu.sh copies a local MNIST here, to travel with the checkout.
STAGED_MNIST = ROOT / ".gpu_data" / "mnist"
PART_BYTES = 15 * 2**20  # results archives split into parts of at most 15 MB, easy to copy back
MAX_FILES = 8  # at most this many result files, to copy back from the GPU machine
MAX_TRAIN_MINUTES = 5.0
# Seconds kept back from the budget for what follows training, an estimate until a GPU run measures it: sampling
# 10,000 x 50 + 1,000 x 1000 passes of the bf16 U-Net (4.8 PFLOP), the exact bound's 1,000 x 1000 fp32 passes
# (3.2 PFLOP, TF32 convolutions), the grid, the pipeline save and the archive.
RESERVE_AFTER_TRAINING = 150
TRAIN_START_SECONDS = 30  # imports, CUDA start-up, decoding the 60,000 digits once
LOOP_EFFICIENCY = 0.7  # train.py's images/s over throughput.py's bare training step
FALLBACK_IMAGES_PER_SECOND = 4000.0
# Where throughput.py's JSON holds our U-Net's bf16 training images/s for the mnist preset (see throughput_command).
THROUGHPUT_KEY = ("mnist", "train_ours_bf16")
STAGE_NAMES = ("setup", "tests", "throughput", "train", "archive", "evaluate_fast", "evaluate_ddpm", "nll", "grid")


@dataclass(frozen=True)
class Sizes:
    """What each stage does: the real run on a GPU (the defaults), or the dry run's toy version on the CPU (DRY)."""

    device: str = "cuda"
    preset: str = "mnist"
    num_train_timesteps: int = 1000  # T: the dry run's 20 make "all T steps" and "all T terms" quick on the CPU
    train_batch_size: int = 256
    lr_warmup_steps: int = 500
    max_train_steps: int | None = None  # None: from the throughput and the time left
    fast_samples: int = 10_000
    fast_steps: int = 50
    ddpm_samples: int = 1000
    nll_images: int = 1000
    grid_images: int = 64
    batch_size: int = 2000  # images per forward pass in the evaluations
    stage_timeout: int = 180  # seconds, for every stage but training


REAL = Sizes()
DRY = Sizes(device="cpu", preset="tiny", num_train_timesteps=20, train_batch_size=16, lr_warmup_steps=2,
            max_train_steps=6, fast_samples=16, fast_steps=5, ddpm_samples=8, nll_images=8, grid_images=16,
            batch_size=16, stage_timeout=120)  # fmt: skip


@dataclass
class Stage:
    """One stage's record: its status (ok, failed, timeout, skipped), seconds, and what it produced."""

    name: str
    status: str = "skipped"
    seconds: float = 0.0
    summary: str = ""
    result: object = None

    def as_dict(self) -> dict:
        record = {key: value for key, value in vars(self).items() if key != "name"}
        return {**record, "seconds": round(self.seconds, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="the folder for the files to bring back (new or empty)")
    p.add_argument("--dry-run", action="store_true", help="every stage at toy sizes on the CPU")
    p.add_argument("--dataset_name", help="MNIST, a local copy (default: .gpu_data/mnist, from stage_gpu.sh)")
    p.add_argument("--work_dir", default=None, help="scratch folder for the run (default: a temporary folder)")
    p.add_argument("--budget_minutes", type=float, default=8.0, help="the whole run's time budget")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models (minutes)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[Sizes, Path]:
    """The sizes and the dataset, once the arguments are known to be usable; a bad one is a UsageError."""
    out = Path(args.output_dir)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UsageError(f"{out} is a file or a non-empty folder; pass a new or empty folder for the results.")
    if args.budget_minutes <= 0:
        raise UsageError(f"--budget_minutes must be positive, got {args.budget_minutes}.")
    dataset = Path(args.dataset_name) if args.dataset_name else STAGED_MNIST
    if not list(dataset.glob("**/train-*.parquet")):
        raise UsageError(f"{dataset} holds no MNIST parquet files; run benchmarks/stage_gpu.sh or pass --dataset_name.")
    sizes = DRY if args.dry_run else REAL
    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA is not available here; run on a GPU machine, or pass --dry-run for the CPU version.")
    return sizes, dataset.resolve()


# --------------------------------------------------------------------------------------------------------------
# The commands of each stage: each tool's flags are written here and nowhere else.


def tests_command(sizes: Sizes) -> list[str]:
    """The CUDA tests; on the GPU machine in 8 processes (pytest-xdist is there): most of them are train.py runs."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    return command if sizes is DRY else [*command, "-n", "8"]


def throughput_command(sizes: Sizes, compile_models: bool) -> list[str]:
    """benchmarks/throughput.py on the run's device: both U-Nets (`models`) of the mnist preset and the paper's cifar10
    one, fp32 and bf16, plain and channels_last, and the sampling loop (`sample`). torch.compile only with --compile:
    it compiles each model, precision and mode apart, minutes in all, which come out of the training time."""
    command = [sys.executable, "benchmarks/throughput.py", "--device", sizes.device, "--json"]
    command += ["--compile"] if compile_models else []
    if sizes is DRY:
        flags = "--presets tiny --dtypes fp32 bf16 --parts models --repeats 1 --sample_batch_size 4"
    else:
        # Sampling at batch 500: enough to fill the GPU, and the 12 timed 50-step loops stay within seconds.
        flags = "--presets mnist cifar10 --dtypes fp32 bf16 --channels_last --parts models sample --repeats 3"
        flags += " --sample_batch_size 500"
    return [*command, *flags.split(), "--batch_size", str(sizes.train_batch_size)]


def train_command(sizes: Sizes, dataset: Path, run: Path, max_train_steps: int, minutes: float | None) -> list[str]:
    """`accelerate launch training/train.py` with the recipe of the module docstring."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1"]
    launch += ["--mixed_precision=bf16", "--dynamo_backend=no", *(["--cpu"] if sizes.device == "cpu" else [])]
    flags = [f"--dataset_name={dataset}", f"--output_dir={run}", f"--preset={sizes.preset}"]
    flags += [f"--ddpm_num_steps={sizes.num_train_timesteps}", "--mixed_precision=bf16", "--decode_once"]
    flags += [f"--train_batch_size={sizes.train_batch_size}", "--learning_rate=4e-4", "--lr_scheduler=cosine"]
    flags += [f"--lr_warmup_steps={sizes.lr_warmup_steps}", f"--max_train_steps={max_train_steps}"]
    flags += ["--ema_max_decay=0.9995", "--seed=0"]
    # One checkpoint and one grid, both at the end: saving costs time and nothing resumes this run here.
    flags += [f"--checkpointing_steps={max_train_steps}", f"--save_images_steps={max_train_steps}", "--num_samples=16"]
    flags += [f"--num_inference_steps={sizes.fast_steps}"]  # the grid: the recommended setting, DDPM on 50 steps
    flags += [f"--max_train_minutes={minutes:.2f}"] if minutes is not None else []
    return [*launch, "training/train.py", *flags]


def evaluation_commands(sizes: Sizes, dataset: Path, run: Path, out: Path) -> dict[str, list[str]]:
    """The evaluation stages: `ddpm-mnist` calls on the trained pipeline, on the run's device. DDPM without
    `--num_inference_steps` runs all T steps; `nll` without `--nll_timesteps` sums all T terms exactly. Sampling runs
    the U-Net in bf16 (x_t and the scheduler stay fp32): a third of the fp32 time on the GPU; the bound keeps the
    U-Net in fp32."""
    cli = shutil.which("ddpm-mnist", path=str(Path(sys.executable).parent)) or "ddpm-mnist"
    scored, sampling = {"dataset_name": dataset, "json": True}, {"scheduler": "ddpm", "dtype": "bf16"}
    fast = {"num_inference_steps": sizes.fast_steps, "num_samples": sizes.fast_samples}
    stages = {
        "evaluate_fast": ("evaluate", {**scored, **sampling, **fast}),
        "evaluate_ddpm": ("evaluate", {**scored, **sampling, "num_samples": sizes.ddpm_samples}),
        "nll": ("nll", {**scored, "split": "test", "nll_images": sizes.nll_images}),
        "grid": ("sample", {**sampling, "num_samples": sizes.grid_images, "upscale": 3, "output_dir": out}),
    }
    commands = {}
    for name, (subcommand, flags) in stages.items():
        commands[name] = [cli, subcommand, str(run)]
        for flag, value in {"device": sizes.device, "batch_size": sizes.batch_size, "seed": 0, **flags}.items():
            commands[name] += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
    return commands


# --------------------------------------------------------------------------------------------------------------
# Running and reading the stages


def run_stage(stage: Stage, command: list[str], log: Path, timeout: float) -> str:
    """Run one stage's command with its output appended to `log`; record status and seconds; return the output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["TQDM_MININTERVAL"] = "10"  # progress bars in a log file: a line every 10 s, not 10 a second
    print(f"[{time.strftime('%H:%M:%S')}] {stage.name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n===== {stage.name}: {' '.join(command)}\n")
        f.flush()
        begin = f.tell()
        try:
            process = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            stage.status = "ok" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            stage.status = "timeout"
    stage.seconds = time.perf_counter() - start
    output = log.read_text(errors="replace")[begin:]
    if stage.status != "ok":
        stage.summary = f"{stage.status}: " + (output.strip().splitlines() or ["no output"])[-1][:100]
    return output


def last_json(output: str) -> dict | None:
    """The JSON object on the last line that holds one (the `--json` convention of the CLI and benchmarks)."""
    last = next((line for line in reversed(output.splitlines()) if line.startswith("{")), None)
    try:
        return json.loads(last) if last else None
    except json.JSONDecodeError:
        return None


def pytest_counts(output: str) -> dict[str, int]:
    """pytest's closing counts (passed, failed, skipped, ...) from its last summary line."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def planned_steps(throughput: dict | None, seconds: float, batch_size: int) -> int:
    """Optimizer steps that fit in `seconds` of training, from the measured throughput (see the module docstring)."""
    section, key = THROUGHPUT_KEY
    measured = (throughput or {}).get(section, {})
    rate = measured.get(key) if isinstance(measured, dict) else None
    rate = rate if isinstance(rate, int | float) else FALLBACK_IMAGES_PER_SECOND
    return max(1, int(seconds * rate * LOOP_EFFICIENCY / batch_size))


def bf16_fraction_of_peak(throughput: dict, preset: str) -> float | None:
    """Our bf16 training FLOP/s over the measured bf16 matmul peak: FLOPs per image (throughput.py counts them in its
    fp32 step) times bf16 images/s, over the peak; None where a figure is missing (throughput.py measures no bf16
    peak where bf16 is emulated)."""
    models = throughput.get(preset, {})
    needed = [models.get(key) for key in ("train_gflops_per_second_ours_fp32", "train_ours_fp32", "train_ours_bf16")]
    peak = throughput.get("matmul_peak_gflops_bf16")
    if not (all(needed) and peak):
        return None
    gflops_per_second_fp32, images_per_second_fp32, images_per_second_bf16 = needed
    return gflops_per_second_fp32 / images_per_second_fp32 * images_per_second_bf16 / peak


def run_tool(stage: Stage, command: list[str], log: Path, sizes: Sizes) -> None:
    """Run a stage that reports through pytest's closing line or a `--json` last line, read that, and write its cell
    of the summary table; for the throughput, our bf16 training images/s against diffusers' on the trained preset, and
    the share of peak."""
    output = run_stage(stage, command, log, sizes.stage_timeout)
    result = stage.result = pytest_counts(output) if stage.name == "tests" else last_json(output)
    if stage.name == "throughput" and result is not None:
        result["train_fraction_of_bf16_peak"] = bf16_fraction_of_peak(result, sizes.preset)
    if stage.status != "ok" or (result is None and stage.name != "grid"):
        return
    if stage.name == "tests":
        stage.summary = ", ".join(f"{n} {word}" for word, n in result.items())
    elif stage.name == "throughput":
        models = result.get(sizes.preset, {})
        ours, theirs = models.get("train_ours_bf16"), models.get("train_diffusers_bf16")
        fraction = result.get("train_fraction_of_bf16_peak")
        peak = f"{fraction:.1%} of the bf16 matmul peak" if fraction is not None else "bf16 matmul peak not measured"
        ratio = f"{ours:,.0f} vs diffusers {theirs:,.0f} images/s ({ours / theirs:.2f}x)" if ours and theirs else ""
        stage.summary = f"{sizes.preset} bf16 training: {ratio}, {peak}" if ratio else "no bf16 training figures"
    elif stage.name.startswith("evaluate"):
        fid, floor = result["fid"], result["floor"]["fid"]
        stage.summary = f"FID {fid:.2f} (floor {floor:.2f}), confidence {result['mean_confidence']:.3f}"
    elif stage.name == "nll":
        stage.summary = f"{result['nll_bpd']:.3f} bits/dim, exact: {result['exact']}"
    else:
        stage.summary = f"{sizes.grid_images} digits in grid.png"


def pack_pipeline(run: Path, out: Path, work: Path) -> list[str]:
    """The run folder without checkpoints as a .tar.gz, split into parts of PART_BYTES in `out`; their names."""
    archive = work / "pipeline.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for path in sorted(run.rglob("*")):
            relative = path.relative_to(run)
            if path.is_file() and relative.parts[0] != "checkpoints":
                tar.add(path, arcname=relative.as_posix())
    names = []
    with open(archive, "rb") as f:
        while chunk := f.read(PART_BYTES):
            names.append(f"pipeline.tar.gz.{len(names):02d}")
            (out / names[-1]).write_bytes(chunk)
    archive.unlink()
    return names


def main(args: argparse.Namespace) -> None:
    """Run the stages in turn, each recorded in results.json as it ends, then print the closing table."""
    sizes, dataset = check_args(args)
    if args.dry_run:
        # One thread per stage process: on a shared CPU, OpenMP's busy-waiting threads would starve each other.
        os.environ["OMP_NUM_THREADS"] = "1"
    start, out = time.perf_counter(), Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_run_"))
    work.mkdir(parents=True, exist_ok=True)
    run, log = work / "run", out / "stages.log"
    stages = {name: Stage(name) for name in STAGE_NAMES}
    # Where this runs; the set-up's seconds were measured by gpu_run.sh.
    setup, packages = stages["setup"], ("torch", "diffusers", "datasets", "accelerate", "huggingface_hub")
    setup.status, setup.seconds = "ok", float(os.environ.get("GPU_RUN_SETUP_SECONDS", 0))
    setup.result = {"device": describe_device(sizes.device), "cuda": torch.version.cuda}
    setup.result |= {"python": sys.version.split()[0], **{name: version(name) for name in packages}}
    setup.result["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    setup.summary = f"torch {setup.result['torch']}, {setup.result['device']}"

    def elapsed() -> float:
        return time.perf_counter() - start + setup.seconds

    def save() -> None:
        """results.json as it stands, rewritten after every stage: a run stopped at its limit leaves its figures."""
        results = {"dry_run": args.dry_run, "budget_minutes": args.budget_minutes, "total_seconds": round(elapsed(), 1)}
        results |= {"dataset": str(dataset), "stages": {name: stage.as_dict() for name, stage in stages.items()}}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    save()
    for name, command in (("tests", tests_command(sizes)), ("throughput", throughput_command(sizes, args.compile))):
        run_tool(stages[name], command, log, sizes)
        save()
    # Training for the time left (at most MAX_TRAIN_MINUTES), in the steps that the measured throughput allows.
    train, minutes, steps = stages["train"], None, sizes.max_train_steps
    if steps is None:
        left = args.budget_minutes * 60 - elapsed() - RESERVE_AFTER_TRAINING - TRAIN_START_SECONDS
        minutes = max(1.0, min(MAX_TRAIN_MINUTES, left / 60))
        steps = planned_steps(stages["throughput"].result, minutes * 60, sizes.train_batch_size)
    command = train_command(sizes, dataset, run, steps, minutes)
    timeout = (minutes or 0) * 60 + TRAIN_START_SECONDS + sizes.stage_timeout
    output = run_stage(train, command, out / "train.log", timeout)
    if train.status == "ok":
        record = json.loads((run / "training.json").read_text())
        losses = re.findall(r"loss=([0-9.]+(?:e-?\d+)?)", output)  # the training progress bar's
        train.result = {**record, "command": command, "final_loss": float(losses[-1]) if losses else None}
        t = record["training"]
        train.summary = f"{t['global_step']} steps, {t['images_seen']:,} images, {t['training_time']}"
    save()
    if train.status == "ok":
        # The trained pipeline comes back first, so that the weights return even if an evaluation runs out of time.
        archive, began = stages["archive"], time.perf_counter()
        archive.result = pack_pipeline(run, out, work)
        archive.status, archive.seconds = "ok", time.perf_counter() - began
        archive.summary = f"{len(archive.result)} parts"
        save()
        for name, command in evaluation_commands(sizes, dataset, run, out).items():
            run_tool(stages[name], command, log, sizes)
            save()
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    # The closing table: one line per stage, then the total against the budget and the files that come back.
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"\n{'stage':15}{'status':>9}{'seconds':>9}  result")
    for stage in stages.values():
        print(f"{stage.name:15}{stage.status:>9}{stage.seconds:9.1f}  {stage.summary}")
    size = sum(p.stat().st_size for p in files) / 2**20
    budget = f"budget {args.budget_minutes * 60:.0f} s; {len(files)} files ({size:.1f} MB)"
    print(f"{'total':15}{'':>9}{elapsed():9.1f}  {budget}")
    if len(files) > MAX_FILES or any(p.stat().st_size >= 16 * 2**20 for p in files):
        raise WorkFailed(f"{out} holds {len(files)} files, over the {MAX_FILES} (each under 16 MB) that come back.")
    if failed := [stage.name for stage in stages.values() if stage.status != "ok"]:
        raise WorkFailed(f"stages {', '.join(failed)} did not finish; their output is in {out}/stages.log.")


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "gpu_run.py")
