"""The demo app (demo/app.py) served on 127.0.0.1 and called through its API with gradio_client, on tiny random
pipelines: every tab's images come back at the right size and count, and bad input is a one-line message after which
the app keeps serving; the sketch pad's brush draws strokes as wide as MNIST's."""

import importlib.util
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported
pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler  # noqa: E402
from ddpm_mnist.schedulers import SCHEDULERS  # noqa: E402
from tests.utils import tiny_unet  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "demo"
TILE = 28 * 4  # one digit on the page: 28 pixels, each shown as a 4 x 4 block


def load_demo_module(name: str) -> ModuleType:
    """A module of demo/ (not a package: a Space runs app.py as a script) loaded from its path."""
    spec = importlib.util.spec_from_file_location(f"ddpm_mnist_demo_{name}", DEMO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_pipelines(folder: Path) -> list[Path]:
    """An unconditional and a class-conditional tiny pipeline with random weights, saved as `tiny` and `tiny-cond`."""
    for name, overrides in (("tiny", {}), ("tiny-cond", {"num_class_embeds": 10})):
        DDPMMnistPipeline(tiny_unet(**overrides), DDPMMnistScheduler()).save_pretrained(folder / name)
    return [folder / "tiny", folder / "tiny-cond"]


@contextmanager
def serve_demo(models: list[Path]) -> Iterator[str]:
    """The app over `models`, on the CPU, served on 127.0.0.1 while the block runs; yields its URL."""
    demo = load_demo_module("app").build_demo(models, device="cpu", dtype="fp32")
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    with serve_demo(save_tiny_pipelines(tmp_path_factory.mktemp("pipelines"))) as url:
        yield Client(url, verbose=False)


def pixels(path: str) -> np.ndarray:
    """An image the app returned, as a greyscale array."""
    return np.asarray(Image.open(path).convert("L"))


def generate(
    client: Client,
    model="tiny-cond",
    digit="3",
    num_images=5,
    guidance=2.0,
    scheduler="ddim",
    steps=3,
    seed=0,
    **interval,
):
    """The Generate tab's (grid, strip, info) for these settings; `guidance_from`/`guidance_to` by name if given."""
    settings = (model, digit, num_images, guidance, scheduler, steps, seed)
    return client.predict(*settings, **interval, api_name="/generate")


def test_generate_returns_the_grid_the_strip_and_the_time(client: Client) -> None:
    grid, strip, info = generate(client)
    assert pixels(grid).shape == (2 * TILE, 3 * TILE)  # 5 digits on a near-square grid: 3 columns, 2 rows
    assert pixels(strip).shape == (TILE, 3 * TILE)  # x_t after each of the 3 steps
    assert re.fullmatch(r"5 digits in \d+\.\d\d s \(ddim, 3 steps; fp32 UNet on CPU .*\)", info)
    # The seed fixes the digits; the chosen digit reaches the class-conditional UNet.
    assert (pixels(generate(client)[0]) == pixels(grid)).all()
    assert (pixels(generate(client, seed=1)[0]) != pixels(grid)).any()
    assert (pixels(generate(client, digit="5")[0]) != pixels(grid)).any()


def test_generate_with_an_unconditional_model_and_the_pipelines_scheduler(client: Client) -> None:
    grid, strip, info = generate(client, model="tiny", digit="any", num_images=4, guidance=1, steps=2, scheduler="ddpm")
    assert pixels(grid).shape == (2 * TILE, 2 * TILE)
    assert pixels(strip).shape == (TILE, 2 * TILE)
    assert info.startswith("4 digits in ")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "num_inference_steps 0 is outside 1..1000"),
        ({"steps": 1001}, "num_inference_steps 1001 is outside 1..1000"),
        ({"digit": "12"}, "Value: 12 is not in the list of choices"),
        ({"model": "tiny", "digit": "3"}, "tiny draws any digit (it is unconditional)"),
        ({"model": "missing"}, "Value: missing is not in the list of choices"),
    ],
)
def test_bad_input_is_a_one_line_message_and_the_app_keeps_serving(client: Client, settings, message) -> None:
    with pytest.raises(AppError) as error:
        generate(client, **settings)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert pixels(generate(client, num_images=1, steps=1)[0]).shape == (TILE, TILE)


def test_generate_guides_in_the_interval_of_timesteps_asked_for(client: Client) -> None:
    everywhere = pixels(generate(client)[0])
    # The whole range 0..T is every step: the same digits as the default.
    assert (pixels(generate(client, guidance_from=0, guidance_to=1000)[0]) == everywhere).all()
    # An interval that holds none of the 3 steps is no guidance at all.
    unguided = pixels(generate(client, guidance=1.0)[0])
    assert (pixels(generate(client, guidance_from=1000, guidance_to=1000)[0]) == unguided).all()
    assert (pixels(generate(client, guidance_from=300, guidance_to=700)[0]) != everywhere).any()
    with pytest.raises(AppError, match=r"0 <= low <= high <= 1000, got \(700, 300\)") as error:
        generate(client, guidance_from=700, guidance_to=300)
    assert "\n" not in str(error.value)


def sketch_file(folder: Path, stroke: bool = True) -> dict:
    """The sketch pad's value as the page sends it: a white 280 x 280 pad, with a black bar drawn on it exactly over
    digit pixels 4-19 of rows and 13-14 of columns (10 x 10 pad pixels each)."""
    pad = np.full((280, 280), 255, dtype=np.uint8)
    if stroke:
        pad[40:200, 130:150] = 0
    path = folder / f"sketch-{stroke}.png"
    Image.fromarray(pad).save(path)
    return {"background": handle_file(path), "layers": [], "composite": handle_file(path)}


def test_complete_shows_what_it_keeps_beside_the_completions(client: Client, tmp_path: Path) -> None:
    settings = ("bottom half", "7", 2.0, 3, 4, 5)  # region, digit, guidance, completions, steps, seed
    (kept, *completions), info = client.predict("tiny-cond", sketch_file(tmp_path), *settings, api_name="/complete")
    drawn = np.zeros((28, 28), dtype=np.uint8)
    drawn[4:20, 13:15] = 255
    # What the model keeps, first and as large as each completion: the top half and the drawn pixels; the rest (grey
    # on the page) it redraws.
    expected = np.where(np.arange(28)[:, None] < 14, drawn, np.where(drawn > 0, 255, 102))
    assert kept["caption"] == "kept (grey: redrawn)"
    assert pixels(kept["image"]).shape == (TILE, TILE)
    assert (pixels(kept["image"])[::4, ::4] == expected).all()
    assert [item["caption"].split(":")[0] for item in completions] == ["seed 5", "seed 6", "seed 7"]
    for item in completions:
        assert re.fullmatch(r"seed \d: reads \d \(\d+%\)", item["caption"])
        digit = pixels(item["image"])
        assert digit.shape == (TILE, TILE)
        assert (digit[::4, ::4][:14] == drawn[:14]).all()  # RePaint returns the kept pixels exactly
    assert info.startswith("3 completions in ")


def test_complete_without_a_drawing_is_a_message(client: Client, tmp_path: Path) -> None:
    settings = ("everything not drawn", "any", 1.0, 2, 2, 0)
    with pytest.raises(AppError, match="the sketch is empty"):
        client.predict("tiny", sketch_file(tmp_path, stroke=False), *settings, api_name="/complete")


@pytest.mark.parametrize(
    "content", [b"a note, not a picture\n", b"\x89PNG\r\n\x1a\n cut short"], ids=["text", "cut-short-png"]
)
def test_an_upload_that_is_not_an_image_is_a_message_and_the_app_keeps_serving(
    client: Client, tmp_path: Path, content: bytes
) -> None:
    upload = tmp_path / "digit.png"
    upload.write_bytes(content)
    sketch = {"background": handle_file(upload), "layers": [], "composite": handle_file(upload)}
    settings = ("bottom half", "any", 1.0, 1, 2, 0)
    with pytest.raises(AppError, match="the uploaded file is not an image") as error:
        client.predict("tiny", sketch, *settings, api_name="/complete")
    assert "\n" not in str(error.value)
    pictures, info = client.predict("tiny", sketch_file(tmp_path), *settings, api_name="/complete")
    assert len(pictures) == 2 and info.startswith("1 completions in ")


def test_the_pad_opens_on_a_blank_page_with_the_measured_brush(client: Client) -> None:
    # A value to show is what makes Gradio's editor open with the brush selected (the browser test sees it).
    (pad,) = [c["props"] for c in client.config["components"] if c["props"].get("elem_id") == "sketch"]
    assert pad["value"]["background"] is not None and pad["value"]["layers"] == []
    assert pad["brush"]["default_size"] == load_demo_module("app").BRUSH_RADIUS
    assert pad["sources"] == ["upload"]


def stroke_widths(digits: np.ndarray) -> np.ndarray:
    """At each pixel above 0.5 of digits (N, 28, 28) in [0, 1], its stroke's width in pixels: the ink of the run of
    inked pixels (above 0.05) through it along its row or along its column, the lesser."""
    widths = []
    for digit in digits:
        across = []
        for lines in (digit, digit.T):
            ink = np.zeros_like(lines)
            for line, out in zip(lines, ink, strict=True):
                edges = np.flatnonzero(np.diff(np.r_[0, line > 0.05, 0]))
                for start, end in zip(edges[::2], edges[1::2], strict=True):
                    out[start:end] = line[start:end].sum()
            across.append(ink)
        widths.append(np.minimum(across[0], across[1].T)[digit > 0.5])
    return np.concatenate(widths)


def drawn_digits(radius: int, supersample: int = 4) -> np.ndarray:
    """A 0, a 1, a 7 and a 3 about as tall as MNIST's, each at five places, drawn on the pad as Gradio's brush of this
    radius draws (antialiased discs along the path: here every 2 pad pixels, drawn `supersample` times larger and
    reduced) and read as the app reads the pad (`sketch_to_digit`). The 0 drawn with the mouse on the app's pad in
    Chromium, radius 14, comes out 0.02 pixels narrower by `stroke_widths`' median."""
    app = load_demo_module("app")
    t = np.linspace(0, 1, 200)[:, None]
    arc = np.c_[np.sin(np.pi * t), -np.cos(np.pi * t)]
    paths = [
        np.c_[140 + 60 * np.sin(2 * np.pi * t), 140 - 90 * np.cos(2 * np.pi * t)],  # 0
        np.c_[140 + 15 * t, 45 + 190 * t],  # 1
        np.r_[np.c_[80 + 130 * t, 50 + 0 * t], np.c_[210 - 80 * t, 50 + 185 * t]],  # 7
        np.r_[(140, 95) + (60, 50) * arc, (140, 190) + (65, 50) * arc],  # 3
    ]
    digits = []
    for path in paths:
        lengths = np.r_[0, np.cumsum(np.hypot(*np.diff(path, axis=0).T))]
        at = np.arange(0, lengths[-1], 2)
        centres = np.c_[np.interp(at, lengths, path[:, 0]), np.interp(at, lengths, path[:, 1])]
        for shift in ((0, 0), (3, -2), (-4, 5), (5, 4), (-2, -5)):
            pad = Image.new("L", (supersample * app.PAD_SIZE,) * 2, 255)
            draw = ImageDraw.Draw(pad)
            for x, y in (centres + shift - radius) * supersample:
                draw.ellipse([x, y, x + 2 * radius * supersample - 1, y + 2 * radius * supersample - 1], fill=0)
            pad = pad.resize((app.PAD_SIZE,) * 2, Image.BOX)
            digits.append(app.sketch_to_digit({"composite": pad}, 28))
    return np.stack(digits)


def test_the_brush_draws_strokes_as_wide_as_mnists() -> None:
    app = load_demo_module("app")
    mnist = np.median(stroke_widths(app.bundled_test_digits()[:, 0].numpy()))
    radii = (app.BRUSH_RADIUS - 1, app.BRUSH_RADIUS, app.BRUSH_RADIUS + 1)
    gap = {radius: abs(np.median(stroke_widths(drawn_digits(radius))) - mnist) for radius in radii}
    assert gap[app.BRUSH_RADIUS] < 0.1 and gap[app.BRUSH_RADIUS] == min(gap.values()), (mnist, gap)


def test_interpolate_returns_the_row(client: Client) -> None:
    # Test digits 0 and 1, mixed at t = 100 into 6 images and decoded on a 20-step chain (its 3 steps at or below t).
    row, info = client.predict("tiny", 0, 1, 100, 6, 20, 0, api_name="/interpolate")
    assert pixels(row).shape == (TILE, 6 * TILE)
    assert re.fullmatch(r"6 digits through t = 100 in \d+\.\d\d s \(\S+, 20-step chain; .*\)", info)


@pytest.mark.parametrize("release", ["ddpm-mnist-small", "ddpm-mnist-cond-small"])
def test_the_app_starts_each_release_at_the_setting_its_card_recommends(release: str) -> None:
    app = load_demo_module("app")
    assert release in app.RELEASES
    setting = app.recommended_setting(release)
    card = (DEMO.parent / "pretrained" / release / "README.md").read_text()
    if setting.scheduler != "ddpm":  # another scheduler than the pipeline's own is swapped in by the card's code
        assert f"pipe.scheduler = {SCHEDULERS[setting.scheduler].scheduler_class.__name__}.from_config" in card
    assert f"num_inference_steps={setting.num_inference_steps}" in card
    assert (f"guidance_scale={setting.guidance_scale}" in card) == (setting.guidance_scale > 1)


def test_another_model_starts_at_the_pipelines_own_scheduler() -> None:
    setting = load_demo_module("app").recommended_setting("tiny")
    assert (setting.scheduler, setting.num_inference_steps) == ("ddpm", 50)


def test_the_app_starts_the_student_on_its_own_scheduler_and_edits_with_its_teacher() -> None:
    app = load_demo_module("app")
    student, teacher = "ddpm-mnist-cond-small-4step", "ddpm-mnist-cond-small"
    assert app.RELEASES.index(student) < app.RELEASES.index(teacher)  # the first conditional release: the default
    setting = app.recommended_setting(student)
    pipe = DDPMMnistPipeline.from_pretrained(DEMO.parent / "pretrained" / student)
    swapped = app._fresh(pipe, setting.scheduler).scheduler  # what the Generate tab samples with
    swapped.set_timesteps(setting.num_inference_steps)
    assert swapped.config.prediction_type == "v_prediction" and swapped.timesteps.tolist() == [999, 749, 499, 249]
    card = (DEMO.parent / "pretrained" / student / "README.md").read_text()
    assert f"num_inference_steps={setting.num_inference_steps}" in card and setting.guidance_scale == 1
    served = {name: pipe for name in (student, teacher)}
    assert app.DigitDemo(served, "cpu", "fp32").editing_model(student) == teacher
    with pytest.raises(ValueError, match=f"serve its teacher too \\(--model {teacher}\\)"):
        app.DigitDemo({student: pipe}, "cpu", "fp32").editing_model(student)
