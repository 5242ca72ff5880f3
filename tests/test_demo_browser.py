"""The demo app in a real browser: headless Chromium opens the page, generates a grid, and draws and completes a
digit on the sketch pad. Skipped, with the reason, where Playwright's package or a Chromium is missing."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.test_demo import TILE, load_demo_module, save_tiny_pipelines, serve_demo

pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright's package: pip install playwright")
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
    """The width and height of the picture an <img> shows, as the server sent it."""
    return image.evaluate("img => [img.naturalWidth, img.naturalHeight]")


def test_generate_shows_the_grid(page, tmp_path: Path) -> None:
    page.locator("#steps input").fill("3")  # the default 16 digits, on 3 steps
    browser.press_generate(page)
    assert natural_size(page.locator("#grid img")) == [4 * TILE, 4 * TILE]
    assert page.get_by_text("16 digits in ").is_visible()
    page.screenshot(path=tmp_path / "generate.png", full_page=True)
    assert Image.open(tmp_path / "generate.png").width == browser.VIEWPORT["width"]


def test_a_drawn_stroke_is_completed(page) -> None:
    page.get_by_role("tab", name="Complete").click()
    page.locator("#complete-steps input").fill("3")
    browser.draw_and_complete(page, [(0.5, 0.35), (0.5, 0.65)])  # a short vertical bar in the middle of the pad
    assert natural_size(page.locator("#completions img").first) == [TILE, TILE]
    assert page.get_by_text("4 completions in ").is_visible()
    assert page.get_by_text("seed 0: reads ").count() >= 1
