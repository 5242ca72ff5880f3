"""The model card of a `DDPMMnistPipeline`: the one renderer of every card the project writes.

`render_model_card` fills the template (model_cards/ddpm_mnist_card.md) with the Hub metadata (library, task, tags,
dataset and the `model-index` results), the model, both ways to load it, the training record and the evaluation:

    card = render_model_card(pipe, "user/ddpm-mnist", pictures={"grid": "samples/grid.png"})
    card.save("ddpm-mnist/README.md")

`training/train.py` renders it at the end of a run (`ddpm_mnist.hub.save_training_run`); `training/release.py` renders
it again with measured quality, from a run it scores itself or from the results of a GPU run. Both write the
evaluation section with `evaluation_section`: each scheduler setting's scores beside the real-vs-real floor, the share
of each predicted digit, the NLL bound and the release's targets (`ddpm_mnist.targets`), and for a class-conditional
release the class accuracy and the guidance sweep (`ClassResults`).

Rendering needs only huggingface_hub and the pipeline's configs: scores are read by attribute (`SampleQuality`,
`ClassAccuracy`) or by key (their JSON), so this module imports neither `datasets` nor `torchmetrics`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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
# The Hub has no class-conditional task: its image-generation tasks take a prompt (text-to-image), an image
# (image-to-image) or nothing (unconditional-image-generation), and DiT's class-conditional repos carry no task of
# their own. A digit label is neither text nor an image, so a class-conditional card keeps the unconditional task as
# its pipeline_tag (and model-index task) and says what it is with tags.
CONDITIONAL_CARD_TAGS = ["pytorch", "diffusers", "ddpm", "mnist", "class-conditional", "classifier-free-guidance"]
PIPELINE_TAG = "unconditional-image-generation"
CARD_DATASET = "ylecun/mnist"  # the card's dataset when training read a local copy of it
EVAL_SPLIT = "test"  # the MNIST split every score and bound is measured against
DISTRIBUTION = "ddpm-mnist"  # the installed package's name, whose metadata gives the card its home page link
# The pictures a card shows, by the name `render_model_card` takes each under (the release's file names): samples
# (for a class-conditional pipeline one row per digit), one digit denoised from x_T to x_0, the training loss, quality
# against training time, the per-timestep terms of the NLL bound, and a class-conditional card's guidance sweep, test
# digits completed from their top half and an interpolation between two test digits.
PICTURES = ("grid", "denoising", "loss", "time_to_quality", "nll_terms", "guidance", "completion", "interpolation")
# The timestep a class-conditional card interpolates at, in its code and its picture: T / 4, where the shapes of both
# ends survive (t = 250 of 1000).
INTERPOLATION_T_DIVISOR = 4


class Metric(NamedTuple):
    """A metric of the `model-index` metadata: its name in the card, and the decimals it is rounded to."""

    name: str
    digits: int


# The metrics a card's `eval_results` may hold, by key, in the order the card lists them.
METRICS = {
    "fid": Metric("FID", 3),
    "kid": Metric("KID", 5),
    "precision": Metric("Precision", 3),
    "recall": Metric("Recall", 3),
    "mean_confidence": Metric("Mean classifier confidence", 4),
    "class_accuracy": Metric("Class accuracy", 4),
    "nll_bpd": Metric("NLL (bits/dim)", 3),
}
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
    recommended_scheduler: tuple[str, int] | None = None,
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
            the paper's DDPM on all T steps.
        recommended_guidance_scale: the classifier-free guidance a class-conditional card's code draws with (None:
            none). Its code also completes and interpolates digits, the latter at t = T / `INTERPOLATION_T_DIVISOR`.
        training: the run's training record (None: a pipeline pushed from memory).
        eval_results: scores by `METRICS` key, rounded to each metric's digits into the `model-index` metadata and,
            unless `evaluation` is given, into a table of their own.
        evaluation: Markdown for the card's evaluation section (see `evaluation_section`).
    """
    pictures = dict(pictures or {})
    for kind, given, known in [("pictures", pictures, PICTURES), ("metrics", eval_results or {}, METRICS)]:
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown {kind} {', '.join(unknown)}; the card knows {', '.join(known)}.")
    scores = {key: round(value, METRICS[key].digits) for key, value in (eval_results or {}).items()}
    is_hub_dataset = "/" in dataset_name and not os.path.exists(dataset_name)
    dataset_id = dataset_name if is_hub_dataset else CARD_DATASET
    model_name = repo_id.split("/")[-1]
    conditional = pipeline.is_class_conditional
    results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name="Class-conditional image generation" if conditional else "Unconditional image generation",
            dataset_type=dataset_id,
            dataset_name="MNIST",
            dataset_split=EVAL_SPLIT,
            metric_type=key,
            metric_name=METRICS[key].name,
            metric_value=value,
        )
        for key, value in scores.items()
    ]
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        license="apache-2.0",
        tags=CONDITIONAL_CARD_TAGS if conditional else CARD_TAGS,
        datasets=[dataset_id],
        model_name=model_name,
        eval_results=results or None,
    )
    unet_config, schedule = pipeline.unet.config, pipeline.scheduler.config
    scheduler_name, recommended_steps = recommended_scheduler or ("ddpm", schedule.num_train_timesteps)
    # The class a conditional card's code swaps in; none for ddpm, the pipeline's own scheduler.
    scheduler_class = None if scheduler_name == "ddpm" else SCHEDULERS[scheduler_name].scheduler_class.__name__
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        homepage=_homepage(),
        dataset_name=dataset_id,
        local_dataset=not is_hub_dataset,  # the card names the Hub dataset, never the local path
        pictures=pictures,
        recommended_scheduler=scheduler_name,
        recommended_steps=recommended_steps,
        class_conditional=conditional,
        scheduler_class=scheduler_class,
        guidance_scale=recommended_guidance_scale,
        interpolation_t=schedule.num_train_timesteps // INTERPOLATION_T_DIVISOR,
        evaluation=evaluation,
        preset=_preset_name(dict(unet_config)),
        num_parameters=f"{sum(p.numel() for p in pipeline.unet.parameters()):,}",
        sample_size=unet_config.sample_size,
        image_size=pipeline.config.image_size,
        num_train_timesteps=schedule.num_train_timesteps,
        ddim_steps=min(50, schedule.num_train_timesteps),
        beta_schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        prediction_type=schedule.prediction_type,
        variance_type=schedule.get("variance_type"),
        training=training,
        eval_results={METRICS[key].name: value for key, value in scores.items()},
        eval_split=EVAL_SPLIT,
    )


def _homepage() -> str | None:
    """The package's home page (`url` in setup.py) from its installed metadata; None when unset or not installed."""
    try:
        return importlib.metadata.metadata(DISTRIBUTION).get("Home-page")
    except importlib.metadata.PackageNotFoundError:
        return None


def _preset_name(unet_config: dict[str, Any]) -> str:
    """The `DDPMMnistUNet` preset a UNet config was built from, or "custom"."""
    for name, preset in PRESETS.items():
        if all(json.dumps(unet_config.get(key)) == json.dumps(value) for key, value in preset.items()):
            return name
    return "custom"


def model_index_results(scores: Mapping[str, Any], nll_bpd: float) -> dict[str, float]:
    """A release's `eval_results`: the `METRICS` among its recommended setting's scores as JSON
    (`SampleQuality.as_dict()`, or `ConditionalQuality.as_dict()` with the class accuracy), and the NLL bound."""
    return {**{key: scores[key] for key in METRICS if key in scores}, "nll_bpd": nll_bpd}


@dataclass
class ClassResults:
    """What a class-conditional release measures beyond the scores of any release.

    Args:
        guidance_scale: the guidance every setting drew with, the card's recommendation.
        accuracies: the class accuracy of each setting, by the names of the settings' scores.
        spread: the class accuracy of the recommended setting at each further seed, in order.
        sweep: the scores at each guidance scale of the sweep (empty: no sweep).
        sweep_floor: the real-vs-real floor at the sweep's sample count (None: no sweep).
    """

    guidance_scale: float
    accuracies: dict[str, ClassAccuracy]
    spread: list[ClassAccuracy]
    sweep: dict[float, ConditionalQuality]
    sweep_floor: SampleQuality | None


def evaluation_section(
    intro: str,
    results: Mapping[str, tuple[SampleQuality, SampleQuality]],
    nll: Mapping[str, Any],
    targets: ReleaseTargets,
    *,
    seed_spread: Sequence[SampleQuality] = (),
    classes: ClassResults | None = None,
    closing: Sequence[str] = (),
) -> str:
    """The card's evaluation section: a table of every setting beside its floor, the bound and the targets.

    Args:
        intro: the opening paragraph: how and where the scores were measured.
        results: (scores, real-vs-real floor at as many digits) by setting name, the recommended setting first.
        nll: the NLL bound, `VariationalBound.summary()`, with `num_timesteps` (per digit) where it is not exact.
        targets: the release's targets, checked at the recommended setting.
        seed_spread: the recommended setting's scores at further seeds: the card adds how far they move.
        classes: a class-conditional release's class accuracy of every setting, overall and per digit, and its
            guidance sweep.
        closing: paragraphs to end the section with.
    """
    recommended_name, (recommended, floor) = next(iter(results.items()))
    accuracy = classes.accuracies[recommended_name] if classes else None
    spread_accuracies = [accuracy, *classes.spread] if classes else ()
    unconditional_bound = (
        " It bounds the model's unconditional p(x): the U-Net is called without labels, that is with its null class."
    )
    return "\n".join(
        [
            intro,
            *(["", class_intro(classes.guidance_scale)] if classes else []),
            "",
            *quality_table(results),
            *(["", *class_accuracy_table(results, classes.accuracies)] if classes else []),
            *(["", *sweep_table(classes.sweep, classes.sweep_floor)] if classes and classes.sweep else []),
            "",
            nll_line(nll) + (unconditional_bound if classes else ""),
            "",
            *targets.markdown(recommended_name, recommended, floor, nll["nll_bpd"], accuracy),
            *(
                ["", seed_spread_line(targets, recommended, seed_spread, floor, spread_accuracies)]
                if seed_spread
                else []
            ),
            *(line for paragraph in closing for line in ("", paragraph)),
        ]
    )


def quality_table(results: Mapping[str, tuple[SampleQuality, SampleQuality]]) -> list[str]:
    """Every setting's `QUALITY_ROWS` beside its real-vs-real floor, then each setting's share of each predicted
    digit."""
    columns = [(name, q) for name, (quality, floor) in results.items() for q in (quality, floor)]
    header = " | ".join(
        f"{name} (N={q.num_images})" if i % 2 == 0 else f"real floor (N={q.num_images})"
        for i, (name, q) in enumerate(columns)
    )
    rows = [f"| metric | {header} |", "| --- |" + " --- |" * len(columns)]
    for key, label in QUALITY_ROWS.items():
        rows.append(f"| {label} | " + " | ".join(f"{getattr(q, key):.4f}" for _, q in columns) + " |")
    histograms = [
        f"- {name}: " + " ".join(f"{d}: {share:.3f}" for d, share in enumerate(quality.class_histogram))
        for name, (quality, _) in results.items()
    ]
    return [*rows, "", "Predicted digits (share of samples, 0-9):", "", *histograms]


def nll_line(nll: Mapping[str, Any]) -> str:
    """The NLL bound in bits/dim with its standard error and its three parts."""
    sampled = nll.get("num_timesteps", "sampled")
    how = "exact over all T terms" if nll["exact"] else f"unbiased estimate from {sampled} timesteps"
    return (
        f"NLL bound on {nll['num_images']} test digits ({how}): **{nll['nll_bpd']:.3f} +- "
        f"{nll['nll_bpd_stderr']:.3f} bits/dim** = prior L_T {nll['prior_bpd']:.4f} + diffusion terms "
        f"{nll['diffusion_bpd']:.3f} + decoder L_0 {nll['decoder_bpd']:.3f}."
    )


def class_intro(guidance_scale: float) -> str:
    """The paragraph that says how a class-conditional release's samples were drawn and what class accuracy is."""
    return (
        "Every setting draws balanced labels (each digit a tenth of the samples, in order) with classifier-free "
        f"guidance at scale {guidance_scale:g}. The class accuracy is the share of the samples that the classifier "
        "reads as the digit they were drawn as."
    )


def class_accuracy_table(
    results: Mapping[str, tuple[SampleQuality, SampleQuality]], accuracies: Mapping[str, ClassAccuracy]
) -> list[str]:
    """The card's table of the class accuracy of every setting, overall and for each digit asked for."""
    rows = [
        f"| {name} (N={quality.num_images}) | {accuracies[name].accuracy:.1%} | "
        + " | ".join(f"{share:.1%}" for share in accuracies[name].per_class)
        + " |"
        for name, (quality, _) in results.items()
    ]
    return [
        "Class accuracy, overall and for each digit asked for:",
        "",
        "| setting | all digits | " + " | ".join(str(digit) for digit in range(10)) + " |",
        "| --- |" + " --- |" * 11,
        *rows,
    ]


def sweep_table(sweep: Mapping[float, ConditionalQuality], floor: SampleQuality) -> list[str]:
    """The card's table of the guidance sweep: each scale's FID (also over the floor), class accuracy and
    confidence."""
    rows = [
        f"| {scale:g} | {scores.quality.fid:.2f} | {scores.quality.fid / floor.fid:.2f} | "
        f"{scores.accuracy.accuracy:.1%} | {scores.quality.mean_confidence:.3f} |"
        for scale, scores in sweep.items()
    ]
    return [
        f"Guidance sweep at the recommended scheduler setting: {floor.num_images} samples per scale, balanced labels, "
        f"one seed for all scales, against a real-vs-real floor of FID {floor.fid:.2f} at the same N:",
        "",
        "| guidance scale | FID | FID / floor | class accuracy | mean confidence |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]


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

    def span(values: list[float], spec: str) -> str:
        return f"{min(values):{spec}} to {max(values):{spec}}"

    ratios = [q.fid / floor.fid for q in runs]
    if accuracies:
        met = sum(targets.all_met(q, floor, accuracy=a) for q, a in zip(runs, accuracies, strict=True))
        third = f"class accuracy {span([a.accuracy for a in accuracies], '.1%')}"
    else:
        met = sum(targets.all_met(q, floor) for q in runs)
        third = f"a rarest digit at {span([min(q.class_histogram) for q in runs], '.1%')}"
    return (
        f"Seed to seed: {quality.num_images} samples from each of {len(runs)} seeds (the card's and the next "
        f"{len(spread)}) give FID {span([q.fid for q in runs], '.2f')} ({span(ratios, '.2f')}x the floor, mean "
        f"{sum(ratios) / len(runs):.2f}x), mean confidence {span([q.mean_confidence for q in runs], '.3f')} and "
        f"{third}; every target is met at {met} of these {len(runs)} seeds. The verdicts above are the card's seed "
        "alone, and every ratio uses the one floor above (itself one draw of real digits)."
    )
