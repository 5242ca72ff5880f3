"""Class accuracy against variety for class-conditional models: guidance scale x interval x guide model, and training.

    python benchmarks/guidance_quality.py runs/cond-teacher path/to/previous-release \\
        --guidance_scales 1 1.5 2 3 --guidance_intervals all 82:581 --seeds 0 1 --output_dir runs/guidance

Each MODEL is a pipeline folder (or Hub repo id) or a checkpoint folder of `training/train.py`
(`checkpoints/checkpoint-N`, scored with its EMA weights). Every cell (model, guide, interval, scale, seed) draws
--num_samples digits with balanced labels (each digit equally often) from one generator seeded with the seed, with
--scheduler on --num_inference_steps, the UNet in --dtype, and scores them against the MNIST test digits with the
package's classifier: class accuracy (overall and per digit), mean confidence, FID beside the real floor at the same N.

The guide is what a guided step moves away from: `null` is classifier-free guidance (Ho & Salimans 2022), the model's
own null class; a pipeline folder is autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version
of Itself"): eps = eps_weak(x_t, y) + s (eps(x_t, y) - eps_weak(x_t, y)), the weak model given the same digit. An
interval `low:high` guides only the steps whose timestep t lies in [low, high] (Kynkaanniemi et al. 2024); `all`
guides every step.

It writes `guidance_quality.json` (settings, machine, floor, every cell) into --output_dir, and a figure: with
`--figure tradeoff`, class accuracy against FID / floor, one curve per (model, guide, interval) over the scales, each
point the mean over the seeds; with `--figure training`, both against the images each checkpoint had seen. FIDs come
from the project's MNIST classifier, not Inception: compare them only with each other and with the floor.
`--include` joins the cells of earlier runs of the same setting (say, a released model's curve beside a new one's).
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import product
from pathlib import Path

import torch
from diffusers import ModelMixin
from torch import Tensor

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.data import DEFAULT_DATASET
from ddpm_mnist.errors import UsageError, run_entry_point, usage_errors
from ddpm_mnist.evaluation import DTYPES, QualityReference, generate_digits, load_pipeline
from ddpm_mnist.hardware import describe_device
from ddpm_mnist.metrics.quality import balanced_class_labels
from ddpm_mnist.model_card import figure
from ddpm_mnist.schedulers import SCHEDULERS
from ddpm_mnist.training_utils import SETTINGS_FILE, recorded_settings

NULL_GUIDE = "null"  # classifier-free guidance: the model's own null class is the guide
# What results joined by --include share with this run: the cells' digits and the floor are drawn alike.
SAME_SETTING = ("num_samples", "scheduler", "num_inference_steps", "dtype", "dataset_name")
RUN_SETTINGS = ("models", "guides", "guidance_scales", "guidance_intervals", "seeds", "device")  # each run's own


class AutoGuidedPipeline(DDPMMnistPipeline):
    """`DDPMMnistPipeline` whose guided steps move away from a weaker model's conditional prediction instead of the
    null class (autoguidance, Karras et al. 2024, eq. 2 in eps form)."""

    def __init__(
        self, unet: ModelMixin, scheduler: DDPMMnistScheduler, guide_unet: ModelMixin, image_size: int = 28
    ) -> None:
        super().__init__(unet=unet, scheduler=scheduler, image_size=image_size)
        self.register_modules(guide_unet=guide_unet)

    def predict_noise(
        self, x_t: Tensor, t: Tensor | int, class_labels: Tensor | None = None, guidance_scale: float = 1.0
    ) -> Tensor:
        """eps_weak(x_t, y) + s (eps(x_t, y) - eps_weak(x_t, y)) when guided, else the model's own prediction."""
        eps = super().predict_noise(x_t, t, class_labels)
        if class_labels is None or guidance_scale <= 1:
            return eps
        eps_weak = self.guide_unet(x_t.to(self.guide_unet.dtype), t, class_labels=class_labels).sample.float()
        return eps_weak + guidance_scale * (eps - eps_weak)


def load_model(name: str, dtype: str) -> tuple[DDPMMnistPipeline, dict]:
    """A pipeline folder or repo id as saved, or a train.py checkpoint with its EMA weights; and what it had trained
    (`global_step`, `images_seen`, `train_minutes`; empty for a pipeline folder)."""
    checkpoint = Path(name)
    if not (checkpoint / SETTINGS_FILE).is_file():
        return load_pipeline(name, dtype=dtype), {}
    settings = recorded_settings(checkpoint)
    unet = DDPMMnistUNet.from_config(settings["unet_config"])
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)  # the first registered: the EMA
    if "shadow_params" not in ema:
        raise ValueError(f"{checkpoint} holds no EMA weights (a run without EMA); score its pipeline folder instead.")
    for param, shadow in zip(unet.parameters(), ema["shadow_params"], strict=True):
        param.data.copy_(shadow)
    progress = torch.load(checkpoint / "custom_checkpoint_1.pkl", weights_only=True)  # then TrainingProgress
    kinds = {key: settings[key] for key in ("prediction_type", "variance_type")}
    scheduler = DDPMMnistScheduler(settings["ddpm_num_steps"], beta_schedule=settings["ddpm_beta_schedule"], **kinds)
    pipe = DDPMMnistPipeline(unet=unet.to(DTYPES[dtype]).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    batch = settings["train_batch_size"] * settings["num_processes"] * settings["gradient_accumulation_steps"]
    step = int(progress["global_step"])
    return pipe, {"global_step": step, "images_seen": step * batch, "train_minutes": progress["train_seconds"] / 60}


def parse_interval(text: str) -> tuple[int, int] | None:
    """`all` (None: every step) or `low:high`."""
    if text == "all":
        return None
    try:
        low, high = (int(t) for t in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval; pass all or low:high, e.g. 82:581") from None
    return low, high


def build_parser() -> argparse.ArgumentParser:
    """The script's options, each with its default in --help."""
    parser = argparse.ArgumentParser(
        prog="guidance_quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("models", nargs="*", metavar="MODEL", help="pipeline folders or repo ids, or train.py checkpoint folders")
    add("--include", nargs="+", type=Path, default=[], help="earlier guidance_quality.json files of the same setting")
    add("--guidance_scales", nargs="+", type=float, default=[1.0, 2.0], help="(default: %(default)s)")
    add("--guidance_intervals", nargs="+", type=parse_interval, default=[None], help="all or low:high (default: all)")
    add("--guides", nargs="+", default=[NULL_GUIDE], help="null, or weak pipeline folders (default: %(default)s)")
    add("--seeds", nargs="+", type=int, default=[0], help="sampling seeds (default: %(default)s)")
    add("--num_samples", type=int, default=1000, help="digits per cell, balanced labels (default: %(default)s)")
    add("--scheduler", choices=SCHEDULERS, default="unipc", help="(default: %(default)s)")
    add("--num_inference_steps", type=int, default=20, help="(default: %(default)s)")
    add("--dtype", choices=DTYPES, default="bf16", help="the UNets' dtype (default: %(default)s)")
    add("--batch_size", type=int, default=250, help="images per pipeline call (default: %(default)s)")
    add("--dataset_name", default=DEFAULT_DATASET, help="MNIST: a Hub id or a local copy (default: %(default)s)")
    add("--figure", choices=["tradeoff", "training"], default="tradeoff", help="(default: %(default)s)")
    add("--output_dir", type=Path, required=True, help="where the JSON and the figure go")
    return parser


def score_cells(
    args: argparse.Namespace,
    models: dict[str, tuple[DDPMMnistPipeline, dict]],
    guides: dict[str, DDPMMnistPipeline | None],
    reference: QualityReference,
    floor_fid: float,
) -> list[dict]:
    """Every cell, model by model, printed as it is scored. Scale 1 (no guidance) is drawn once per model and seed,
    under the first guide and interval: the digits are the same under any."""
    labels = balanced_class_labels(args.num_samples)
    sampling = {key: getattr(args, key) for key in ("num_samples", "scheduler", "num_inference_steps", "batch_size")}
    sampling.update(class_labels=labels, progress=False)
    cells = []
    for model, (pipe, trained) in models.items():
        settings = product(guides.items(), args.guidance_intervals, args.guidance_scales, args.seeds)
        for (guide_name, guide), interval, scale, seed in settings:
            if scale == 1 and (guide_name, interval) != (args.guides[0], args.guidance_intervals[0]):
                continue
            guided = pipe
            if guide is not None:
                guided = AutoGuidedPipeline(pipe.unet, pipe.scheduler, guide.unet, pipe.config.image_size)
            guided.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            samples = generate_digits(guided, **sampling, seed=seed, guidance_scale=scale, guidance_interval=interval)
            seconds = time.perf_counter() - start
            scores = reference.score_conditional(samples, labels).as_dict()
            cell = dict(model=model, guide=guide_name, guidance_interval=interval, guidance_scale=scale, seed=seed)
            cell.update(sampling_seconds=round(seconds, 1), **trained, **scores)
            cell["fid_over_floor"] = scores["fid"] / floor_fid
            cells.append(cell)
            print(
                f"{model} guide={guide_name} interval={interval or 'all'} scale={scale:g} seed={seed}: accuracy "
                f"{cell['class_accuracy']:.4f} (worst digit {min(cell['class_accuracy_per_digit']):.2f}), "
                f"confidence {cell['mean_confidence']:.4f}, FID {cell['fid']:.3f} = {cell['fid_over_floor']:.2f}x "
                f"floor, {seconds:.0f} s",
                flush=True,
            )
    return cells


def curve_name(cell: dict) -> str:
    """The legend of the curve a cell belongs to."""
    interval = cell["guidance_interval"]
    interval = "every step" if interval is None else f"t in [{interval[0]}, {interval[1]}]"
    guide = "null class" if cell["guide"] == NULL_GUIDE else f"autoguidance by {cell['guide']}"
    return f"{cell['model']}, {guide}, {interval}"


def mean_over_seeds(cells: list[dict], key: tuple[str, ...]) -> dict[tuple, dict[str, float]]:
    """Class accuracy and FID / floor averaged over the seeds, per value of the cells' `key` fields."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault(tuple(str(cell[k]) for k in key), []).append(cell)
    return {
        group: {
            name: sum(c[name] for c in members) / len(members)
            for name in ("class_accuracy", "fid_over_floor", "images_seen", "guidance_scale")
            if name in members[0]
        }
        for group, members in groups.items()
    }


def save_figure(cells: list[dict], kind: str, path: Path) -> None:
    """The trade-off (accuracy against FID / floor over the scales) or the training curve (both against the images
    seen, checkpoints only)."""
    for cell in cells:
        cell["curve"] = curve_name(cell)
    if kind == "tradeoff":
        with figure(path, (7, 5)) as ax:
            points = mean_over_seeds(cells, ("curve", "guidance_scale"))
            for curve in dict.fromkeys(c["curve"] for c in cells):
                curve_points = [p for (name, _), p in points.items() if name == curve]
                xs, ys = [p["fid_over_floor"] for p in curve_points], [p["class_accuracy"] for p in curve_points]
                ax.plot(xs, ys, "o-", label=curve)
                for p, xy in zip(curve_points, zip(xs, ys, strict=True), strict=True):
                    ax.annotate(f"{p['guidance_scale']:g}", xy, textcoords="offset points", xytext=(4, -10), fontsize=7)
            ax.axvline(1.0, linestyle="--", color="grey", label="real floor")
            ax.set(xlabel="FID / real floor (lower is better)", ylabel="class accuracy")
            ax.set_title("guidance scale by each point")
            ax.legend(fontsize=7)
        return
    with figure(path, (10, 4), ncols=2) as axes:
        checkpoints = [cell for cell in cells if "images_seen" in cell]
        points = mean_over_seeds(checkpoints, ("guide", "guidance_interval", "guidance_scale", "images_seen"))
        for setting in dict.fromkeys(key[:3] for key in points):
            rows = sorted((p for key, p in points.items() if key[:3] == setting), key=lambda p: p["images_seen"])
            interval = "" if setting[1] == "None" else f", t in {setting[1]}"
            for ax, metric in zip(axes, ("class_accuracy", "fid_over_floor"), strict=True):
                label = f"guidance {setting[2]}{interval}"
                ax.plot([p["images_seen"] / 1000 for p in rows], [p[metric] for p in rows], "o-", label=label)
                ax.set(xlabel="images seen (thousands)", ylabel=metric.replace("_", " "))
        axes[1].axhline(1.0, linestyle="--", color="grey", label="real floor")
        axes[0].legend(fontsize=7)


def main(argv: list[str] | None = None) -> None:
    """Check the options, load the reference and the floor, score every cell, write the JSON and the figure."""
    args = build_parser().parse_args(argv)
    if args.num_samples < 10 or args.batch_size < 1:
        raise UsageError("--num_samples must be at least 10 (one per digit) and --batch_size at least 1.")
    if not args.models and not args.include:
        raise UsageError("no MODEL to score; pass pipeline or checkpoint folders, or --include earlier results.")
    with usage_errors("include"):
        included = [json.loads(path.read_text()) for path in args.include]
    for path, other in zip(args.include, included, strict=True):
        if not isinstance(other, dict) or not {*SAME_SETTING, "cells", "models"} <= other.keys():
            raise UsageError(f"--include {path} is not a guidance_quality.json; pass a file this script wrote.")
        if [other[k] for k in SAME_SETTING] != [getattr(args, k) for k in SAME_SETTING]:
            raise UsageError(f"--include {path} has another {', '.join(SAME_SETTING)}; include results of this one.")
    with usage_errors("dataset_name", "num_samples"):
        models = {name: load_model(name, args.dtype) for name in args.models}
        guides = {name: None if name == NULL_GUIDE else load_model(name, args.dtype)[0] for name in args.guides}
        labels = balanced_class_labels(args.num_samples)
        for name, pipe in [(name, pipe) for name, (pipe, _) in models.items()] + list(guides.items()):
            if pipe is not None and not pipe.is_class_conditional:
                raise UsageError(f"{name} is not class-conditional; pass class-conditional models and guides.")
        model_timesteps = {pipe.scheduler.config.num_train_timesteps for pipe, _ in models.values()}
        for name, guide in guides.items():
            if guide is not None and model_timesteps - {guide.scheduler.config.num_train_timesteps}:
                raise UsageError(
                    f"guide {name} has another number of timesteps than the models; pass one that matches."
                )
        for (pipe, _), scale, interval in product(models.values(), args.guidance_scales, args.guidance_intervals):
            pipe.check_class_inputs(labels, scale, args.num_samples, interval)
        reference = QualityReference(args.dataset_name, progress=False)
        floor = reference.floor(args.num_samples)
    device = describe_device("cpu")
    print(f"device: {device}; real floor FID at N={args.num_samples}: {floor.fid:.3f}", flush=True)
    cells = [cell for other in included for cell in other["cells"]]
    for cell in cells:  # JSON gives lists; a new cell's interval is a tuple, and the figure groups by both alike
        cell["guidance_interval"] = cell["guidance_interval"] and tuple(cell["guidance_interval"])
    cells += score_cells(args, models, guides, reference, floor.fid)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs = [run for other in included for run in other.get("runs", [{k: other.get(k) for k in RUN_SETTINGS}])]
    runs.append({k: device if k == "device" else getattr(args, k) for k in RUN_SETTINGS})
    models = list(dict.fromkeys(model for run in runs for model in run["models"]))
    result = {"models": models, **{k: getattr(args, k) for k in SAME_SETTING}, "floor": floor.as_dict()}
    result.update(runs=runs, cells=cells)
    (args.output_dir / "guidance_quality.json").write_text(json.dumps(result, indent=1))
    save_figure(cells, args.figure, args.output_dir / "guidance_quality.png")
    print(f"wrote {args.output_dir / 'guidance_quality.json'} and guidance_quality.png")


if __name__ == "__main__":
    run_entry_point(main, "guidance_quality.py")
