"""The ddpm-mnist demo: generate digits, complete a sketched one and interpolate between two, in the browser.

    python demo/app.py                                   # http://127.0.0.1:7860
    python demo/app.py --model ddpm-mnist/ddpm-mnist-small --model path/to/another/pipeline

demo/README.md describes the tabs, the models served by default and the variables that move the server
(GRADIO_SERVER_NAME, GRADIO_SERVER_PORT) or name the models (DDPM_MNIST_MODELS, for `--model`). Every picture comes
from the library: `DDPMMnistPipeline` (Generate), `DDPMMnistInpaintPipeline` (Complete) and `ddpm_mnist.interpolate`
(Interpolate). Bad input is a one-line message in the page; the app keeps serving.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import numpy as np
import torch
from PIL import Image

import ddpm_mnist
from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.errors import UsageError, first_line, run_entry_point, usage_errors
from ddpm_mnist.evaluation import default_device, load_pipeline, scheduler_steps
from ddpm_mnist.hardware import describe_device, has_native_bf16
from ddpm_mnist.image_utils import HALVES, digit_grid
from ddpm_mnist.metrics.classifier import load_mnist_classifier
from ddpm_mnist.metrics.quality import classifier_outputs
from ddpm_mnist.pipeline_ddpm_mnist_inpaint import (
    DEFAULT_JUMP_N_SAMPLE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DDPMMnistInpaintPipeline,
    default_jump_length,
    jump_schedule,
)
from ddpm_mnist.schedulers import SCHEDULERS

APP_DIR = Path(__file__).resolve().parent
# The released pipelines: pretrained/<name>, or the Hub. The first conditional one is the app's first model.
RELEASES = ("ddpm-mnist-small", "ddpm-mnist-cond-small-4step", "ddpm-mnist-cond-small")
# A distilled student draws only (in a few steps): the Complete and Interpolate tabs use its teacher, when served.
TEACHERS = {"ddpm-mnist-cond-small-4step": "ddpm-mnist-cond-small"}
MODELS_VARIABLE = "DDPM_MNIST_MODELS"


class SamplingSetting(NamedTuple):
    """Where the app starts for a model: the Generate tab's scheduler (of `SCHEDULERS`) and steps, and the guidance."""

    scheduler: str
    num_inference_steps: int
    guidance_scale: float


# What each release's model card recommends; any other model starts from the pipeline's own DDPM on 50 steps.
RECOMMENDED_SETTINGS = {
    "ddpm-mnist-small": SamplingSetting("unipc", 20, 1.0),
    "ddpm-mnist-cond-small": SamplingSetting("unipc", 20, 1.5),
    # Its own scheduler (DDIM on trailing timesteps, as saved), four steps, the teacher's guidance built in.
    "ddpm-mnist-cond-small-4step": SamplingSetting("ddim", 4, 1.0),
}
OTHER_MODELS_SETTING = SamplingSetting("ddpm", 50, 2.0)
INTERPOLATION_STEPS = 50  # the Interpolate tab's chain: the pipeline's DDPM on 50 respaced steps of the 1000
TEST_DIGITS = APP_DIR / "mnist_test_digits.png"  # the first 100 digits of MNIST's test split, 10 x 10
ANY_DIGIT = "any"
DIGIT_CHOICES = [ANY_DIGIT, *(str(digit) for digit in range(10))]
MAX_IMAGES = 64
UPSCALE = 4  # screen pixels per digit pixel: nearest-neighbour blocks keep the digits sharp
STRIP_FRAMES = 10
INK = 0.2  # a drawn pixel at 28 x 28, in [0, 1]
PAD_SIZE = 280  # the sketch pad's side in pad pixels: 10 x 10 of them make one digit pixel
# The brush's radius in pad pixels: strokes read by `sketch_to_digit` are 2.96 pixels wide (median), as MNIST's 2.98
# (radius 13: 2.75, 15: 3.17; tests/test_demo.py repeats the measurement).
BRUSH_RADIUS = 14
# The region the model redraws, as (rows, columns) of the digit; what is drawn is kept wherever it lies.
REGIONS = {f"{half} half": HALVES[half] for half in ("bottom", "top", "right", "left")}
REGIONS["everything not drawn"] = (slice(None), slice(None))
INTERPOLATION_T = 250  # the latents' step: the released model's rows start and end at the two digits (see interpolate)
# The defaults that mark a handler's progress argument, for which Gradio passes each call a tracker of its own.
PROGRESS = gr.Progress()
PROGRESS_OF_TQDM = gr.Progress(track_tqdm=True)


def recommended_setting(model: str) -> SamplingSetting:
    """The sampling setting the app starts from for the model of this display name (a folder's or repo's name)."""
    return RECOMMENDED_SETTINGS.get(model, OTHER_MODELS_SETTING)


def default_models() -> list[str]:
    """The released pipelines: `pretrained/<name>` beside the app where it exists, else the Hub repo id."""
    local = [APP_DIR.parent / "pretrained" / name for name in RELEASES]
    return [str(path) if path.is_dir() else f"ddpm-mnist/{path.name}" for path in local]


def load_models(models: Sequence[str | os.PathLike], device: str, dtype: str, *, required: bool) -> dict:
    """The pipelines by display name (folder or repo name). With `required`, each must load (a UsageError names the
    first that does not); without it, those that cannot be loaded are skipped with a printed line."""
    pipelines = {}
    for name in models:
        try:
            with usage_errors("device", "dtype"):
                pipelines[Path(os.fspath(name)).name] = load_pipeline(name, device, dtype)
        except UsageError as error:
            if required:
                raise
            print(f"skipping {name}: {error}")
    if not pipelines:
        raise UsageError(f"no pipeline could be loaded of {', '.join(map(str, models))}; pass one with --model.")
    return pipelines


def _reported(handler: Callable) -> Callable:
    """Show bad input (the library's and the app's ValueErrors) as a one-line message in the page."""

    @functools.wraps(handler)
    def report(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except ValueError as error:
            raise gr.Error(first_line(error), print_exception=False) from None

    return report


def _whole(value: float | None, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, or a ValueError naming the field: not a whole number, or outside low..high when given."""
    if value is None or value != int(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" from {low} to {high}" if low is not None and high is not None else ""
        raise ValueError(f"{name} must be a whole number{bounds}, got {value}.")
    return int(value)


def _upscaled(digits: torch.Tensor, cols: int | None = None) -> Image.Image:
    """Digits (N, 1, 28, 28) in [0, 1] as one grid image, UPSCALE screen pixels per digit pixel."""
    return digit_grid(digits.float().cpu(), cols=cols, upscale=UPSCALE)


def _fresh(pipe: DDPMMnistPipeline, scheduler: str = "ddpm", pipeline_class: type = DDPMMnistPipeline):
    """A `pipeline_class` over `pipe`'s UNet with a scheduler of its own (`SCHEDULERS[scheduler]` on the pipeline's
    noise schedule), so that calls running at once never share a scheduler's timesteps."""
    fresh = pipeline_class(pipe.unet, SCHEDULERS[scheduler].from_config(pipe.scheduler.config), pipe.config.image_size)
    fresh.set_progress_bar_config(disable=True)
    return fresh


def sketch_to_digit(sketch: dict | None, size: int) -> np.ndarray:
    """The sketch pad's picture (or an uploaded one) as a size x size digit in [0, 1], white on black as MNIST's: a
    picture brighter than mid-grey on average (the pad draws black on white) is inverted. Nothing drawn: ValueError."""
    composite = (sketch or {}).get("composite")
    if composite is not None:
        pixels = np.asarray(composite.convert("L").resize((size, size), Image.BOX), dtype=np.float32) / 255
        digit = 1 - pixels if pixels.mean() > 0.5 else pixels
        if digit.max() >= INK:
            return digit
    raise ValueError("the sketch is empty: draw part of a digit (or upload one), then press Complete.")


def keep_mask(digit: np.ndarray, region: str) -> np.ndarray:
    """1 where the pixel is kept: everywhere outside `region` (one of REGIONS), and every drawn pixel."""
    keep = np.ones_like(digit)
    keep[REGIONS[region]] = 0
    return np.maximum(keep, digit >= INK)


def bundled_test_digits() -> torch.Tensor:
    """The 100 MNIST test digits bundled with the app (`TEST_DIGITS`), (100, 1, 28, 28) in [0, 1]."""
    sprite = np.asarray(Image.open(TEST_DIGITS).convert("L"), dtype=np.float32) / 255
    return torch.from_numpy(sprite.reshape(10, 28, 10, 28).transpose(0, 2, 1, 3).reshape(100, 1, 28, 28))


def _reading_images(preprocess: Callable) -> Callable:
    """A sketch pad's `preprocess` (which opens an uploaded file) for which a file that is not an image is bad input."""

    @_reported
    @functools.wraps(preprocess)
    def read(payload: object) -> object:
        try:
            return preprocess(payload)
        except OSError:  # PIL's UnidentifiedImageError, or an image file cut short
            raise ValueError("the uploaded file is not an image: upload a picture of a digit, or draw one.") from None

    return read


class DigitDemo:
    """What the app does, one method per tab, over pipelines loaded once; each returns the tab's outputs."""

    def __init__(self, pipelines: dict[str, DDPMMnistPipeline], device: str, dtype: str) -> None:
        self.pipelines = pipelines
        self.hardware = f"{dtype} UNet on {describe_device(device)}"
        self.classifier = load_mnist_classifier(device=device)
        self.test_digits = bundled_test_digits()

    def editing_model(self, model: str) -> str:
        """The model the Complete and Interpolate tabs run for `model`: its teacher for a distilled student, which
        draws from noise in a few steps, not along a long chain (a ValueError if the app does not serve the teacher)."""
        if model not in TEACHERS:
            return model
        if TEACHERS[model] not in self.pipelines:
            raise ValueError(
                f"{model} only draws new digits; to complete or interpolate, serve its teacher too (--model "
                f"{TEACHERS[model]})."
            )
        return TEACHERS[model]

    def guidance(self, model: str, digit: str, count: int, scale: float, low: float, high: float | None) -> dict:
        """The pipeline's `class_labels` (`count` of the chosen digit, or None for any digit), `guidance_scale` (1
        without labels) and `guidance_interval` (None for every step: 0 to T; `high` None: T) from a tab's fields."""
        pipe = self.pipelines[model]
        if digit != ANY_DIGIT and not pipe.is_class_conditional:
            raise ValueError(
                f"{model} draws any digit (it is unconditional): choose {ANY_DIGIT!r}, or a conditional model."
            )
        labels = None if digit == ANY_DIGIT else [int(digit)] * count
        num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        high = num_train_timesteps if high is None else high
        interval = (_whole(low, "guide from t"), _whole(high, "guide up to t"))
        return {
            "class_labels": labels,
            "guidance_scale": 1.0 if labels is None else float(scale),
            "guidance_interval": None if interval == (0, num_train_timesteps) else interval,
        }

    @_reported
    def generate(
        self, model: str, digit: str, num_images: float, guidance_scale: float, scheduler: str,
        num_inference_steps: float, seed: float, guidance_from: float = 0, guidance_to: float | None = None,
        progress: gr.Progress = PROGRESS,
    ) -> tuple[Image.Image, Image.Image, str]:  # fmt: skip
        """A grid of digits, the denoising of the first one (x_t after evenly spaced steps), and how long it took."""
        pipe = self.pipelines[model]
        count = _whole(num_images, "the number of digits", 1, MAX_IMAGES)
        guidance = self.guidance(model, digit, count, guidance_scale, guidance_from, guidance_to)
        steps = scheduler_steps(pipe, scheduler, _whole(num_inference_steps, "steps"))
        generator = torch.Generator().manual_seed(_whole(seed, "the seed", 0, 2**32 - 1))
        pipeline_copy = _fresh(pipe, scheduler)
        frame_steps = set(np.linspace(0, steps - 1, min(STRIP_FRAMES, steps)).round().astype(int).tolist())
        frames = []

        def on_step_end(pipeline: DDPMMnistPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
            progress((i + 1, steps), desc=f"{scheduler}, step {i + 1} of {steps}", unit="steps")
            if i in frame_steps:
                frames.append(pipeline.postprocess(tensors["image"][:1], output_type="pt"))
            return tensors

        start = time.perf_counter()
        images = pipeline_copy(
            batch_size=count,
            **guidance,
            generator=generator,
            num_inference_steps=steps,
            output_type="pt",
            callback_on_step_end=on_step_end,
        ).images
        seconds = time.perf_counter() - start
        info = f"{count} digits in {seconds:.2f} s ({scheduler}, {steps} steps; {self.hardware})"
        return _upscaled(images), _upscaled(torch.cat(frames), cols=len(frames)), info

    @_reported
    def complete(
        self, model: str, sketch: dict | None, region: str, digit: str, guidance_scale: float, num_completions: float,
        num_inference_steps: float, seed: float, guidance_from: float = 0, guidance_to: float | None = None,
        progress: gr.Progress = PROGRESS,
    ) -> tuple[list[tuple[Image.Image, str]], str]:  # fmt: skip
        """The tab's gallery (what the model keeps of the sketch, the region it redraws in grey, then its completions
        of a few seeds with what the classifier reads in each) and how long it took."""
        model = self.editing_model(model)
        pipe = self.pipelines[model]
        known = sketch_to_digit(sketch, pipe.config.image_size)
        keep = keep_mask(known, region)
        count = _whole(num_completions, "the number of completions", 1, MAX_IMAGES)
        guidance = self.guidance(model, digit, count, guidance_scale, guidance_from, guidance_to)
        steps = scheduler_steps(pipe, "ddpm", _whole(num_inference_steps, "steps"))
        first_seed = _whole(seed, "the seed", 0, 2**32 - count)
        inpaint = _fresh(pipe, pipeline_class=DDPMMnistInpaintPipeline)
        jump_length = default_jump_length(steps)
        inpaint.scheduler.set_timesteps(steps)
        passes = jump_schedule(inpaint.scheduler.timesteps.tolist(), jump_length, DEFAULT_JUMP_N_SAMPLE)
        calls = sum(len(timesteps) - 1 for timesteps in passes)  # the UNet calls of RePaint's jumps

        def on_step_end(pipeline: DDPMMnistInpaintPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
            progress((i + 1, calls), desc=f"RePaint, UNet call {i + 1} of {calls}", unit="steps")
            return tensors

        start = time.perf_counter()
        images = inpaint(
            image=[Image.fromarray(np.uint8(known * 255))] * count,
            mask_image=Image.fromarray(np.uint8(keep * 255)),
            **guidance,
            num_inference_steps=steps,
            jump_length=jump_length,
            generator=[torch.Generator().manual_seed(first_seed + i) for i in range(count)],
            output_type="pt",
            callback_on_step_end=on_step_end,
        ).images
        seconds = time.perf_counter() - start
        probabilities = classifier_outputs(images.float().cpu(), self.classifier, progress=False).logits.softmax(-1)
        confidence, read = probabilities.max(dim=1)
        kept = torch.from_numpy(np.where(keep > 0, known, 0.4))[None, None]
        pictures = [(_upscaled(kept), "kept (grey: redrawn)")] + [
            (_upscaled(image[None]), f"seed {first_seed + i}: reads {int(read[i])} ({float(confidence[i]):.0%})")
            for i, image in enumerate(images)
        ]
        info = f"{count} completions in {seconds:.2f} s ({model}, RePaint, {steps} steps, {calls} UNet calls; "
        info += f"{self.hardware})"
        return pictures, info

    def test_digit(self, index: float) -> torch.Tensor:
        """The bundled MNIST test digit number `index` (0-99), (1, 1, 28, 28) in [0, 1]."""
        return self.test_digits[_whole(index, "the test digit", 0, len(self.test_digits) - 1)][None]

    @_reported
    def interpolate(
        self, model: str, index_a: float, index_b: float, timestep: float, num_lambdas: float,
        num_inference_steps: float, seed: float, progress: gr.Progress = PROGRESS_OF_TQDM,
    ) -> tuple[Image.Image, str]:  # fmt: skip
        """The row between two test digits, lambda from 0 (digit A) to 1 (digit B), and how long it took."""
        model = self.editing_model(model)
        decoder = _fresh(self.pipelines[model])
        decoder.set_progress_bar_config(desc="decoding the row")  # what the progress bar follows
        t = _whole(timestep, "t")
        lambdas = np.linspace(0, 1, _whole(num_lambdas, "the number of images", 2, MAX_IMAGES)).tolist()
        steps = scheduler_steps(decoder, "ddpm", _whole(num_inference_steps, "steps"))
        a, b = (self.test_digit(index) * 2 - 1 for index in (index_a, index_b))  # x_0 in [-1, 1]
        generator = torch.Generator().manual_seed(_whole(seed, "the seed", 0, 2**32 - 1))
        start = time.perf_counter()
        images = ddpm_mnist.interpolate(
            decoder, a, b, t=t, lambdas=lambdas, num_inference_steps=steps, generator=generator, output_type="pt"
        ).images
        seconds = time.perf_counter() - start
        info = f"{len(lambdas)} digits through t = {t} in {seconds:.2f} s ({model}, {steps}-step chain; "
        info += f"{self.hardware})"
        return _upscaled(images, cols=len(lambdas)), info


def build_demo(
    models: Sequence[str | os.PathLike] | None = None, *, device: str | None = None, dtype: str | None = None
) -> gr.Blocks:
    """The app, its queue set up, over pipelines loaded once (folders or Hub repo ids; by default the released ones).

    `device` defaults to the GPU where there is one; `dtype` to bf16 where the device computes it natively, else
    fp32. Sampling calls, over all tabs, run one at a time on a CPU, whose cores one call already keeps busy, and four
    at once on a GPU. A model that cannot be loaded is a UsageError.
    """
    device = device or default_device()
    dtype = dtype or ("bf16" if has_native_bf16(device) else "fp32")
    pipelines = load_models(models or default_models(), device, dtype, required=models is not None)
    app = DigitDemo(pipelines, device, dtype)
    conditional = [name for name, pipe in pipelines.items() if pipe.is_class_conditional]
    first = (conditional or list(pipelines))[0]
    num_train_timesteps = pipelines[first].scheduler.config.num_train_timesteps
    setting = recommended_setting(first)

    def model_controls(model: str) -> tuple[dict | str | int, ...]:
        """The model's recommended scheduler, steps and guidance; digit and guidance controls usable only with a
        class-conditional model."""
        pipe, recommended = pipelines[model], recommended_setting(model)
        usable = pipe.is_class_conditional

        def controls(guidance_scale: float) -> tuple[dict, ...]:
            return (
                gr.update(interactive=True) if usable else gr.update(interactive=False, value=ANY_DIGIT),
                gr.update(interactive=usable, value=guidance_scale),
                gr.update(interactive=usable, value=0),
                gr.update(interactive=usable, value=pipe.scheduler.config.num_train_timesteps),
            )

        editing = recommended_setting(TEACHERS.get(model, model))  # Complete runs a student's teacher
        generating = controls(recommended.guidance_scale)
        return *generating, *controls(editing.guidance_scale), recommended.scheduler, recommended.num_inference_steps

    def test_digit(index: float) -> Image.Image:
        """A bundled test digit, enlarged, as the page shows it."""
        return _upscaled(app.test_digit(index))

    usable = bool(conditional)  # the digit and guidance controls, until a model is picked

    def digit_choice(label: str) -> gr.Dropdown:
        return gr.Dropdown(DIGIT_CHOICES, value=ANY_DIGIT, label=label, interactive=usable)

    def guidance_choice(scale: float) -> gr.Slider:
        label = "guidance scale (with a chosen digit)"
        return gr.Slider(1, 10, value=scale, step=0.5, label=label, interactive=usable)

    def interval_choice() -> tuple[gr.Number, gr.Number]:
        high = f"guide up to t (all: 0 to {num_train_timesteps})"
        low = gr.Number(0, precision=0, label="guide from t", interactive=usable)
        return low, gr.Number(num_train_timesteps, precision=0, label=high, interactive=usable)

    # One concurrency group for every event that runs the UNet.
    sampling = {"concurrency_id": "sampling", "concurrency_limit": 1 if torch.device(device).type == "cpu" else 4}
    with gr.Blocks(title="ddpm-mnist") as demo:
        gr.Markdown(
            "# ddpm-mnist\nHandwritten digits from a denoising diffusion probabilistic model (Ho et al. 2020) trained "
            "on MNIST: draw new ones, let the model finish yours, or walk from one digit to another."
        )
        model = gr.Dropdown(list(pipelines), value=first, label="model")
        with gr.Tab("Generate"):
            with gr.Row():
                digit = digit_choice("digit")
                num_images = gr.Slider(1, MAX_IMAGES, value=16, step=1, label="how many")
                guidance = guidance_choice(setting.guidance_scale)
                guidance_from, guidance_to = interval_choice()
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value=setting.scheduler, label="scheduler")
                steps_label = f"steps (1 to {num_train_timesteps})"
                steps = gr.Number(setting.num_inference_steps, precision=0, label=steps_label, elem_id="steps")
                seed = gr.Number(0, precision=0, label="seed")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            grid = gr.Image(label="digits", format="png", elem_id="grid")
            strip = gr.Image(label="the first digit, denoised step by step (x_t, left to right)", format="png")
            generate_info = gr.Markdown(elem_id="generate-info")
        with gr.Tab("Complete"):
            with gr.Row():
                # A blank white page to show makes Gradio's editor open with the brush selected, not the image tool.
                sketch = gr.Sketchpad(
                    Image.new("L", (PAD_SIZE, PAD_SIZE), 255), type="pil", image_mode="L", sources=["upload"],
                    label="draw part of a digit (or upload one), large and centred as in MNIST",
                    canvas_size=(PAD_SIZE, PAD_SIZE), fixed_canvas=True, elem_id="sketch",
                    brush=gr.Brush(default_size=BRUSH_RADIUS, colors=["#000000"], color_mode="fixed"),
                )  # fmt: skip
                sketch.preprocess = _reading_images(sketch.preprocess)  # where Gradio opens an uploaded file
                with gr.Column():
                    region = gr.Radio(list(REGIONS), value="bottom half", label="the model redraws")
                    complete_digit = digit_choice("as the digit")
                    complete_guidance = guidance_choice(recommended_setting(TEACHERS.get(first, first)).guidance_scale)
                    with gr.Row():
                        complete_from, complete_to = interval_choice()
                    num_completions = gr.Slider(1, 8, value=4, step=1, label="completions")
                    complete_steps = gr.Number(
                        DEFAULT_NUM_INFERENCE_STEPS, precision=0, label="steps", elem_id="complete-steps"
                    )
                    complete_seed = gr.Number(0, precision=0, label="seed")
                    complete = gr.Button("Complete", variant="primary", elem_id="complete")
            # The kept part and the completions share one gallery, so that the kept part shows as large as they do.
            # Five columns: the kept part and the default 4 completions in one row.
            label = "what the model keeps, then its completions"
            completions = gr.Gallery(label=label, format="png", columns=5, height="auto", elem_id="completions")
            complete_info = gr.Markdown()
        with gr.Tab("Interpolate"):
            with gr.Row():
                index_a = gr.Slider(0, len(app.test_digits) - 1, value=0, step=1, label="test digit A")
                index_b = gr.Slider(0, len(app.test_digits) - 1, value=1, step=1, label="test digit B")
                last_t = num_train_timesteps - 1
                label = "t (the latents' step)"
                timestep = gr.Slider(0, last_t, value=min(INTERPOLATION_T, last_t), step=1, label=label)
                num_lambdas = gr.Slider(2, 16, value=11, step=1, label="images in the row")
            with gr.Row():
                interpolate_steps = gr.Number(
                    INTERPOLATION_STEPS, precision=0, label="steps of the whole chain", elem_id="interpolate-steps"
                )
                interpolate_seed = gr.Number(0, precision=0, label="seed")
            with gr.Row():
                digit_a = gr.Image(test_digit(0), label="A", format="png", scale=1)
                digit_b = gr.Image(test_digit(1), label="B", format="png", scale=1)
            interpolate = gr.Button("Interpolate", variant="primary")
            row = gr.Image(label="from A (left) to B (right), mixed at step t and denoised", format="png")
            interpolate_info = gr.Markdown()

        guidance_controls = [digit, guidance, guidance_from, guidance_to]
        complete_guidance_controls = [complete_digit, complete_guidance, complete_from, complete_to]
        model_settings = [*guidance_controls, *complete_guidance_controls, scheduler, steps]
        model.change(model_controls, model, model_settings, api_visibility="private")
        index_a.change(test_digit, index_a, digit_a, api_visibility="private", queue=False)
        index_b.change(test_digit, index_b, digit_b, api_visibility="private", queue=False)
        # Each tab's button, its handler's inputs in order (the API's too) and its outputs.
        inputs = [model, digit, num_images, guidance, scheduler, steps, seed, guidance_from, guidance_to]
        generate.click(app.generate, inputs, [grid, strip, generate_info], api_name="generate", **sampling)
        inputs = [model, sketch, region, complete_digit, complete_guidance, num_completions, complete_steps]
        inputs += [complete_seed, complete_from, complete_to]
        complete.click(app.complete, inputs, [completions, complete_info], api_name="complete", **sampling)
        inputs = [model, index_a, index_b, timestep, num_lambdas, interpolate_steps, interpolate_seed]
        interpolate.click(app.interpolate, inputs, [row, interpolate_info], api_name="interpolate", **sampling)
    return demo.queue(max_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(prog="demo/app.py", description=__doc__.split("\n\n")[0])
    model = f"a pipeline folder or Hub repo id, repeatable (default: ${MODELS_VARIABLE}, else the released ones)"
    parser.add_argument("--model", action="append", help=model)
    parser.add_argument("--device", help="cpu or cuda (default: the GPU where there is one)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="the UNet's (default: bf16 where native)")
    args = parser.parse_args()
    models = args.model or [name for name in os.environ.get(MODELS_VARIABLE, "").split(",") if name] or None
    build_demo(models, device=args.device, dtype=args.dtype).launch()


if __name__ == "__main__":
    run_entry_point(main, "demo/app.py")
