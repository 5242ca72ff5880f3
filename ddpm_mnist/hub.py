"""Hugging Face Hub glue: the files a pipeline folder pushes, and the end of a training run.

A folder written by `DDPMMnistPipeline.save_pretrained` carries the pipeline, UNet and scheduler code that diffusers'
loader runs with `trust_remote_code=True`. diffusers' own push paths upload it with the card already in the folder:

    render_model_card(pipe, "user/ddpm-mnist").save("ddpm-mnist/README.md")
    pipe.save_pretrained("ddpm-mnist", push_to_hub=True, repo_id="user/ddpm-mnist")  # keeps that README.md

`push_pipeline_folder(folder, repo_id)` uploads only what `upload_patterns` selects (the pipeline, its card, its
pictures) from a folder with more beside them, such as a training run's; `export_pipeline_folder` copies the same files.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from .errors import WorkFailed, first_line
from .model_card import render_model_card
from .pipeline_ddpm_mnist import DDPMMnistPipeline


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
        raise ValueError(f"cannot reach {api.endpoint} ({first_line(e)}); check the network or HF_ENDPOINT.") from e
    if user.get("auth", {}).get("accessToken", {}).get("role") == "read":  # fine-grained scopes show up only on use
        raise ValueError(f"the token of {user['name']} is read-only; use a token with write access.")
    namespace, _, name = repo_id.rpartition("/")
    namespace = namespace or user["name"]
    if namespace not in {user["name"], *(org["name"] for org in user.get("orgs", []))}:
        raise ValueError(f"the token of {user['name']} cannot write to {namespace}; push to {user['name']}/{name}.")
    return f"{namespace}/{name}"


def upload_patterns(folder: str | os.PathLike) -> list[str]:
    """What pushing a pipeline folder uploads, as the `allow_patterns` of `HfApi.upload_folder`.

    The pipeline as `save_pretrained` writes it (model_index.json, the code files it names with the modules they
    import relatively, each component's configs and safetensors weights), README.md and `samples/*.png`; never
    checkpoints, optimizer states, logs or `training.json`. A folder saved without its code, or with pickled weights,
    is refused.
    """
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
    code = [folder / f"{module}.py"]
    patterns = ["model_index.json", "README.md", "samples/*.png"]
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if list((folder / component).glob("*.bin")):
            raise ValueError(f"{folder / component} holds pickled weights (.bin); save with safe_serialization=True.")
        patterns += [f"{component}/*.json", f"{component}/*.safetensors"]
        code += [path for path in [folder / component / f"{entry[0]}.py"] if path.is_file()]
    # The code files, and what they import relatively: the files diffusers' remote-code loader fetches with them.
    sources = [source for path in code for source in (path, *map(Path, get_relative_import_files(path)))]
    return patterns + [source.relative_to(folder).as_posix() for source in sources]


def export_pipeline_folder(folder: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy what pushing `folder` would upload (see `upload_patterns`) into the new folder `destination`, and return
    it. The files are chosen as `upload_folder` chooses them, with huggingface_hub's `filter_repo_objects`."""
    folder, destination = Path(folder), Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} exists; export into a new folder, or remove it first.")
    patterns = upload_patterns(folder)
    files = [path.relative_to(folder).as_posix() for path in sorted(folder.glob("**/*")) if path.is_file()]
    for path in filter_repo_objects(files, allow_patterns=patterns):
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / path, target)
    return destination


def push_pipeline_folder(
    folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None
) -> str:
    """Upload a pipeline folder (see `upload_patterns`) to `repo_id` in one commit, creating the repo; return the
    commit's URL."""
    patterns = upload_patterns(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    message = f"Upload {DDPMMnistPipeline.__name__}"
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=patterns, commit_message=message)
    return commit.commit_url


def save_training_run(
    pipeline: DDPMMnistPipeline,
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    dataset_name: str,
    training: dict[str, Any],
    samples_image: str | None = None,
    samples_scheduler: tuple[str | None, int] | None = None,
) -> None:
    """The end of a training run in `output_dir`: the pipeline folder, its model card, and `training.json`.

    The card's code draws with `samples_scheduler`, (scheduler name, steps), the setting of the run's `samples_image`.
    `training.json` records the dataset and the `training` settings, so that `training/release.py` can render the card
    again later with measured quality; it is never pushed (see `upload_patterns`).
    """
    output_dir = Path(output_dir)
    pipeline.save_pretrained(output_dir)
    record = {"dataset_name": dataset_name, "training": training}
    (output_dir / "training.json").write_text(json.dumps(record, indent=2))
    pictures = {"grid": samples_image} if samples_image else None
    card = render_model_card(
        pipeline, repo_id, dataset_name=dataset_name, pictures=pictures, recommended_scheduler=samples_scheduler,
        training=training,
    )  # fmt: skip
    card.save(output_dir / "README.md")


def push_training_run(output_dir: str | os.PathLike, repo_id: str, private: bool | None = None) -> str:
    """`push_pipeline_folder` for the end of training: on any failure, a `WorkFailed` that gives the retry command."""
    try:
        return push_pipeline_folder(output_dir, repo_id, private=private)
    except Exception as e:  # whatever failed (network, Hub, quota), the folder is complete and can be pushed alone
        private_flag = ", private=True" if private else ""
        call = f"push_pipeline_folder({json.dumps(str(output_dir))}, {json.dumps(repo_id)}{private_flag})"
        raise WorkFailed(
            f"the upload to {repo_id} failed ({first_line(e)}); {output_dir} is intact. Retry the upload alone with: "
            f"python -c {shlex.quote('from ddpm_mnist.hub import push_pipeline_folder; ' + call)}"
        ) from e
