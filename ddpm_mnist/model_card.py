"""The model card of a `DDPMMnistPipeline`: the one renderer of every card the project writes.

`render_model_card` fills the template (model_cards/ddpm_mnist_card.md) with the Hub metadata (library, task, tags,
dataset and the `model-index` results), the model, both ways to load it, the training record and the evaluation:

    card = render_model_card(pipe, "user/ddpm-mnist", pictures={"grid": "samples/grid.png"})
    card.save("ddpm-mnist/README.md")

`training/train.py` renders it at the end of a run; `training/release.py` again with measured quality, written by
`evaluation_section`. Scores are read by attribute or key: this module imports neither `datasets` nor `torchmetrics`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .schedulers import SCHEDULERS
from .unet_ddpm_mnist import PRESETS

if TYPE_CHECKING:
    from .evaluation import ConditionalQuality
    from .metrics.quality import ClassAccuracy, SampleQuality
    from .targets import ReleaseTargets

# A symlink to model_cards/ddpm_mnist_card.md in a checkout; the file itself in a wheel (package data).
CARD_TEMPLATE = Path(__file__).parent / "model_card_template.md"
CARD_TAGS = ["pytorch", "diffusers", "ddpm", "mnist", "unconditional-image-generation"]
# The Hub has no class-conditional task (DiT's repos carry none): a class-conditional card keeps the unconditional
# task as its pipeline_tag and model-index task, and says what it is with tags.
CONDITIONAL_CARD_TAGS = ["pytorch", "diffusers", "ddpm", "mnist", "class-conditional", "classifier-free-guidance"]
PIPELINE_TAG = "unconditional-image-generation"
CARD_DATASET = "ylecun/mnist"  # the card's dataset when training read a local copy of it
EVAL_SPLIT = "test"  # the MNIST split every score and bound is measured against
DISTRIBUTION = "ddpm-mnist"  # the installed package's name, whose metadata gives the card its home page link
# The pictures a card shows, by the release's file names: samples, one digit denoised from x_T to x_0, the training
# loss, quality against training time, the NLL bound's terms; a class-conditional card's guidance sweep, completions
# and interpolation.
PICTURES = ("grid", "denoising", "loss", "time_to_quality", "nll_terms", "guidance", "completion", "interpolation")
# A class-conditional card interpolates, in its code and picture, at t = T / 4 (250 of 1000): both ends' shapes survive.
INTERPOLATION_T_DIVISOR = 4
# The metrics `eval_results` may hold, in the card's order: (name in the card, decimals it is rounded to).
METRICS = {
    "fid": ("FID", 3), "kid": ("KID", 5), "precision": ("Precision", 3), "recall": ("Recall", 3),
    "mean_confidence": ("Mean classifier confidence", 4), "class_accuracy": ("Class accuracy", 4),
    "nll_bpd": ("NLL (bits/dim)", 3),
}  # fmt: skip
# The sample-quality scores every table of them shows (`SampleQuality`'s fields), with their labels in the card.
QUALITY_ROWS = {
    "fid": "FID (classifier features)",
    "kid": "KID",
    "precision": "precision (k=3)",
    "recall": "recall (k=3)",
    "mean_confidence": "mean classifier confidence",
    "class_entropy": "entropy of predicted digits (bits; 3.32 = uniform)",
    "rarest_class_share": "share of the rarest digit",
}


def render_model_card(
    pipeline: DDPMMnistPipeline,
    repo_id: str,
    *,
    dataset_name: str = CARD_DATASET,
    pictures: Mapping[str, str] | None = None,
    recommended_scheduler: tuple[str | None, int] | None = None,
    recommended_guidance_scale: float | None = None,
    training: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, float] | None = None,
    evaluation: str | None = None,
) -> ModelCard:
    """The model card of a pipeline: Hub metadata, the model, both ways to load it, training and evaluation.

    Args:
        pipeline: the pipeline the card describes (its UNet and scheduler configs fill the model's table).
        repo_id: the Hub id the card's code loads, user/name.
        dataset_name: the training data; a local copy is named by its Hub id, `CARD_DATASET`.
        pictures: paths inside the repo by the names of `PICTURES`, e.g. {"grid": "samples/grid.png"}.
        recommended_scheduler: (scheduler name, steps) the evaluation supports, used in the card's code; by default
            the paper's DDPM on all T steps. A name of None is the pipeline's own scheduler, as a distilled student's.
        recommended_guidance_scale: the classifier-free guidance a class-conditional card's code draws with (None:
            none). Its code also completes and interpolates digits, the latter at t = T / `INTERPOLATION_T_DIVISOR`.
        training: the run's training record (None: a pipeline pushed from memory), or a distillation's (with
            `pretrained_teacher_model`, see `training/distill.py`), which the card describes as a student's.
        eval_results: scores by `METRICS` key, rounded to each metric's digits into the `model-index` metadata and,
            unless `evaluation` is given, into a table of their own.
        evaluation: Markdown for the card's evaluation section (see `evaluation_section`).
    """
    pictures = dict(pictures or {})
    for kind, given, known in [("pictures", pictures, PICTURES), ("metrics", eval_results or {}, METRICS)]:
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown {kind} {', '.join(unknown)}; the card knows {', '.join(known)}.")
    scores = {key: round(value, METRICS[key][1]) for key, value in (eval_results or {}).items()}
    is_hub_dataset = "/" in dataset_name and not os.path.exists(dataset_name)
    dataset_id = dataset_name if is_hub_dataset else CARD_DATASET
    model_name = repo_id.split("/")[-1]
    conditional = pipeline.is_class_conditional
    task_name = "Class-conditional image generation" if conditional else "Unconditional image generation"
    task = dict(task_type=PIPELINE_TAG, task_name=task_name, dataset_type=dataset_id, dataset_name="MNIST")
    results = [
        EvalResult(**task, dataset_split=EVAL_SPLIT, metric_type=key, metric_name=METRICS[key][0], metric_value=value)
        for key, value in scores.items()
    ]
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag=PIPELINE_TAG, license="apache-2.0",
        tags=CONDITIONAL_CARD_TAGS if conditional else CARD_TAGS, datasets=[dataset_id], model_name=model_name,
        eval_results=results or None,
    )  # fmt: skip
    unet_config, schedule = pipeline.unet.config, pipeline.scheduler.config
    scheduler_name, recommended_steps = recommended_scheduler or ("ddpm", schedule.num_train_timesteps)
    # The class a conditional card's code swaps in; none for ddpm or None, the pipeline's own scheduler.
    own = scheduler_name in (None, "ddpm")
    scheduler_class = None if own else SCHEDULERS[scheduler_name].scheduler_class.__name__
    # The pipeline's own scheduler when it is one of diffusers' (a distilled student's DDIM), named in the card.
    from_diffusers = type(pipeline.scheduler).__module__.startswith("diffusers.")
    own_scheduler = type(pipeline.scheduler).__name__ if scheduler_name is None and from_diffusers else None
    distillation = training if training and "pretrained_teacher_model" in training else None  # a student's run
    guided_student = bool(distillation and conditional and distillation["guidance_scale"] > 1)
    # The package's home page (`url` in setup.py) from its installed metadata; none when unset or not installed.
    try:
        homepage = importlib.metadata.metadata(DISTRIBUTION).get("Home-page")
    except importlib.metadata.PackageNotFoundError:
        homepage = None
    preset = "custom"  # unless the UNet was built from one of the `DDPMMnistUNet` presets
    for name, values in PRESETS.items():
        if all(json.dumps(unet_config.get(key)) == json.dumps(value) for key, value in values.items()):
            preset = name
            break
    return ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE), model_name=model_name, repo_id=repo_id, homepage=homepage,
        dataset_name=dataset_id, local_dataset=not is_hub_dataset,  # the card names the Hub dataset, never a local path
        pictures=pictures, recommended_scheduler=scheduler_name, recommended_steps=recommended_steps,
        own_scheduler=own_scheduler, distillation=distillation, guided_student=guided_student,
        class_conditional=conditional, scheduler_class=scheduler_class, guidance_scale=recommended_guidance_scale,
        interpolation_t=schedule.num_train_timesteps // INTERPOLATION_T_DIVISOR, evaluation=evaluation,
        preset=preset, num_parameters=f"{sum(p.numel() for p in pipeline.unet.parameters()):,}",
        sample_size=unet_config.sample_size, image_size=pipeline.config.image_size,
        num_train_timesteps=schedule.num_train_timesteps, ddim_steps=min(50, schedule.num_train_timesteps),
        beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        prediction_type=schedule.prediction_type, variance_type=schedule.get("variance_type"), training=training,
        eval_results={METRICS[key][0]: value for key, value in scores.items()}, eval_split=EVAL_SPLIT,
    )  # fmt: skip


def model_index_results(scores: Mapping[str, Any], nll_bpd: float) -> dict[str, float]:
    """A release's `eval_results`: the `METRICS` among its recommended setting's scores (JSON) and the NLL bound."""
    return {**{key: scores[key] for key in METRICS if key in scores}, "nll_bpd": nll_bpd}


def evaluation_section(
    intro: str,
    results: Mapping[str, tuple[SampleQuality | ConditionalQuality, SampleQuality]],
    nll: Mapping[str, Any],
    targets: ReleaseTargets,
    *,
    seed_spread: Sequence[SampleQuality | ConditionalQuality] = (),
    guidance_scale: float | None = None,
    sweep: Mapping[float, ConditionalQuality] | None = None,
    sweep_floor: SampleQuality | None = None,
    closing: Sequence[str] = (),
) -> str:
    """The card's evaluation section: a table of every setting beside its floor, the bound and the targets.

    Args:
        intro: the opening paragraph: how and where the scores were measured.
        results: (scores, real-vs-real floor at as many digits) by setting name, the recommended setting first; the
            scores are a `SampleQuality`, or for a class-conditional release a `ConditionalQuality`.
        nll: the NLL bound, `VariationalBound.summary()`, with `num_timesteps` (per digit) where it is not exact.
        targets: the release's targets, checked at the recommended setting.
        seed_spread: the recommended setting's scores at further seeds: the card adds how far they move.
        guidance_scale: a class-conditional release's guidance, every setting's (None: an unconditional release);
            the section adds the class accuracy of every setting, overall and per digit.
        sweep: its scores at each guidance scale of its sweep, against `sweep_floor` (None or empty: no sweep).
        closing: paragraphs to end the section with.
    """
    conditional = guidance_scale is not None
    qualities = {name: (s.quality if conditional else s, floor) for name, (s, floor) in results.items()}
    name, (recommended, floor) = next(iter(qualities.items()))
    accuracy = results[name][0].accuracy if conditional else None
    sampled = nll.get("num_timesteps", "sampled")
    how = "exact over all T terms" if nll["exact"] else f"unbiased estimate from {sampled} timesteps"
    bound = (
        f"NLL bound on {nll['num_images']} test digits ({how}): **{nll['nll_bpd']:.3f} +- "
        f"{nll['nll_bpd_stderr']:.3f} bits/dim** = prior L_T {nll['prior_bpd']:.4f} + diffusion terms "
        f"{nll['diffusion_bpd']:.3f} + decoder L_0 {nll['decoder_bpd']:.3f}."
    )
    paragraphs = [intro]
    if conditional:
        paragraphs.append(
            "Every setting draws balanced labels (each digit a tenth of the samples, in order) with classifier-free "
            f"guidance at scale {guidance_scale:g}. The class accuracy is the share of the samples that the "
            "classifier reads as the digit they were drawn as."
        )
        bound += (
            " It bounds the model's unconditional p(x): the U-Net is called without labels, that is with its null "
            "class."
        )
    paragraphs.append(quality_table(qualities))
    if conditional:
        paragraphs.append(class_accuracy_table(results))
    if sweep:
        paragraphs.append(sweep_table(sweep, sweep_floor))
    verdicts = targets.markdown(name, recommended, floor, nll_bpd=nll["nll_bpd"], accuracy=accuracy)
    paragraphs += [bound, "\n".join(verdicts)]
    if seed_spread:
        spread = [s.quality for s in seed_spread] if conditional else seed_spread
        accuracies = [accuracy, *(s.accuracy for s in seed_spread)] if conditional else ()
        paragraphs.append(seed_spread_line(targets, recommended, spread, floor, accuracies))
    return "\n\n".join([*paragraphs, *closing])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of `header` and `rows` of cells."""
    return "\n".join(["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows]])


@contextmanager
def figure(path: str | os.PathLike, size: tuple[float, float], ncols: int = 1, grid: str = "major") -> Iterator[Any]:
    """The axes of a new figure (`ncols` side by side, `size` in inches, 120 dpi), saved into `path` with a light grid
    once drawn: a card's picture. A matplotlib `Figure` of its own, so no pyplot state or backend is touched."""
    from matplotlib.figure import Figure  # matplotlib comes with the `train` extra

    fig = Figure(figsize=size, dpi=120)
    yield fig.subplots(1, ncols)
    for ax in fig.axes:
        ax.grid(alpha=0.3, which=grid)
    fig.tight_layout()
    fig.savefig(path)


def quality_table(results: Mapping[str, tuple[SampleQuality, SampleQuality]]) -> str:
    """Every setting's `QUALITY_ROWS` beside its real-vs-real floor, then its share of each predicted digit."""
    header, columns, histograms = ["metric"], [], []
    for name, (quality, floor) in results.items():
        header += [f"{name} (N={quality.num_images})", f"real floor (N={floor.num_images})"]
        columns += [quality, floor]
        histograms.append(f"- {name}: " + " ".join(f"{d}: {x:.3f}" for d, x in enumerate(quality.class_histogram)))
    rows = [[label, *(f"{getattr(q, key):.4f}" for q in columns)] for key, label in QUALITY_ROWS.items()]
    return "\n".join([markdown_table(header, rows), "", "Predicted digits (share of samples, 0-9):", "", *histograms])


def class_accuracy_table(results: Mapping[str, tuple[ConditionalQuality, SampleQuality]]) -> str:
    """The card's table of the class accuracy of every setting, overall and for each digit asked for."""
    rows = []
    for name, (scores, _) in results.items():
        shares = [scores.accuracy.accuracy, *scores.accuracy.per_class]
        rows.append([f"{name} (N={scores.quality.num_images})", *(f"{share:.1%}" for share in shares)])
    table = markdown_table(["setting", "all digits", *map(str, range(10))], rows)
    return f"Class accuracy, overall and for each digit asked for:\n\n{table}"


def sweep_table(sweep: Mapping[float, ConditionalQuality], floor: SampleQuality) -> str:
    """The card's table of the guidance sweep: each scale's FID (also over the floor), accuracy and confidence."""
    rows = []
    for scale, scores in sweep.items():
        q, a = scores.quality, scores.accuracy.accuracy
        rows.append([f"{scale:g}", f"{q.fid:.2f}", f"{q.fid / floor.fid:.2f}", f"{a:.1%}", f"{q.mean_confidence:.3f}"])
    header = ["guidance scale", "FID", "FID / floor", "class accuracy", "mean confidence"]
    return (
        f"Guidance sweep at the recommended scheduler setting: {floor.num_images} samples per scale, balanced labels, "
        f"one seed for all scales, against a real-vs-real floor of FID {floor.fid:.2f} at the same N:\n\n"
        + markdown_table(header, rows)
    )


def seed_spread_line(
    targets: ReleaseTargets,
    quality: SampleQuality,
    spread: Sequence[SampleQuality],
    floor: SampleQuality,
    accuracies: Sequence[ClassAccuracy] = (),
) -> str:
    """How the recommended setting's metrics move over seeds, as ranges, with the seeds that meet every `targets`.

    `quality` is the card's seed, `spread` the next seeds (as many samples each), all against the same floor. For a
    class-conditional release, `accuracies` are the class accuracies of those seeds, the card's first: the line gives
    their range instead of the rarest digit's share.
    """
    runs = [quality, *spread]

    def span(values: list[float], spec: str) -> str:  # one value where the seeds agree to the digits shown
        low, high = f"{min(values):{spec}}", f"{max(values):{spec}}"
        return low if low == high else f"{low} to {high}"

    ratios = [q.fid / floor.fid for q in runs]
    per_seed = accuracies or [None] * len(runs)
    met = sum(targets.all_met(q, floor, accuracy=a) for q, a in zip(runs, per_seed, strict=True))
    if accuracies:
        third = f"class accuracy {span([a.accuracy for a in accuracies], '.1%')}"
    else:
        third = f"a rarest digit at {span([min(q.class_histogram) for q in runs], '.1%')}"
    return (
        f"Seed to seed: {quality.num_images} samples from each of {len(runs)} seeds (the card's and the next "
        f"{len(spread)}) give FID {span([q.fid for q in runs], '.2f')} ({span(ratios, '.2f')}x the floor, mean "
        f"{sum(ratios) / len(runs):.2f}x), mean confidence {span([q.mean_confidence for q in runs], '.3f')} and "
        f"{third}; every target is met at {met} of these {len(runs)} seeds. The verdicts above are the card's seed "
        "alone, and every ratio uses the one floor above (itself one draw of real digits)."
    )
