"""The demo app in a real browser: headless Chromium opens the page, generates a grid, finds the sketch pad ready to
draw, and draws and completes a digit on it. Skipped, with the reason, where Playwright's package or a Chromium is
missing."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.test_demo import TILE, load_demo_module, save_tiny_pipelines, serve_demo

pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright's package: pip install playwright")
from playwright.sync_api import expect  # noqa: E402

browser = load_demo_module("browser")
if browser.chromium_executable() is None:
    pytest.skip("no chromium on the PATH (Debian: apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The app on tiny pipelines, open in one Chromium page for the module's tests."""
    with serve_demo(save_tiny_pipelines(tmp_path_factory.mktemp("pipelines"))) as url, browser.chromium_page() as page:
        browser.open_app(page, url)
        yield page


def natural_size(image) -> list[int]:
    """The width and height of the picture an <img> shows, as the server sent it, once the browser has loaded it."""
    image.element_handle().wait_for_element_state("visible")
    return image.evaluate(
        "img => img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight]"
        " : new Promise(done => img.addEventListener('load', () => done([img.naturalWidth, img.naturalHeight])))"
    )


def test_generate_shows_the_grid(page, tmp_path: Path) -> None:
    page.locator("#steps input").fill("3")  # the default 16 digits, on 3 steps
    browser.press_generate(page)
    assert natural_size(page.locator("#grid img")) == [4 * TILE, 4 * TILE]
    assert page.get_by_text("16 digits in ").is_visible()
    page.screenshot(path=tmp_path / "generate.png", full_page=True)
    assert Image.open(tmp_path / "generate.png").width == browser.VIEWPORT["width"]


def test_the_sketch_pad_opens_with_the_brush_selected(page) -> None:
    page.get_by_role("tab", name="Complete").click()
    tools = page.locator("#sketch")
    selected = re.compile(r"\bhighlight\b")  # the class of the editor's selected tool
    expect(tools.get_by_role("button", name="Brush", exact=True)).to_have_class(selected, timeout=browser.TIMEOUT_MS)
    expect(tools.get_by_role("button", name="Image", exact=True)).not_to_have_class(selected)


def test_a_drawn_stroke_is_completed_beside_what_is_kept(page) -> None:
    page.get_by_role("tab", name="Complete").click()
    page.locator("#complete-steps input").fill("3")
    browser.draw_and_complete(page, [(0.5, 0.35), (0.5, 0.65)])  # a short vertical bar in the middle of the pad
    pictures = page.locator("#completions img")
    expect(pictures).to_have_count(5)  # what is kept, then the 4 completions
    assert natural_size(pictures.first) == natural_size(pictures.nth(1)) == [TILE, TILE]
    kept, first = pictures.first.bounding_box(), pictures.nth(1).bounding_box()
    assert (kept["width"], kept["height"]) == pytest.approx((first["width"], first["height"]), abs=1)
    assert kept["width"] > 1.5 * TILE  # shown larger than it is sent, as the completions are
    assert page.get_by_text("kept (grey: redrawn)").is_visible()
    assert page.get_by_text("4 completions in ").is_visible()
    assert page.get_by_text("seed 0: reads ").count() >= 1
