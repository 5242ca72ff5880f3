"""Hugging Face Hub glue: the full model card, the files a pipeline folder pushes, and the end of a training run.

`DDPMMnistPipeline.save_pretrained` writes the layout of a pushed repo: the pipeline (model_index.json, `unet/` and
`scheduler/` with safetensors weights) plus the pipeline, UNet and scheduler modules copied as they are, which the
model_index.json names (`_class_name: ["pipeline_ddpm_mnist", "DDPMMnistPipeline"]`, `"unet": ["unet_ddpm_mnist",
"DDPMMnistUNet"]`). That is the layout diffusers' custom pipeline loader reads with `trust_remote_code=True`; with the
package installed, `DDPMMnistPipeline.from_pretrained` reads those names as the package's own modules instead.
diffusers' own push paths (`pipe.push_to_hub(...)`, `pipe.save_pretrained(..., push_to_hub=True)`) upload that folder
with the repo's model card, or a short one. The full card comes from `render_model_card`, written into the folder
before the push:

    render_model_card(pipe, "user/ddpm-mnist").save("ddpm-mnist/README.md")
    pipe.save_pretrained("ddpm-mnist", push_to_hub=True, repo_id="user/ddpm-mnist")  # keeps that README.md

A folder that already holds its card and `samples/` (what `save_training_run` writes, with checkpoints and logs beside
them) goes up with `push_pipeline_folder(folder, repo_id)`, which uploads only what `hub_files` lists.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError

from .errors import WorkFailed
from .pipeline_ddpm_mnist import DDPMMnistPipeline
from .schedulers import SCHEDULERS
from .unet_ddpm_mnist import PRESETS

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
DISTRIBUTION = "ddpm-mnist"  # the installed package's name, whose metadata gives the card its home page link
# Metric keys the card accepts -> their name in the card and in `model-index`.
METRICS = {
    "fid": "FID",
    "kid": "KID",
    "precision": "Precision",
    "recall": "Recall",
    "mean_confidence": "Mean classifier confidence",
    "class_accuracy": "Class accuracy",
    "nll_bpd": "NLL (bits/dim)",
}


def check_push_access(repo_id: str, token: str | None = None) -> str:
    """The full id (user/name) of `repo_id` once the token, by default HF_TOKEN or the stored login, can write there."""
    token = token or get_token()
    if token is None:
        raise ValueError("no token found; run `hf auth login` or set HF_TOKEN.")
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except HfHubHTTPError as e:
        raise ValueError(
            f"{api.endpoint} refused the token (HTTP {e.response.status_code}); create a write token at "
            "https://huggingface.co/settings/tokens and run `hf auth login` or set HF_TOKEN."
        ) from e
    except Exception as e:  # offline mode, or transport errors, whose types depend on huggingface_hub's HTTP library
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot reach {api.endpoint} ({reason}); check the network or HF_ENDPOINT.") from e
    if user.get("auth", {}).get("accessToken", {}).get("role") == "read":  # fine-grained scopes show up only on use
        raise ValueError(f"the token of {user['name']} is read-only; use a token with write access.")
    namespace, _, name = repo_id.rpartition("/")
    namespace = namespace or user["name"]
    if namespace not in {user["name"], *(org["name"] for org in user.get("orgs", []))}:
        raise ValueError(f"the token of {user['name']} cannot write to {namespace}; push to {user['name']}/{name}.")
    return f"{namespace}/{name}"


def render_model_card(
    pipeline: DDPMMnistPipeline,
    repo_id: str,
    *,
    dataset_name: str = CARD_DATASET,
    samples_image: str | None = None,
    denoising_image: str | None = None,
    loss_curve_image: str | None = None,
    nll_terms_image: str | None = None,
    time_to_quality_image: str | None = None,
    recommended_scheduler: tuple[str, int] | None = None,
    recommended_guidance_scale: float | None = None,
    guidance_image: str | None = None,
    completion_image: str | None = None,
    interpolation_image: str | None = None,
    interpolation_t: int | None = None,
    training: dict[str, Any] | None = None,
    eval_results: dict[str, float] | None = None,
    eval_split: str = "test",
    evaluation: str | None = None,
    template_path: str | os.PathLike = CARD_TEMPLATE,
) -> ModelCard:
    """The model card of a pipeline: Hub metadata, the model, both ways to load it, training and evaluation.

    Images are paths inside the repo. `recommended_scheduler` is the (scheduler name, steps) the evaluation supports,
    used in the card's code; by default the paper's DDPM on all T steps. `eval_results` go into the `model-index`
    metadata and, unless `evaluation` (Markdown for the card's evaluation section) is given, into a table of their own.

    A class-conditional pipeline's card asks for digits in its code, with classifier-free guidance at
    `recommended_guidance_scale` (None: none), and shows completing and interpolating digits, `interpolate` at
    timestep `interpolation_t` (by default a quarter of the chain). Its pictures: `guidance_image` (the guidance
    sweep, beside the evaluation), `completion_image` and `interpolation_image`.
    """
    unknown = sorted(set(eval_results or {}) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {', '.join(unknown)}; the card knows {', '.join(METRICS)}.")
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
            dataset_split=eval_split,
            metric_type=key,
            metric_name=METRICS[key],
            metric_value=value,
        )
        for key, value in (eval_results or {}).items()
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
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id,
        homepage=_homepage(),
        dataset_name=dataset_id,
        local_dataset=not is_hub_dataset,  # the card names the Hub dataset, never the local path
        samples_image=samples_image,
        denoising_image=denoising_image,
        loss_curve_image=loss_curve_image,
        nll_terms_image=nll_terms_image,
        time_to_quality_image=time_to_quality_image,
        recommended_scheduler=scheduler_name,
        recommended_steps=recommended_steps,
        class_conditional=conditional,
        scheduler_class=scheduler_class,
        guidance_scale=recommended_guidance_scale,
        guidance_image=guidance_image,
        completion_image=completion_image,
        interpolation_image=interpolation_image,
        interpolation_t=interpolation_t if interpolation_t is not None else schedule.num_train_timesteps // 4,
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
        eval_results={METRICS[key]: value for key, value in (eval_results or {}).items()},
        eval_split=eval_split,
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


def hub_files(folder: str | os.PathLike) -> dict[str, Path]:
    """What pushing a pipeline folder uploads: its files, by path in the repo."""
    # The pipeline as `save_pretrained` writes it (model_index.json, the code files it names, each component's configs
    # and safetensors weights), README.md and `samples/*.png`; never checkpoints, optimizer states or logs.
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; save a pipeline there with `save_pretrained`.")
    index = json.loads((folder / "model_index.json").read_text())
    module, class_name = DDPMMnistPipeline.__module__.rpartition(".")[2], DDPMMnistPipeline.__name__
    if index.get("_class_name") == class_name:
        raise ValueError(
            f"{folder} was saved without the code that trust_remote_code runs; save it again with "
            f"`{class_name}.from_pretrained(folder).save_pretrained(folder)`."
        )
    if index.get("_class_name") != [module, class_name]:
        raise ValueError(f"{folder} holds a {index.get('_class_name')}, not a {class_name}.")
    files = {"model_index.json": folder / "model_index.json", f"{module}.py": folder / f"{module}.py"}
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if list((folder / component).glob("*.bin")):
            raise ValueError(f"{folder / component} holds pickled weights (.bin); save with safe_serialization=True.")
        code = folder / component / f"{entry[0]}.py"  # a component whose module the folder carries
        for path in sorted([*(folder / component).glob("*.json"), *(folder / component).glob("*.safetensors")]):
            files[path.relative_to(folder).as_posix()] = path
        if code.is_file():
            files[code.relative_to(folder).as_posix()] = code
    extras = [folder / "README.md", *sorted((folder / "samples").glob("*.png"))]
    files.update({path.relative_to(folder).as_posix(): path for path in extras if path.is_file()})
    return files


def export_pipeline_folder(folder: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write what pushing `folder` would upload (see `hub_files`) into the new folder `destination`, and return it."""
    destination = Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} exists; export into a new folder, or remove it first.")
    files = hub_files(folder)
    for path, source in files.items():
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return destination


def push_pipeline_folder(
    folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None
) -> str:
    """Upload a pipeline folder (see `hub_files`) to `repo_id` in one commit, creating the repo; return the URL."""
    files = hub_files(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(source)) for path, source in files.items()]
    return api.create_commit(repo_id, operations, commit_message=f"Upload {DDPMMnistPipeline.__name__}").commit_url


def save_training_run(
    pipeline: DDPMMnistPipeline,
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    dataset_name: str,
    training: dict[str, Any],
    samples_image: str | None = None,
) -> None:
    """The end of a training run in `output_dir`: the pipeline folder, its model card, and `training.json`.

    `training.json` records the dataset and the `training` settings, so that `training/release.py` can render the card
    again later with measured quality; it is never pushed (see `hub_files`).
    """
    output_dir = Path(output_dir)
    pipeline.save_pretrained(output_dir)
    record = {"dataset_name": dataset_name, "training": training}
    (output_dir / "training.json").write_text(json.dumps(record, indent=2))
    card = render_model_card(
        pipeline, repo_id, dataset_name=dataset_name, samples_image=samples_image, training=training
    )
    card.save(output_dir / "README.md")


def push_training_run(output_dir: str | os.PathLike, repo_id: str, private: bool | None = None) -> str:
    """`push_pipeline_folder` for the end of training: on any failure, a `WorkFailed` that gives the retry command."""
    try:
        return push_pipeline_folder(output_dir, repo_id, private=private)
    except Exception as e:  # whatever failed (network, Hub, quota), the folder is complete and can be pushed alone
        private_flag = ", private=True" if private else ""
        call = f"push_pipeline_folder({json.dumps(str(output_dir))}, {json.dumps(repo_id)}{private_flag})"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WorkFailed(
            f"the upload to {repo_id} failed ({reason}); {output_dir} is intact. Retry the upload alone with: "
            f"python -c {shlex.quote('from ddpm_mnist.hub import push_pipeline_folder; ' + call)}"
        ) from e
