"""Throughput of ddpm-mnist against diffusers at equal architecture, measured side by side on this machine.

    python benchmarks/throughput.py --quick --json

It prints where it runs and the 2048^3 matmul peaks there (bf16's only where the hardware computes in bf16 natively),
then measures each of `--parts`: `models` (a training step and a sampling forward pass of each preset's UNet against
its `UNet2DModel` twin), `sample` (the whole sampling loop against `DDPMPipeline`), `e2e` (`training/train.py` against
the loop of diffusers' `train_unconditional.py` in `benchmarks/diffusers_baseline.py`), `quality` (fp32 and bf16
samples scored), `profile` (the top operators of a training step) and `data` (decoded images/s). The two sides of every
ratio are measured alternately; each timing is the median of `--repeats` runs after a warm-up. What each part measures
and the results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from diffusers_baseline import DiffusersLoop, diffusers_twin
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet, data
from ddpm_mnist.errors import UsageError, run_entry_point, usage_errors
from ddpm_mnist.evaluation import DTYPES, default_device
from ddpm_mnist.hardware import describe_device, has_native_bf16
from ddpm_mnist.metrics.classifier import load_mnist_classifier
from ddpm_mnist.metrics.quality import classifier_outputs, sample_quality

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = ROOT / "pretrained" / "ddpm-mnist-small"
PARTS = ("models", "sample", "e2e", "quality", "profile", "data")
BENCHMARK_DTYPES = ("fp32", "bf16")  # the DTYPES measured: fp32, and bf16 (autocast in training, bf16 weights sampling)


def twins(preset: str, device: torch.device) -> dict[str, torch.nn.Module]:
    """Our UNet of `preset` ("ours") and diffusers' twin ("diffusers"), checked to hold as many parameters."""
    torch.manual_seed(0)
    ours = DDPMMnistUNet.from_preset(preset).to(device)
    return {"ours": ours, "diffusers": diffusers_twin(ours).to(device)}


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` calls, after one warm-up call, the device's queued work included."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_fn(model: torch.nn.Module, batch_size: int, layout: torch.memory_format, train: str | None = None) -> Callable:
    """A step on random x_t in the model's dtype and memory `layout`: with `train` ("fp32", or "bf16" for autocast)
    one L_simple training step (Algorithm 1: forward, backward, AdamW), else a sampling forward pass without gradients.
    """
    size = model.config.sample_size
    x_t = torch.randn(batch_size, model.config.in_channels, size, size, device=model.device, dtype=model.dtype)
    x_t = x_t.contiguous(memory_format=layout)
    if train is None:
        t = torch.full((batch_size,), 500, device=x_t.device)
        return torch.no_grad()(lambda: model(x_t, t))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    eps, t = torch.randn_like(x_t), torch.randint(0, 1000, (batch_size,), device=x_t.device)

    def step() -> None:
        with torch.autocast(x_t.device.type, torch.bfloat16, enabled=train == "bf16"):
            prediction = model(x_t, t).sample
        F.mse_loss(prediction.float(), eps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_models(args: argparse.Namespace, device: torch.device, preset: str) -> dict[str, float]:
    """Training and sampling-forward rates of our UNet and its diffusers twin, one column per precision/variant."""
    models = twins(preset, device)
    results: dict[str, float] = {"parameters": sum(p.numel() for p in models["ours"].parameters())}
    with FlopCounterMode(display=False) as counter:
        step_fn(models["ours"], args.batch_size, torch.contiguous_format, "fp32")()
    variants = [("", False, torch.contiguous_format)]  # the key's suffix, compiled or not, memory layout
    variants += [("_compiled", True, torch.contiguous_format)] * args.compile
    variants += [("_channels_last", False, torch.channels_last)] * args.channels_last
    for (suffix, compile_it, layout), precision in itertools.product(variants, args.dtypes):
        for name, base in models.items():
            key = f"{name}_{precision}{suffix}"
            # Training: fp32 weights under autocast, as accelerate trains.
            model = copy.deepcopy(base).to(torch.float32, memory_format=layout).train()
            step = step_fn(torch.compile(model) if compile_it else model, args.batch_size, layout, precision)
            start = time.perf_counter()
            step()  # the first call compiles
            first = time.perf_counter() - start
            seconds = median_seconds(step, args.repeats, device)
            results[f"train_{key}"] = args.batch_size / seconds
            if compile_it:
                results[f"compile_seconds_train_{key}"] = first - seconds
            if key == "ours_fp32":
                results["train_gflops_per_second_ours_fp32"] = counter.get_total_flops() / seconds / 1e9
            # Sampling forward: the weights in the precision itself.
            model = copy.deepcopy(base).to(DTYPES[precision], memory_format=layout).eval()
            step = step_fn(torch.compile(model) if compile_it else model, args.sample_batch_size, layout)
            results[f"sample_{key}"] = args.sample_batch_size / median_seconds(step, args.repeats, device)
        line = ", ".join(
            f"{kind} ours {results[f'{kind}_ours_{precision}{suffix}']:.1f} vs diffusers "
            f"{results[f'{kind}_diffusers_{precision}{suffix}']:.1f}"
            for kind in ("train", "sample")
        )
        print(f"{preset} {precision}{suffix}: {line} (train images/s, sample image-steps/s)", flush=True)
    return results


def profile_training(args: argparse.Namespace, device: torch.device) -> dict[str, list]:
    """The top operators (self time) of one training step of each UNet of the first preset in each precision."""
    preset, activities = args.presets[0], [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda")
    sort_by, results = f"self_{device.type}_time_total", {}
    for precision, (name, model) in itertools.product(args.dtypes, twins(preset, device).items()):
        step = step_fn(model.train(), args.batch_size, torch.contiguous_format, precision)
        step()
        with torch.profiler.profile(activities=activities) as profiler:
            step()
        events = sorted(profiler.key_averages(), key=lambda e: -getattr(e, sort_by))
        total = sum(getattr(e, sort_by) for e in events)
        top = [(e.key, getattr(e, sort_by) / 1e3, getattr(e, sort_by) / total, e.count) for e in events[:12]]
        results[f"{name}_{precision}"] = top
        print(f"profile of a training step, {preset}, {name}, {precision}: {total / 1e3:.0f} ms", flush=True)
        for key, milliseconds, share, count in top:
            print(f"  {key[:60]:60} {milliseconds:9.1f} ms {share:6.1%} {count:6d} calls", flush=True)
    return results


def measure_pipelines(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Images/s of the whole sampling loop: our pipeline against DDPMPipeline, per precision, alternately."""
    unets, results, repeats = twins(args.presets[0], device), {}, max(1, args.repeats // 2)
    classes = {"ours": (DDPMMnistPipeline, DDPMMnistScheduler), "diffusers": (DDPMPipeline, DDPMScheduler)}
    settings = {"batch_size": args.sample_batch_size, "num_inference_steps": args.sampling_steps, "output_type": "pt"}
    for precision in args.dtypes:
        for name, (pipeline_class, scheduler_class) in classes.items():
            pipe = pipeline_class(copy.deepcopy(unets[name]).to(DTYPES[precision]).eval(), scheduler_class())
            pipe.set_progress_bar_config(disable=True)
            seconds = median_seconds(
                lambda p=pipe: p(generator=torch.Generator().manual_seed(0), **settings), repeats, device
            )
            results[f"pipeline_{name}_{precision}"] = args.sample_batch_size / seconds
        print(
            f"sampling, {args.sampling_steps} DDPM steps, batch {args.sample_batch_size}, {precision}: ours "
            f"{results[f'pipeline_ours_{precision}']:.2f} vs DDPMPipeline "
            f"{results[f'pipeline_diffusers_{precision}']:.2f} images/s",
            flush=True,
        )
    return results


def measure_quality(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Quality of fp32 (two seeds: the metric's noise) and bf16 samples of the released pipeline, same first seed."""
    classifier = load_mnist_classifier(device=str(device))
    real = data.load_x_0(str(args.dataset_name), "test", None, sample_size=28)
    reference, results = classifier_outputs((real + 1) / 2, classifier), {}
    runs = [("ours", "fp32", 0), ("ours", "fp32", 1), ("ours", "bf16", 0), ("ddpmpipeline", "bf16", 0)]
    for name, precision, seed in runs:
        key = f"{name}_{precision}_seed{seed}"
        pipe = DDPMMnistPipeline.from_pretrained(args.pipeline, dtype=DTYPES[precision]).to(device)
        if name == "ddpmpipeline":  # the released UNet in DDPMPipeline, whose x_t and scheduler follow the UNet's dtype
            pipe = DDPMPipeline(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        generator, start = torch.Generator().manual_seed(seed), time.perf_counter()
        batches = [
            pipe(batch_size=size, generator=generator, num_inference_steps=50, output_type="pt").images.float().cpu()
            for size in [args.sample_batch_size] * (args.num_samples // args.sample_batch_size)
        ]
        seconds = time.perf_counter() - start
        quality = sample_quality(classifier_outputs(torch.cat(batches), classifier), reference, kid_subsets=10)
        results[key] = {**quality.as_dict(), "seconds": seconds}
        print(
            f"quality {key}: FID {quality.fid:.2f}, confidence {quality.mean_confidence:.4f}, precision "
            f"{quality.precision:.3f}, recall {quality.recall:.3f} ({seconds:.0f} s)",
            flush=True,
        )
    return results


# ------------------------------------------------------------------------------------------------------------------
# End to end: train.py against the loop of diffusers' train_unconditional.py.


def train_py_seconds(args: argparse.Namespace, steps: int) -> float:
    """Wall seconds of `training/train.py` with its defaults, `steps` optimizer steps of `--e2e_preset`: the automatic
    precision (`--mixed_precision auto`: bf16 autocast on a CPU with bf16 instructions), the shuffled stream of
    `ddpm_mnist.data`, EMA, gradient clipping and the per-step logging."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, str(ROOT / "training" / "train.py"), "--dataset_name", str(args.dataset_name)]
        command += ["--preset", args.e2e_preset, "--train_batch_size", str(args.train_batch_size)]
        # The end-of-run grid of 16 digits costs the same in both runs and cancels; 10 DDPM steps instead of 1000
        # keep it from dominating the wall time.
        command += ["--max_train_steps", str(steps), "--output_dir", output_dir, "--num_inference_steps", "10"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        return time.perf_counter() - start


def diffusers_loop_rate(args: argparse.Namespace, mixed_precision: str, steps: tuple[int, int]) -> float:
    """Images/s between two step counts of train_unconditional.py's loop (`diffusers_baseline.DiffusersLoop`)."""
    torch.manual_seed(0)
    model = diffusers_twin(DDPMMnistUNet.from_preset(args.e2e_preset))
    with tempfile.TemporaryDirectory() as project_dir:
        loop = DiffusersLoop(model, str(args.dataset_name), args.train_batch_size, mixed_precision, project_dir)
        seconds = {}  # the loop's training time after each step; each ends with a loss read-back, a synchronization
        for global_step in range(1, steps[1] + 1):
            loop.step()
            seconds[global_step] = loop.train_seconds
        loop.close()
    return (steps[1] - steps[0]) * args.train_batch_size / (seconds[steps[1]] - seconds[steps[0]])


def measure_end_to_end(args: argparse.Namespace) -> dict[str, float]:
    """train.py (subprocess, two lengths) against the diffusers loop in fp32 and bf16, alternately."""
    short, long = args.e2e_steps
    train_py, loop = [], {"fp32": [], "bf16": []}
    for _ in range(args.e2e_rounds):
        first = train_py_seconds(args, short)
        loop["fp32"].append(diffusers_loop_rate(args, "fp32", (short, long)))
        second = train_py_seconds(args, long)
        loop["bf16"].append(diffusers_loop_rate(args, "bf16", (short, long)))
        train_py.append((long - short) * args.train_batch_size / (second - first))
        print(
            f"end to end, {args.e2e_preset}, batch {args.train_batch_size}: train.py {train_py[-1]:.1f} images/s "
            f"(runs of {short} and {long} steps: {first:.1f} s, {second:.1f} s); diffusers loop fp32 "
            f"{loop['fp32'][-1]:.1f}, bf16 {loop['bf16'][-1]:.1f} images/s",
            flush=True,
        )
    results = {"e2e_train_py": statistics.median(train_py)}
    results |= {f"e2e_diffusers_{precision}": statistics.median(rates) for precision, rates in loop.items()}
    best = max(results["e2e_diffusers_fp32"], results["e2e_diffusers_bf16"])
    return {**results, "e2e_speedup_vs_diffusers_best": results["e2e_train_py"] / best}


# ------------------------------------------------------------------------------------------------------------------
# Machine and data.


def matmul_peak_gflops(device: torch.device, precision: str, size: int = 2048) -> float | None:
    """GFLOP/s of a large square matmul in `precision`: the peak that the UNet's convolutions can hope for. None (not
    measured) for bf16 where the device only emulates it (an AVX2-only CPU): there a 2048^3 bf16 matmul takes about
    20 s, and its rate, below that of the emulated bf16 convolutions, is no peak."""
    if precision == "bf16" and not has_native_bf16(device):
        return None
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[precision]) for _ in range(2))
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats=5, device=device) / 1e9


def measure_data(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Images/s of our two data paths (the shuffled stream, and decode-once + exact shuffle) and of plain `datasets`.
    Decode-once pays for decoding every PNG up front (reported apart, and amortised over one epoch); after that an
    epoch is an index permutation and a uint8 -> float copy per batch, which is what a training loop then sees."""
    num_images, preprocess = 5_000 if args.quick else 20_000, data.ImagePreprocessor(28)
    stream = data.load_image_stream(args.dataset_name)
    loader = DataLoader(data.shuffled_shard(stream, seed=0, epoch=0), batch_size=256, collate_fn=preprocess)

    def ours_stream() -> None:
        for _ in itertools.islice(loader, (num_images + 255) // 256):  # batches of 256 up to num_images
            pass

    start = time.perf_counter()
    digits = data.decode_stream(stream, preprocess)
    decode_seconds = time.perf_counter() - start

    def ours_decoded() -> None:
        for epoch in range(3):
            for indices in data.epoch_order(len(digits), seed=0, epoch=epoch).split(256):
                preprocess.scale(digits[indices])

    plain_stream = load_dataset(args.dataset_name, split="train", streaming=True).shuffle(seed=0, buffer_size=10_000)

    def plain() -> None:
        for example in itertools.islice(plain_stream, num_images):
            torch.from_numpy(np.asarray(example["image"], dtype=np.float32) / 127.5 - 1)

    epoch_seconds = median_seconds(ours_decoded, 3, device) / 3
    rates = {
        "data_images_per_second": len(digits) / epoch_seconds,
        "data_decode_once_seconds": decode_seconds,
        "data_first_epoch_images_per_second": len(digits) / (decode_seconds + epoch_seconds),
        "data_stream_images_per_second": num_images / median_seconds(ours_stream, 1, device),
        "plain_datasets_images_per_second": num_images / median_seconds(plain, 1, device),
    }
    print("data: " + ", ".join(f"{key} {value:.1f}" for key, value in rates.items()), flush=True)
    return rates


def parse_args() -> argparse.Namespace:
    """The flags, checked: a bad device, data folder or pipeline is a UsageError before any measurement."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=["mnist-small"], choices=DDPMMnistUNet.preset_names())
    parser.add_argument("--dtypes", nargs="+", default=list(BENCHMARK_DTYPES), choices=BENCHMARK_DTYPES,
                        help="the precisions measured")  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=["models", "sample", "e2e"], choices=PARTS)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--channels_last", action="store_true", help="also measure models in channels_last")
    parser.add_argument("--batch_size", type=int, default=64, help="training batch of the models part")
    parser.add_argument("--sample_batch_size", type=int, default=100, help="images per sampling forward pass")
    parser.add_argument("--sampling_steps", type=int, default=50, help="DDPM steps of the sample part")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--e2e_preset", default="mnist-small", choices=DDPMMnistUNet.preset_names())
    parser.add_argument("--e2e_steps", nargs=2, type=int, default=[15, 65], help="the two run lengths of e2e")
    parser.add_argument("--e2e_rounds", type=int, default=1, help="alternating rounds of the e2e measurement")
    parser.add_argument("--train_batch_size", type=int, default=128, help="batch of e2e (train.py's default)")
    parser.add_argument("--num_samples", type=int, default=1000, help="digits per quality measurement")
    parser.add_argument("--pipeline", default=str(DEFAULT_PIPELINE), help="the pipeline of the quality part")
    parser.add_argument("--dataset_name", default=data.DEFAULT_DATASET, help="MNIST: a Hub dataset id or a local copy")
    parser.add_argument("--quick", action="store_true", help="2 repeats, 10 sampling steps, e2e runs of 5 and 20")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.sampling_steps, args.e2e_steps = 2, 10, [5, 20]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; pass --device cpu.")
    if not args.e2e_steps[0] < args.e2e_steps[1]:
        raise UsageError(f"--e2e_steps {args.e2e_steps} must be two increasing step counts, e.g. 15 65.")
    if {"e2e", "quality", "data"} & set(args.parts):
        with usage_errors("dataset_name"):  # a missing or unreadable dataset is refused here
            data.load_image_stream(args.dataset_name, "test")
    if "quality" in args.parts and not Path(args.pipeline).is_dir():
        raise UsageError(f"--pipeline {args.pipeline!r} is not a folder; pass a saved DDPMMnistPipeline.")
    if min(args.batch_size, args.sample_batch_size, args.repeats, args.train_batch_size, args.num_samples) < 1:
        raise UsageError("batch sizes, --repeats and --num_samples must be positive.")
    return args


def main() -> None:
    """Measure the parts asked for and print them (and, with --json, one JSON object last)."""
    args = parse_args()
    device = torch.device(args.device)
    # diffusers warns on every `.to(dtype)` of a model about fp32 modules that neither UNet has.
    diffusers_logging.set_verbosity_error()
    peaks = {p: matmul_peak_gflops(device, p) for p in args.dtypes}
    results: dict[str, object] = {"device": describe_device(device), "torch": torch.__version__}
    results |= {f"matmul_peak_gflops_{p}": peak for p, peak in peaks.items()}
    shown = ", ".join(f"{p} not measured (emulated)" if v is None else f"{p} {v:.0f}" for p, v in peaks.items())
    print(f"{results['device']}; torch {torch.__version__}; 2048^3 matmul GFLOP/s: {shown}", flush=True)
    if "models" in args.parts:
        results |= {preset: measure_models(args, device, preset) for preset in args.presets}
    # The other parts in this order, each under its own name.
    parts = {"profile": profile_training, "sample": measure_pipelines, "e2e": lambda args, _: measure_end_to_end(args)}
    for part, measure in {**parts, "quality": measure_quality, "data": measure_data}.items():
        if part in args.parts:
            results[part] = measure(args, device)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    run_entry_point(main, "throughput.py")
