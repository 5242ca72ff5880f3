"""How readable are the digits of a short training run? Runs of train.py scored with several samplers each.

For each run folder and each sampler NAME:STEPS, --num_samples digits drawn from one seed are read by the package's
MNIST classifier: the share it reads with confidence at least 0.9 ("readable"), the mean confidence, the FID against
the MNIST test digits as a multiple of the floor (as many real training digits scored the same way), and the blobs,
samples with a grey background (`ddpm_mnist.metrics.quality.blob_mask`). Each run adds the blobs of its last sample
grid (`samples/step-N.png`, the picture its card shows) and its training record: images seen, time, hardware.

    python benchmarks/first_run.py runs/cpu-demo --samplers ddpm:50 ddpm:1000 unipc:20 --json

With --json the last line is one JSON object: the floor, then per run its record, grid blobs and one entry per sampler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, model_card
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.errors import UsageError, run_entry_point, usage_errors
from ddpm_mnist.evaluation import DTYPES, QualityReference, generate_digits, load_pipeline, scheduler_steps
from ddpm_mnist.image_utils import SAMPLE_GRID_UPSCALE
from ddpm_mnist.metrics.quality import blob_mask, classifier_outputs, sample_quality
from ddpm_mnist.schedulers import SCHEDULERS

READABLE_CONFIDENCE = 0.9  # a digit the classifier reads with at least this confidence counts as readable


def sampler(value: str) -> tuple[str, int]:
    """A sampler flag NAME:STEPS as (scheduler name, steps)."""
    name, _, steps = value.partition(":")
    if name not in SCHEDULERS or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME:STEPS with NAME one of {', '.join(SCHEDULERS)}")
    return name, int(steps)


def build_parser() -> argparse.ArgumentParser:
    """The script's options, each with its default in --help."""
    parser = argparse.ArgumentParser(
        prog="first_run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="train.py output folders (with their pipeline saved)")
    parser.add_argument("--samplers", nargs="+", type=sampler, default=[("ddpm", 50)], metavar="NAME:STEPS",
                        help="schedulers and their steps, e.g. ddpm:50 unipc:20 (default: ddpm:50)")  # fmt: skip
    parser.add_argument("--num_samples", type=int, default=500, help="digits per sampler (default: %(default)s)")
    parser.add_argument("--dataset_name", default=DEFAULT_DATASET, help="MNIST: a Hub id or a local copy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and the floor (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the U-Net's dtype (default: fp32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def last_grid(run: Path) -> Path:
    """The run's last sample grid, `samples/step-N.png`."""
    grids = sorted((run / "samples").glob("step-*.png"))
    if not grids:
        raise UsageError(f"{run} has no samples/step-N.png grid; pass a train.py output folder.")
    return grids[-1]


def grid_blobs(grid: Path) -> dict[str, int | str]:
    """The blobs among the digits of a sample grid, cut back into 28x28 tiles."""
    pixels = np.asarray(Image.open(grid).convert("L"))[::SAMPLE_GRID_UPSCALE, ::SAMPLE_GRID_UPSCALE] / 255
    rows, cols = pixels.shape[0] // 28, pixels.shape[1] // 28
    tiles = torch.from_numpy(pixels).float().reshape(rows, 28, cols, 28).permute(0, 2, 1, 3).reshape(-1, 1, 28, 28)
    return {"grid": grid.name, "grid_blobs": int(blob_mask(tiles).sum()), "grid_digits": len(tiles)}


def score_run(run: Path, pipe: DDPMMnistPipeline, args: argparse.Namespace, reference: QualityReference) -> dict:
    """The run's record, its grid's blobs and one entry per sampler."""
    record = json.loads((run / "training.json").read_text())["training"]
    result = {"run": str(run), **{key: record[key] for key in ("images_seen", "training_time", "hardware")}}
    result.update(grid_blobs(last_grid(run)), samplers=[])
    for name, steps in args.samplers:
        images = generate_digits(pipe, args.num_samples, scheduler=name, num_inference_steps=steps, seed=args.seed)
        outputs = classifier_outputs(images, reference.classifier, progress=False)
        quality = sample_quality(outputs, reference.outputs, seed=args.seed)
        result["samplers"].append({
            "sampler": f"{name}:{steps}",
            "readable": (outputs.logits.softmax(1).max(1).values >= READABLE_CONFIDENCE).float().mean().item(),
            "mean_confidence": quality.mean_confidence,
            "fid": quality.fid,
            "fid_vs_floor": quality.fid / reference.floor(args.num_samples).fid,
            "blobs": int(blob_mask(images).sum()),
        })  # fmt: skip
    return result


def markdown_table(results: list[dict]) -> str:
    """One row per run and sampler."""
    rows = [
        [Path(r["run"]).name, f"{r['images_seen']:,}", s["sampler"], f"{s['readable']:.1%}",
         f"{s['mean_confidence']:.3f}", f"{s['fid_vs_floor']:.1f}x", str(s["blobs"]),
         f"{r['grid_blobs']} of {r['grid_digits']}"]
        for r in results for s in r["samplers"]
    ]  # fmt: skip
    header = ["run", "images", "sampler", "readable", "confidence", "FID / floor", "blobs", "grid blobs"]
    return model_card.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runs, pipes = [Path(run) for run in args.runs], []
    with usage_errors("num_samples", "dataset_name"):
        for run in runs:  # every run and sampler is checked before the first digit is drawn
            if not (run / "training.json").is_file():
                raise UsageError(f"{run} has no training.json; pass the output folder of a finished train.py run.")
            last_grid(run)
            pipes.append(load_pipeline(run, dtype=args.dtype))
            for name, steps in args.samplers:
                scheduler_steps(pipes[-1], name, steps)
        reference = QualityReference(args.dataset_name, seed=args.seed)
        floor = reference.floor(args.num_samples)
        results = [score_run(run, pipe, args, reference) for run, pipe in zip(runs, pipes, strict=True)]
    print(markdown_table(results))
    confidence = floor.mean_confidence
    print(f"\nreal floor, {args.num_samples} training digits: FID {floor.fid:.3f}, confidence {confidence:.3f}")
    if args.json:
        print(json.dumps({"floor": floor.as_dict(), "num_samples": args.num_samples, "runs": results}))


if __name__ == "__main__":
    run_entry_point(main, "first_run.py")
