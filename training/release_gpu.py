"""Assemble a release folder on the CPU from what `benchmarks/gpu_run.sh` brought back from a GPU.

    python training/release_gpu.py GPU_RESULTS --output_dir pretrained/ddpm-mnist --hub_model_id ddpm-mnist/ddpm-mnist

GPU_RESULTS is the folder the GPU run wrote: `results.json`, the pipeline archive in parts (`pipeline.tar.gz.00`,
`.01`, ...) and `grid.png` (its `train.log` and `stages.log` are for reading). Nothing is sampled here: the card's
quality is what the GPU measured, the package's metrics on 10,000 samples of the recommended scheduler setting (DDPM
on 50 respaced steps) and on 1,000 of 1000-step DDPM, each beside its real floor, and the exact NLL bound on 1,000 test
digits; its training table (hardware, minutes, images seen, every optimiser setting) is the run's own record, and the
evaluation section adds the exact training command and this release's targets (`TARGETS`, see `ddpm_mnist.targets`),
each met or missed by how much.

The folder is written as `training/release.py` writes one: the pipeline re-saved, the card rendered by
`ddpm_mnist.hub.render_model_card`, and the layout a push uploads (`ddpm_mnist.hub.export_pipeline_folder`), with
`samples/grid.png`. The GPU run brings back no denoising strip and no loss-curve picture, so the card has neither
(the tensorboard logs are in the archive, under `logs/`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tarfile
import tempfile
from dataclasses import fields
from pathlib import Path

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.errors import UsageError, run_entry_point
from ddpm_mnist.hub import CARD_DATASET, export_pipeline_folder, render_model_card
from ddpm_mnist.metrics.quality import SampleQuality
from ddpm_mnist.targets import ReleaseTargets

# The targets of the GPU-trained release, at the recommended scheduler setting: more confident digits than the CPU
# release's, a FID within 1.3x the real-vs-real floor at the same number of images, and an NLL bound of 1.3 bits/dim.
TARGETS = ReleaseTargets(min_confidence=0.97, max_fid_ratio=1.3, max_nll_bpd=1.3)
ROWS = {
    "fid": "FID (classifier features)",
    "kid": "KID",
    "precision": "precision (k=3)",
    "recall": "recall (k=3)",
    "mean_confidence": "mean classifier confidence",
    "class_entropy": "entropy of predicted digits (bits; 3.32 = uniform)",
    "rarest_class_share": "share of the rarest digit",
}
NEEDED_STAGES = ("train", "evaluate_fast", "evaluate_ddpm", "nll", "grid", "archive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="the folder benchmarks/gpu_run.sh wrote (results.json, pipeline.tar.gz.NN, ...)")
    p.add_argument("--output_dir", required=True, help="the release folder to write (must not exist)")
    p.add_argument("--hub_model_id", required=True, help="the Hub id the release would have, user/name")
    return p.parse_args(argv)


def read_results(args: argparse.Namespace) -> tuple[dict, list[Path]]:
    """The run's results and archive parts, once they are a complete GPU run; else a UsageError naming the gap."""
    folder = Path(args.results)
    if not (folder / "results.json").is_file():
        raise UsageError(f"{folder} has no results.json; pass the folder that benchmarks/gpu_run.sh wrote.")
    if Path(args.output_dir).exists():
        raise UsageError(f"--output_dir {args.output_dir} exists; pass a new folder (or remove the old release).")
    results = json.loads((folder / "results.json").read_text())
    stages = results["stages"]
    unfinished = [name for name in NEEDED_STAGES if stages.get(name, {}).get("status") != "ok"]
    if unfinished:
        raise UsageError(f"the GPU run did not finish {', '.join(unfinished)}; see {folder}/stages.log and rerun it.")
    parts = [folder / name for name in stages["archive"]["result"]]
    missing = [part.name for part in parts + [folder / "grid.png"] if not part.is_file()]
    if missing:
        raise UsageError(f"{folder} lacks {', '.join(missing)}; fetch every file the GPU run wrote.")
    return results, parts


def unpack(parts: list[Path], destination: Path) -> Path:
    """Join the archive's parts and extract the run folder into `destination`."""
    archive = destination / "pipeline.tar.gz"
    with open(archive, "wb") as joined:
        for part in parts:
            joined.write(part.read_bytes())
    run = destination / "run"
    with tarfile.open(archive) as tar:
        tar.extractall(run, filter="data")
    return run


def scores(result: dict) -> SampleQuality:
    """The scores in a result of `ddpm-mnist evaluate --json` (or in its "floor")."""
    return SampleQuality(**{field.name: result[field.name] for field in fields(SampleQuality)})


def portable_command(command: list[str]) -> str:
    """The GPU run's training command as a user types it: `accelerate launch`, the Hub's MNIST, a relative folder."""
    script = command.index("training/train.py")
    launch_flags = command[command.index("accelerate.commands.launch") + 1 : script]
    flags = [flag for flag in command[script + 1 :] if not flag.startswith(("--dataset_name=", "--output_dir="))]
    where = ["--dataset_name=ylecun/mnist", "--output_dir=ddpm-mnist"]
    return shlex.join(["accelerate", "launch", *launch_flags, "training/train.py", *where, *flags])


def evaluation_markdown(results: dict) -> str:
    """The card's evaluation section, from the GPU's measurements: quality beside its floors, the bound, targets."""
    stages = results["stages"]
    environment = stages["setup"]["result"]
    columns = {
        f"DDPM, {result['steps']} steps": result
        for result in (stages[s]["result"] for s in ("evaluate_fast", "evaluate_ddpm"))
    }
    header = " | ".join(
        f"{name} (N={r['num_images']}) | real floor (N={r['floor']['num_images']})" for name, r in columns.items()
    )
    rows = [f"| metric | {header} |", "| --- |" + " --- |" * 2 * len(columns)]
    for key, label in ROWS.items():
        cells = " | ".join(f"{r[key]:.4f} | {r['floor'][key]:.4f}" for r in columns.values())
        rows.append(f"| {label} | {cells} |")
    nll = stages["nll"]["result"]
    how = "exact over all T terms" if nll["exact"] else "unbiased estimate from sampled timesteps"
    command = portable_command(stages["train"]["result"]["command"])
    recommended_name, recommended = next(iter(columns.items()))
    return "\n".join(
        [
            f"Measured on the device that trained it ({environment['device']}, {environment['date']}) by "
            "`benchmarks/gpu_run.sh`, with ddpm-mnist's own metrics against the MNIST test digits; samples drawn "
            "with a bf16 U-Net (x_t and the scheduler in fp32). FID and KID use the features of the project's "
            "MNIST classifier, not Inception: compare them with the real-vs-real floor beside them, never with "
            "published FIDs. The `model-index` metadata carries the first column.",
            "",
            *rows,
            "",
            "Predicted digits (share of samples, 0-9):",
            "",
            *(
                f"- {name}: " + " ".join(f"{d}: {s:.3f}" for d, s in enumerate(r["class_histogram"]))
                for name, r in columns.items()
            ),
            "",
            f"NLL bound on {nll['num_images']} test digits ({how}): **{nll['nll_bpd']:.3f} +- "
            f"{nll['nll_bpd_stderr']:.3f} bits/dim** = prior L_T {nll['prior_bpd']:.4f} + diffusion terms "
            f"{nll['diffusion_bpd']:.3f} + decoder L_0 {nll['decoder_bpd']:.3f}.",
            "",
            *TARGETS.markdown(recommended_name, scores(recommended), scores(recommended["floor"]), nll["nll_bpd"]),
            "",
            f"Trained with `{command}` (torch {environment['torch']}, CUDA {environment['cuda'] or 'none'}); the "
            "recipe and its reasons are in `benchmarks/gpu_run.py`.",
        ]
    )


def main(args: argparse.Namespace) -> None:
    results, parts = read_results(args)
    stages = results["stages"]
    fast, nll = stages["evaluate_fast"]["result"], stages["nll"]["result"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        run = unpack(parts, scratch)
        record = json.loads((run / "training.json").read_text())
        pipe = DDPMMnistPipeline.from_pretrained(run)
        staging = scratch / "release"
        pipe.save_pretrained(staging)
        (staging / "samples").mkdir()
        shutil.copyfile(Path(args.results) / "grid.png", staging / "samples" / "grid.png")
        card = render_model_card(
            pipe,
            args.hub_model_id,
            dataset_name=CARD_DATASET,  # the run read a local copy of it
            samples_image="samples/grid.png",
            training=record["training"],
            eval_results={
                "fid": round(fast["fid"], 3),
                "kid": round(fast["kid"], 5),
                "precision": round(fast["precision"], 3),
                "recall": round(fast["recall"], 3),
                "mean_confidence": round(fast["mean_confidence"], 4),
                "nll_bpd": round(nll["nll_bpd"], 3),
            },
            evaluation=evaluation_markdown(results),
        )
        card.save(staging / "README.md")
        partial = Path(f"{args.output_dir}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        export_pipeline_folder(staging, partial)
        partial.rename(args.output_dir)
    print(json.dumps({"output_dir": args.output_dir, "training": record["training"], "fast": fast, "nll": nll}))


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()), "release_gpu.py")
