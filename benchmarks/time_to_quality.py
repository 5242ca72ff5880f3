"""Time to quality: our training recipe against the diffusers baseline at equal architecture, on the same machine.

    python benchmarks/time_to_quality.py --config training/recipes/e-release-cosine.json --output_dir runs/ttq

Both sides train for the same wall-clock budget and are scored alternately at each of `--snapshot_minutes` (the
training loop's wall time), by one protocol: `--num_samples` digits of the pipeline's DDPM scored with
`ddpm_mnist.evaluation.QualityReference` beside the real floor. The recipe is `training/train.py` run on the `--config`
JSON, resumed from snapshot to snapshot; the baseline, the loop of diffusers' `train_unconditional.py`
(`benchmarks/diffusers_baseline.py`) on the recipe's UNet built as `UNet2DModel`. Writes `time_to_quality.json`,
`time_to_quality.png` and the recipe's run (`recipe/`, with `train.log`) into `--output_dir`. A check run in seconds:
a `"preset": "tiny"` config, `--snapshot_minutes 0.05 0.1 --num_samples 16 --num_inference_steps 4`. What each side
does and what the JSON holds: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch
from diffusers_baseline import NUM_TRAIN_TIMESTEPS, TRAIN_BATCH_SIZE, DiffusersLoop, diffusers_twin

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.errors import UsageError, WorkFailed, first_line, run_entry_point, usage_errors
from ddpm_mnist.evaluation import (
    DTYPES,
    MIN_SCORED_IMAGES,
    QualityReference,
    check_device,
    default_device,
    generate_digits,
)
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.model_card import figure

ROOT = Path(__file__).resolve().parents[1]
FLAT_SCHEDULES = ("constant", "constant_with_warmup")  # learning-rate schedules that do not depend on the budget


def parse_args() -> argparse.Namespace:
    """The flags, checked: bad values are a UsageError before anything trains."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe: a JSON file of training/train.py flag values")
    parser.add_argument("--output_dir", required=True, help="a new folder for the runs, the JSON and the PNG")
    parser.add_argument("--snapshot_minutes", nargs="+", type=float, default=[10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
                        help="when to score")  # fmt: skip
    parser.add_argument("--num_samples", type=int, default=1000, help="generated digits per snapshot")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="respaced DDPM sampling steps")
    parser.add_argument("--batch_size", type=int, default=100, help="images per forward pass when sampling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of the floor's real digits")
    parser.add_argument("--dataset_name", help=f"MNIST for both sides (default: the recipe's, else {DEFAULT_DATASET})")
    parser.add_argument("--reference_images", type=int, default=None, help="test digits to score against (all)")
    parser.add_argument("--device", default=default_device(), help="where the samples are drawn and scored")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="both sides' UNet's while sampling (x_t stays fp32)")  # fmt: skip
    parser.add_argument("--baseline_batch_size", type=int, default=TRAIN_BATCH_SIZE, help="the diffusers loop's")
    parser.add_argument("--baseline_mixed_precision", default="fp32", choices=["fp32", "bf16"], help="the loop's")
    args = parser.parse_args()
    minutes = args.snapshot_minutes
    if minutes[0] <= 0 or any(b <= a for a, b in pairwise(minutes)):
        raise UsageError(f"--snapshot_minutes {minutes} must be positive and increasing, e.g. 10 20 30.")
    if args.num_samples < MIN_SCORED_IMAGES:
        raise UsageError(f"--num_samples must be at least {MIN_SCORED_IMAGES}, got {args.num_samples}.")
    if not 1 <= args.num_inference_steps <= NUM_TRAIN_TIMESTEPS:
        raise UsageError(f"--num_inference_steps must be in 1..{NUM_TRAIN_TIMESTEPS}, got {args.num_inference_steps}.")
    if min(args.batch_size, args.baseline_batch_size) < 1:
        raise UsageError("--batch_size and --baseline_batch_size must be positive.")
    with usage_errors("device"):
        args.device = check_device(args.device)
    args.output_dir = Path(args.output_dir).resolve()
    if (args.output_dir / "recipe").exists():
        raise UsageError(f"--output_dir {args.output_dir} already holds a benchmark run; pass a new folder.")
    return args


def load_recipe(path: str) -> dict:
    """The recipe's flag values, from a JSON object of train.py flags."""
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--config {path} is not a readable JSON file ({error}); pass a recipe JSON.") from error
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {path} is not a JSON object of train.py flags; pass one like those in recipes/.")
    schedule = recipe.get("lr_scheduler", "constant_with_warmup")
    if schedule not in FLAT_SCHEDULES and "max_train_steps" not in recipe and "num_epochs" not in recipe:
        raise UsageError(
            f"--config {path} decays its learning rate ({schedule}) with no max_train_steps, so train.py would run the "
            "schedule over each snapshot's time budget; give the recipe a max_train_steps that the last snapshot "
            "about reaches."
        )
    return recipe


def root_relative(value: str) -> str:
    """A recipe's path as train.py sees it (it runs in the repository root), absolute where it exists there."""
    path = ROOT / value
    return str(path) if path.exists() else value


def dataset_for(args: argparse.Namespace, recipe: dict) -> str:
    """The MNIST both sides train on: --dataset_name, else the recipe's, else ylecun/mnist."""
    if args.dataset_name is not None:
        path = Path(args.dataset_name)
        return str(path.resolve()) if path.exists() else args.dataset_name
    if "dataset_name" in recipe:
        return root_relative(recipe["dataset_name"])
    return DEFAULT_DATASET


def recipe_unet(recipe: dict) -> DDPMMnistUNet:
    """The recipe's UNet, randomly initialised: its `model_config_name_or_path`, else its preset (train.py's: mnist)."""
    config_path = recipe.get("model_config_name_or_path")
    try:
        if config_path is None:
            return DDPMMnistUNet.from_preset(recipe.get("preset", "mnist"))
        return DDPMMnistUNet.from_config(DDPMMnistUNet.load_config(root_relative(config_path)))
    except (OSError, ValueError) as error:
        raise UsageError(f"the recipe's UNet cannot be built ({first_line(error)}); fix --config.") from error


def snapshot(
    side: str, pipe: DDPMMnistPipeline, record: dict, args: argparse.Namespace, reference: QualityReference
) -> dict:
    """`record` (minutes, steps, images seen, training time) of one side with the protocol's metrics of `pipe`:
    `--num_samples` digits of its DDPM on `--num_inference_steps` steps, scored; printed as it comes."""
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    settings = {"num_inference_steps": args.num_inference_steps, "seed": args.seed, "batch_size": args.batch_size}
    samples = generate_digits(pipe, args.num_samples, scheduler="ddpm", progress=False, **settings)
    quality = reference.score(samples).as_dict()
    metrics = {**quality, "sample_seconds": time.perf_counter() - start, "unet_dtype": str(pipe.unet.dtype)}
    print(
        f"{side} at {record['minutes']:g} min: {record['images_seen']} images, FID {metrics['fid']:.2f}, "
        f"confidence {metrics['mean_confidence']:.4f}",
        flush=True,
    )
    return {**record, "metrics": metrics}


def recipe_snapshot(
    args: argparse.Namespace, train: list[str], minutes: float, resume: bool, reference: QualityReference
) -> dict:
    """Run train.py (`train`: the recipe's command) until its summed training time reaches `minutes`, its output
    appended to train.log, and score the EMA pipeline it saves."""
    run_dir = args.output_dir / "recipe"
    command = [*train, "--max_train_minutes", str(minutes), *["--resume_from_checkpoint", "latest"] * resume]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        lines = [line for line in (run_dir / "train.log").read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {result.returncode}"
        if result.returncode == 2 and not resume:
            raise UsageError(f"train.py refused the recipe --config {args.config}: {last}")
        raise WorkFailed(f"train.py failed at {minutes} minutes (see {run_dir / 'train.log'}): {last}")
    training = json.loads((run_dir / "training.json").read_text())["training"]
    pipe = DDPMMnistPipeline.from_pretrained(run_dir).to(args.device, DTYPES[args.dtype])
    record = {"minutes": minutes, "steps": training["global_step"], "images_seen": training["images_seen"]}
    return snapshot("recipe", pipe, {**record, "training_time": training["training_time"]}, args, reference)


def baseline_snapshot(
    loop: DiffusersLoop, minutes: float, args: argparse.Namespace, reference: QualityReference
) -> dict:
    """Train the diffusers loop on until its loop time reaches `minutes`; score its EMA."""
    while loop.train_seconds < 60 * minutes:
        loop.step()
    unet = loop.ema_unet().to(args.device, DTYPES[args.dtype])
    pipe = DDPMMnistPipeline(unet, DDPMMnistScheduler.from_config(loop.noise_scheduler.config))
    steps, training_time = loop.global_step, f"{loop.train_seconds / 60:.2f} minutes"
    record = {"minutes": minutes, "steps": steps, "images_seen": steps * args.baseline_batch_size}
    return snapshot("baseline", pipe, {**record, "training_time": training_time}, args, reference)


def minutes_to_reach(minutes: list[float], fids: list[float], target: float) -> float | None:
    """The first training minute at which the FID curve reaches `target`, interpolated linearly between snapshots.

    At the first snapshot it is that snapshot's minutes (an upper bound); None where the curve never reaches it.
    """
    previous = None
    for m, fid in zip(minutes, fids, strict=True):
        if fid <= target:
            if previous is None:
                return m
            m0, fid0 = previous
            return m0 + (m - m0) * (fid0 - target) / (fid0 - fid)
        previous = (m, fid)
    return None


def comparison(recipe: list[dict], baseline: list[dict]) -> dict:
    """The ratio (recipe minutes to the baseline's final FID) and both sides' quality at equal minutes."""
    minutes = [s["minutes"] for s in recipe]
    target = baseline[-1]["metrics"]["fid"]
    reached = minutes_to_reach(minutes, [s["metrics"]["fid"] for s in recipe], target)
    equal_minutes = []
    for ours, theirs in zip(recipe, baseline, strict=True):
        row = {"minutes": ours["minutes"]}
        for side, s in (("recipe", ours), ("baseline", theirs)):
            row |= {f"{side}_fid": s["metrics"]["fid"], f"{side}_mean_confidence": s["metrics"]["mean_confidence"]}
        equal_minutes.append(row)
    return {
        "ratio": {
            "baseline_minutes": baseline[-1]["minutes"],
            "baseline_final_fid": target,
            "recipe_minutes_to_baseline_final_fid": reached,
            "reached_at_first_snapshot": reached == minutes[0],
            "speedup": baseline[-1]["minutes"] / reached if reached is not None else None,
        },
        "equal_minutes": equal_minutes,
    }


def draw_curve(results: dict, path: Path) -> None:
    """FID (log scale) and mean classifier confidence against training minutes, both sides, the real floor dashed."""
    settings, floor = results["settings"], results["floor"]
    with figure(path, (11, 4.2), ncols=2) as axes:
        labels = {"fid": "FID (classifier features)", "mean_confidence": "mean confidence"}
        for axis, (key, label) in zip(axes, labels.items(), strict=True):
            for side, name in (("recipe", "our recipe (train.py)"), ("baseline", "diffusers train_unconditional.py")):
                snapshots = results[side]
                axis.plot([s["minutes"] for s in snapshots], [s["metrics"][key] for s in snapshots], "o-", label=name)
            axis.axhline(floor[key], color="grey", linestyle="--", label=f"real digits, N = {floor['num_images']}")
            axis.set(xlabel="training minutes (wall clock)", ylabel=label)
        axes[0].set_yscale("log")
        axes[1].legend(loc="lower right")
        title = f"time to quality: {settings['num_samples']} samples, DDPM {settings['num_inference_steps']} steps; "
        axes[0].figure.suptitle(title + settings["device_description"], fontsize=9)


def main() -> None:
    """Check everything, then train and score both sides snapshot by snapshot; write the JSON and the PNG."""
    args = parse_args()
    recipe = load_recipe(args.config)
    config = str(Path(args.config).resolve())
    dataset = dataset_for(args, recipe)
    torch.manual_seed(args.seed)
    twin = diffusers_twin(recipe_unet(recipe))
    with usage_errors("dataset_name", "reference_images", "num_samples"):
        reference = QualityReference(dataset, args.reference_images, device=args.device, seed=args.seed, progress=False)
        floor = reference.floor(args.num_samples)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"config": config, "recipe": recipe, "dataset_name": dataset, "snapshot_minutes": args.snapshot_minutes}
    settings |= {"num_samples": args.num_samples, "num_inference_steps": args.num_inference_steps, "scheduler": "ddpm"}
    settings |= {"sampling_dtype": args.dtype, "seed": args.seed, "reference_images": reference.num_images}
    settings |= {key: getattr(args, key) for key in ("baseline_batch_size", "baseline_mixed_precision")}
    settings |= {"threads": torch.get_num_threads(), "device_description": describe_device(args.device)}
    results: dict = {"settings": settings, "floor": floor.as_dict(), "recipe": [], "baseline": []}
    floor_line = f"real floor at N = {args.num_samples}: FID {floor.fid:.2f}, confidence {floor.mean_confidence:.4f}"
    print(floor_line, flush=True)
    train = [sys.executable, str(ROOT / "training" / "train.py"), "--config", config, "--dataset_name", dataset]
    train += ["--output_dir", str(args.output_dir / "recipe")]
    if not {"max_train_steps", "num_epochs"} & recipe.keys():
        # A step budget that is never reached keeps the minutes a limit on the summed training time; alone, train.py
        # would turn them into a step count measured at the start of each snapshot.
        train += ["--max_train_steps", str(10**9)]
    with tempfile.TemporaryDirectory() as project_dir:
        loop = DiffusersLoop(twin, dataset, args.baseline_batch_size, args.baseline_mixed_precision, project_dir)
        for k, minutes in enumerate(args.snapshot_minutes):
            results["recipe"].append(recipe_snapshot(args, train, minutes, k > 0, reference))
            results["baseline"].append(baseline_snapshot(loop, minutes, args, reference))
        loop.close()
    results.update(comparison(results["recipe"], results["baseline"]))
    (args.output_dir / "time_to_quality.json").write_text(json.dumps(results, indent=2))
    draw_curve(results, args.output_dir / "time_to_quality.png")
    ratio = results["ratio"]
    print(f"ratio: {json.dumps(ratio)}; wrote {args.output_dir / 'time_to_quality.json'} and the PNG", flush=True)


if __name__ == "__main__":
    run_entry_point(main, "time_to_quality.py")
