"""The demo app under load, and its speed targets: start-up to a usable page, one grid, concurrent calls.

    python benchmarks/demo_load.py --json

Starts `python demo/app.py --model MODEL` on 127.0.0.1:--port and measures, naming the CPU: the seconds until the
page's Generate button is painted in headless Chromium (demo/browser.py; without Playwright or a Chromium, until the
page first answers; target 10 s); one Generate call of --num_images digits after a one-step warm-up (target 3 s); and
--concurrent such calls sent at once with --bad bad ones, one gradio_client each: whether every good call got its
grid and strip and every bad one its one-line message, the p50 and p95 latency and the server's peak resident memory.
The app runs one call at a time on a CPU, so the latencies grow with --concurrent. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from gradio_client import Client

from ddpm_mnist.errors import UsageError, WorkFailed, run_entry_point
from ddpm_mnist.hardware import describe_device

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "demo" / "app.py"
STARTUP_TARGET_S = 10.0
GRID_TARGET_S = 3.0
STARTUP_TIMEOUT_S = 300
# Bad Generate settings, by what they change, and the message each must come back with.
BAD_CALLS = [
    ({"num_inference_steps": 0}, "num_inference_steps 0 is outside"),
    ({"digit": "12"}, "is not in the list of choices"),
    ({"num_inference_steps": 10**6}, "num_inference_steps 1000000 is outside"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/demo_load.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "pretrained" / "ddpm-mnist-small"), help="folder or Hub id")
    parser.add_argument("--num_images", type=int, default=16, help="digits per Generate call")
    parser.add_argument("--scheduler", default="unipc", help="ddpm, ddim, dpm++ or unipc")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="steps per Generate call")
    parser.add_argument("--concurrent", type=int, default=12, help="good Generate calls sent at once")
    parser.add_argument("--bad", type=int, default=3, help="bad Generate calls sent with them")
    parser.add_argument("--port", type=int, default=7861, help="the app's port on 127.0.0.1")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every figure")
    args = parser.parse_args()
    if min(args.num_images, args.num_inference_steps, args.concurrent) < 1 or args.bad < 0:
        raise UsageError("--num_images, --num_inference_steps and --concurrent must be at least 1, --bad at least 0.")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:
            raise UsageError(f"port {args.port} on 127.0.0.1 is taken; pass a free one with --port.")
    return args


def load_browser() -> ModuleType | None:
    """demo/browser.py, or None where Playwright's package or a Chromium is missing."""
    spec = importlib.util.spec_from_file_location("ddpm_mnist_demo_browser", REPO / "demo" / "browser.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module if module.chromium_executable() else None


def wait_for_page(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll the page until it answers; a WorkFailed with the server's last lines if it dies or never answers."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text().strip().splitlines()[-3:]
            raise WorkFailed(f"demo/app.py exited with status {server.returncode}: {' | '.join(tail)}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=1).close()
            return
        time.sleep(0.05)
    raise WorkFailed(f"demo/app.py did not answer at {url} within {STARTUP_TIMEOUT_S} s.")


def generate_settings(args: argparse.Namespace, **changes) -> tuple:
    """The Generate endpoint's arguments: model, digit, how many, guidance, scheduler, steps, seed."""
    settings = {"model": Path(args.model).name, "digit": "any", "num_images": args.num_images, "guidance_scale": 1.0}
    settings |= {"scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps, "seed": 0}
    return tuple({**settings, **changes}.values())


def timed_call(client, settings: tuple) -> tuple[float, tuple | str]:
    """The seconds a Generate call took, with its outputs or the message it failed with."""
    start = time.perf_counter()
    try:
        outputs = client.predict(*settings, api_name="/generate")
    except Exception as error:  # the message of a bad call, as the page would show it
        return time.perf_counter() - start, str(error)
    return time.perf_counter() - start, outputs


def main() -> None:
    args = parse_args()
    where = describe_device("cpu") + (f" with {describe_device('cuda')}" if torch.cuda.is_available() else "")
    browser = load_browser()
    url = f"http://127.0.0.1:{args.port}/"
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(args.port)}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    figures: dict[str, object] = {"hardware": where}
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        page = stack.enter_context(browser.chromium_page()) if browser else None
        log = Path(folder) / "app.log"
        start = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, str(APP), "--model", args.model], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        stack.callback(server.wait)
        stack.callback(server.terminate)
        wait_for_page(url, server, log)
        if page is not None:
            browser.open_app(page, url)
        figures["startup_s"] = time.perf_counter() - start
        measured = "until the page's Generate button is painted" if page else "until the page answers (no browser)"
        verdict = "met" if figures["startup_s"] <= STARTUP_TARGET_S else "missed"
        print(f"start-up: {figures['startup_s']:.1f} s {measured}; target {STARTUP_TARGET_S:g} s: {verdict} ({where})")

        client = Client(url, verbose=False)
        timed_call(client, generate_settings(args, num_images=1, num_inference_steps=1))  # warm-up
        seconds, outputs = timed_call(client, generate_settings(args))
        if isinstance(outputs, str):
            raise WorkFailed(f"the timed Generate call failed: {outputs}")
        # The sampling time in the app's line, e.g. "16 digits in 2.41 s (ddpm, 50 steps; ...)".
        figures["grid_s"], figures["grid_client_s"] = float(re.search(r" in ([\d.]+) s ", outputs[2])[1]), seconds
        verdict = "met" if figures["grid_s"] <= GRID_TARGET_S else "missed"
        print(
            f"one grid: {args.num_images} digits, {args.scheduler} on {args.num_inference_steps} steps, in "
            f"{figures['grid_s']:.2f} s ({seconds:.2f} s at the client); target {GRID_TARGET_S:g} s: {verdict} "
            f"({where})"
        )

        bad_calls = [BAD_CALLS[i % len(BAD_CALLS)] for i in range(args.bad)]
        calls = [generate_settings(args, seed=i) for i in range(args.concurrent)]
        calls += [generate_settings(args, **changes) for changes, _ in bad_calls]
        clients = [Client(url, verbose=False) for _ in calls]
        with ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(timed_call, clients, calls))
        good, bad = results[: args.concurrent], results[args.concurrent :]
        grids_ok = sum(not isinstance(out, str) and all(Path(path).is_file() for path in out[:2]) for _, out in good)
        messages_ok = sum(
            isinstance(out, str) and text in out and "\n" not in out
            for (_, out), (_, text) in zip(bad, bad_calls, strict=True)
        )
        status = Path(f"/proc/{server.pid}/status")  # the peak resident memory (VmHWM), where /proc says it
        peak = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
        p50, p95 = np.percentile([seconds for seconds, _ in good], [50, 95]).tolist()
        figures |= {"good_calls": args.concurrent, "good_calls_with_images": grids_ok, "bad_calls": args.bad}
        figures |= {"bad_calls_with_message": messages_ok, "p50_s": p50, "p95_s": p95}
        figures["peak_memory_mib"] = int(peak[1]) / 1024 if peak else None
        print(
            f"load: {grids_ok} of {args.concurrent} good calls got their images, {messages_ok} of {args.bad} bad calls "
            f"their message; latency p50 {figures['p50_s']:.2f} s, p95 {figures['p95_s']:.2f} s ({where})"
        )
        memory = figures["peak_memory_mib"]
        print(f"peak memory of the app: {f'{memory:.0f} MiB' if memory else 'unknown (no /proc)'} ({where})")
    if args.json:
        print(json.dumps(figures))
    if grids_ok < args.concurrent or messages_ok < args.bad:
        raise WorkFailed("some calls did not get what they should; see the load line above.")


if __name__ == "__main__":
    run_entry_point(main, "benchmarks/demo_load.py")
