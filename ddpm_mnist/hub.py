"""Hugging Face Hub glue: the model card of a trained pipeline."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

CARD_TAGS = ["pytorch", "diffusers", "ddpm", "mnist", "unconditional-image-generation"]


def render_model_card(template_path: str | os.PathLike, repo_id: str, dataset_name: str, **fields: Any) -> ModelCard:
    """Render the card template with the Hub metadata of an unconditional DDPM trained on `dataset_name`."""
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license="apache-2.0",
        tags=CARD_TAGS,
        datasets=[dataset_name] if "/" in dataset_name and not os.path.exists(dataset_name) else ["ylecun/mnist"],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        dataset_name=dataset_name,
        **fields,
    )
