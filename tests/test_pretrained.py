"""The released pipelines in `pretrained/`: the pushed layout, digits that are recognisably digits, and the digit asked
for from the conditional release (`ddpm-mnist-cond-small`, at the end).

Samples of `ddpm-mnist-small` from a fixed seed must pass three checks that each catch a different failure: the
classifier is confident (blurry blobs are not), they cover the digits (noise reads as an "8" with full confidence),
and they lie on the manifold of real digits in the classifier's feature space (noise and scribbles do not). The same
checks are run on real test digits, which pass, and on noise and on one digit repeated, which fail: the thresholds
separate them.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.data import load_x_0
from ddpm_mnist.metrics.classifier import load_mnist_classifier
from ddpm_mnist.metrics.quality import ClassifierOutputs, classifier_outputs, sample_quality
from ddpm_mnist.schedulers import SCHEDULERS
from tests.utils import run_python

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "ddpm-mnist-small"
NUM_SAMPLES = 32
# On 1,000 samples (its card) the release has mean confidence 0.971 and precision 0.807 (real digits: 0.994, 0.867);
# its 32 samples of seeds 0 and 1 scored 0.971 / 0.974, all 10 digits, precision 0.69 / 0.75 with DDPM on 50 steps,
# and 0.965 / 0.995, 10 / 9 digits, precision 0.81 / 0.69 with UniPC on 20 (real: 0.994, 10, 0.84).
# The release before last (mean confidence 0.90) would fail the first check.
MIN_MEAN_CONFIDENCE, MIN_DISTINCT_DIGITS, MIN_PRECISION = 0.93, 8, 0.6


@pytest.fixture(scope="module")
def pipe() -> DDPMMnistPipeline:
    pipeline = DDPMMnistPipeline.from_pretrained(PRETRAINED)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def judge(real_mnist):
    """The checks, as a function of digits (N, 1, 28, 28) in [0, 1]: the list of those they fail."""
    classifier = load_mnist_classifier()
    real = classifier_outputs((load_x_0(real_mnist, "test", 1000) + 1) / 2, classifier, progress=False)

    def failures(images: torch.Tensor) -> list[str]:
        samples: ClassifierOutputs = classifier_outputs(images, classifier, progress=False)
        quality = sample_quality(samples, real, kid_subsets=10)
        failed = []
        if quality.mean_confidence < MIN_MEAN_CONFIDENCE:
            failed.append(f"mean confidence {quality.mean_confidence:.3f}")
        if len(set(samples.logits.argmax(1).tolist())) < MIN_DISTINCT_DIGITS:
            failed.append(f"digits {sorted(set(samples.logits.argmax(1).tolist()))}")
        if quality.precision < MIN_PRECISION:
            failed.append(f"precision {quality.precision:.3f}")
        return failed

    return failures


def test_the_release_folder_is_what_a_push_uploads(pipe):
    files = sorted(p.relative_to(PRETRAINED).as_posix() for p in PRETRAINED.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "model_index.json", "pipeline_ddpm_mnist.py", "remote_code_utils.py", "samples/denoising.png",
        "samples/grid.png", "samples/loss.png", "samples/nll_terms.png", "samples/time_to_quality.png",
        "scheduler/scheduler_config.json", "scheduler/scheduling_ddpm_mnist.py",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/unet_ddpm_mnist.py",
    ])  # fmt: skip
    assert json.loads((PRETRAINED / "model_index.json").read_text())["unet"] == ["unet_ddpm_mnist", "DDPMMnistUNet"]
    card = (PRETRAINED / "README.md").read_text()
    assert "ddpm-mnist/ddpm-mnist-small" in card and "**Targets**" in card
    assert "num_inference_steps=20, generator=generator" in card  # the recommended setting, in the card's code
    assert sum(p.numel() for p in pipe.unet.parameters()) == 1_623_169


def test_the_checks_pass_real_digits_and_fail_noise_and_a_single_digit(judge, real_mnist):
    real = (load_x_0(real_mnist, "test", NUM_SAMPLES, seed=1) + 1) / 2
    assert judge(real) == []
    noise = torch.rand((NUM_SAMPLES, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    assert len(judge(noise)) >= 2
    assert any(failure.startswith("digits") for failure in judge(real[:1].repeat(NUM_SAMPLES, 1, 1, 1)))


@pytest.mark.parametrize(("scheduler", "steps"), [("unipc", 20), ("ddpm", 50)])
def test_samples_from_a_fixed_seed_are_confidently_recognised_digits(pipe, judge, scheduler, steps):
    # The setting its card recommends, and the pipeline's own DDPM on 50 respaced steps of its evaluation table.
    pipe = DDPMMnistPipeline(pipe.unet, SCHEDULERS[scheduler].from_config(pipe.scheduler.config))
    generator = torch.Generator().manual_seed(0)
    images = pipe(batch_size=NUM_SAMPLES, num_inference_steps=steps, generator=generator, output_type="pt").images
    assert judge(images) == []


def test_the_cards_code_runs_as_pasted(tmp_path):
    """The card's code with the package (its Python blocks but the one for `trust_remote_code`), on the folder in
    place of the Hub repo: it saves its digit."""
    card = (PRETRAINED / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]
    code = "\n".join(block for block in blocks if "trust_remote_code" not in block)
    assert code.count("pipe(") == 2
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_python(code.replace('"ddpm-mnist/ddpm-mnist-small"', repr(str(PRETRAINED))), env, tmp_path)
    assert Image.open(tmp_path / "digit.png").size == (28, 28)


# The conditional release in `pretrained/ddpm-mnist-cond-small`: does it draw the digit it is asked for?
COND_PRETRAINED = PRETRAINED.parent / "ddpm-mnist-cond-small"
# On 1,000 samples (its card: UniPC on 20 steps, guidance 1.5) the release reads as the requested digit 0.986 of the
# time; the unconditional release's digits, matched against the same labels, agree about one time in ten (chance).
MIN_CLASS_ACCURACY = 0.9


@pytest.fixture(scope="module")
def cond_pipe() -> DDPMMnistPipeline:
    pipeline = DDPMMnistPipeline.from_pretrained(COND_PRETRAINED)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def read_as(images: torch.Tensor) -> torch.Tensor:
    """The digit the classifier reads in each image (N, 1, 28, 28) in [0, 1]."""
    return classifier_outputs(images, load_mnist_classifier(), progress=False).logits.argmax(1)


def test_the_conditional_release_folder_is_what_a_push_uploads(cond_pipe):
    files = sorted(p.relative_to(COND_PRETRAINED).as_posix() for p in COND_PRETRAINED.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "model_index.json", "pipeline_ddpm_mnist.py", "remote_code_utils.py", "samples/completion.png",
        "samples/denoising.png", "samples/grid.png", "samples/guidance.png", "samples/interpolation.png",
        "samples/loss.png", "samples/nll_terms.png", "scheduler/scheduler_config.json",
        "scheduler/scheduling_ddpm_mnist.py", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/unet_ddpm_mnist.py",
    ])  # fmt: skip
    assert cond_pipe.is_class_conditional and cond_pipe.unet.config.num_class_embeds == 10
    # The unconditional release's U-Net and an embedding of 11 classes (10 digits and the null class) x 128 channels.
    assert sum(p.numel() for p in cond_pipe.unet.parameters()) == 1_623_169 + 11 * 128
    card = (COND_PRETRAINED / "README.md").read_text()
    assert "ddpm-mnist/ddpm-mnist-cond-small" in card and "**Targets**" in card
    # The card's setting, in its code.
    assert "guidance_scale=1.5" in card and "UniPCMultistepScheduler.from_config" in card


def test_the_conditional_release_draws_the_digits_it_is_asked_for(cond_pipe, pipe):
    """Two of each digit at the card's setting: the conditional release draws them; the same check fails the
    unconditional release's digits, drawn from the same seed without labels."""
    class_labels = torch.arange(10).repeat(2)
    generator = torch.Generator().manual_seed(0)
    scheduler = UniPCMultistepScheduler.from_config(cond_pipe.scheduler.config)
    unipc = DDPMMnistPipeline(unet=cond_pipe.unet, scheduler=scheduler)
    images = unipc(
        class_labels=class_labels, guidance_scale=1.5, num_inference_steps=20, generator=generator, output_type="pt"
    ).images
    digits = read_as(images)
    assert (digits == class_labels).double().mean() >= MIN_CLASS_ACCURACY, digits.tolist()
    generator = torch.Generator().manual_seed(0)
    unconditional = pipe(batch_size=20, num_inference_steps=20, generator=generator, output_type="pt").images
    assert (read_as(unconditional) == class_labels).double().mean() < MIN_CLASS_ACCURACY
