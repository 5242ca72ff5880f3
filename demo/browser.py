"""The demo in a real browser: headless Chromium driven by Playwright, for the tests, the load benchmark and the
README's screenshot (`python demo/browser.py --output demo/screenshot.png`, the released pipelines after one Generate).

Playwright's package (`pip install playwright`, not in a Space) drives the system's Chromium (`chromium` on the PATH,
as Debian installs it), headless, with a fresh profile and nothing that reaches the network on its own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from playwright.sync_api import Page, sync_playwright

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
    # Chromium still looks up Google's sign-in, autofill and update hosts: no name but 127.0.0.1's resolves.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1280, "height": 1000}
TIMEOUT_MS = 120_000  # sampling on a busy CPU can take a while


def chromium_executable() -> str | None:
    """The system's Chromium, or None where there is none."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A page of a headless Chromium with a fresh user-data folder, closed (and the folder removed) afterwards."""
    executable = chromium_executable()
    if executable is None:
        raise FileNotFoundError("no chromium on the PATH; install it (Debian: apt-get install chromium).")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        with playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_FLAGS, viewport=VIEWPORT
        ) as context:
            context.set_default_timeout(TIMEOUT_MS)
            yield context.pages[0] if context.pages else context.new_page()


def open_app(page: Page, url: str) -> None:
    """Load the app and wait until its Generate button shows."""
    page.goto(url)
    page.locator("#generate").wait_for(state="visible")


def press_generate(page: Page) -> None:
    """Press Generate and wait for the grid and the line saying how long it took."""
    page.locator("#generate").click()
    page.locator("#grid img").wait_for(state="visible")
    page.get_by_text(" s (").first.wait_for(state="visible")


def draw_and_complete(page: Page, stroke: Sequence[tuple[float, float]]) -> None:
    """Draw one stroke on the sketch pad of the open Complete tab, whose brush is selected as it opens (points as
    fractions of the pad's width and height), press Complete and wait for the completions."""
    pad = page.locator("#sketch canvas").first
    pad.wait_for(state="visible")
    box = pad.bounding_box()
    points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point, steps=3)
    page.mouse.up()
    page.locator("#complete").click()
    page.locator("#completions img").first.wait_for(state="visible")


def main() -> None:
    """Save a screenshot of the app serving the released pipelines, after one Generate with the default settings."""
    import argparse

    import app  # demo/app.py, beside this file when run as a script

    parser = argparse.ArgumentParser(prog="demo/browser.py", description=main.__doc__)
    parser.add_argument("--output", default="demo/screenshot.png", help="where to save the PNG")
    parser.add_argument("--model", action="append", help="a pipeline folder or Hub repo id (default: the released)")
    args = parser.parse_args()
    demo = app.build_demo(args.model)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        with chromium_page() as page:
            open_app(page, demo.local_url)
            press_generate(page)
            page.screenshot(path=args.output, full_page=True)
    finally:
        demo.close()
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
