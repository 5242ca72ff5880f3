"""Throughput of ddpm-mnist against diffusers, measured in one process on this machine.

    python benchmarks/throughput.py [--quick] [--json] [--device cpu|cuda] [--parts train sample data]

1. Training: images/s of a full step (forward, backward, AdamW) of `DDPMMnistUNet` and of `diffusers.UNet2DModel`
   built to the same architecture (same parameter count), for the `mnist-small` and `mnist` presets.
2. Sampling: images/s of the 1000-step DDPM loop, `DDPMMnistPipeline` against diffusers' `DDPMPipeline`.
3. Achieved GFLOP/s of our training step (FLOPs from `torch.utils.flop_counter`) over a float32 matmul peak
   measured in the same run.
4. Data: decoded, preprocessed images/s of `ddpm_mnist.data` (the shuffled stream, and `--decode_once`: decode every
   PNG once, then an exact shuffle per epoch) against plain `datasets` streaming of the same files.

Every ratio compares two measurements taken a few seconds apart in this process; each timing is the median of
several repeats after a warm-up. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.data import ImagePreprocessor, decode_stream, epoch_order, load_image_stream, shuffled_shard

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def diffusers_twin(unet: DDPMMnistUNet) -> UNet2DModel:
    """`UNet2DModel` configured to the architecture of `unet`: same levels, channels, blocks and attention."""
    c = unet.config
    resolutions = [c.sample_size // 2**i for i in range(len(c.channel_mult))]
    attention = [r in c.attention_resolutions for r in resolutions]
    return UNet2DModel(
        sample_size=c.sample_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        layers_per_block=c.layers_per_block,
        block_out_channels=tuple(c.base_channels * m for m in c.channel_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=c.norm_num_groups,
        dropout=c.dropout,
        attention_head_dim=None,  # one head, as in the paper
        flip_sin_to_cos=False,
        freq_shift=1,
    )


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(model: torch.nn.Module, batch_size: int, device: torch.device) -> Callable[[], None]:
    """One L_simple training step on random data: forward, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    size = model.config.sample_size
    x_t = torch.randn(batch_size, model.config.in_channels, size, size, device=device)
    eps = torch.randn_like(x_t)
    t = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x_t, t).sample, eps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_flops(model: DDPMMnistUNet, batch_size: int, device: torch.device) -> int:
    """FLOPs of one forward + backward, counted by `torch.utils.flop_counter` (2 per multiply-add)."""
    step = train_step_fn(model, batch_size, device)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_peak_gflops(device: torch.device, size: int) -> float:
    """Float32 GFLOP/s of a large square matmul: the peak that the UNet's convolutions can hope for."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats=5) / 1e9


def sampling_images_per_second(pipeline, batch_size: int, steps: int, repeats: int) -> float:
    """Images/s of the full sampling loop at `steps` steps."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    seconds = median_seconds(
        lambda: pipeline(batch_size=batch_size, generator=generator, num_inference_steps=steps, output_type="np"),
        repeats,
    )
    return batch_size / seconds


def data_images_per_second(data: str, num_images: int) -> dict[str, float]:
    """Images/s of our two data paths (the shuffled stream, and decode-once + exact shuffle) and of plain `datasets`.

    Decode-once pays for decoding every PNG up front (reported apart, and amortised over one epoch); after that an
    epoch is an index permutation and a uint8 -> float copy per batch, which is what a training loop then sees.
    """
    preprocess = ImagePreprocessor(28)
    stream = load_image_stream(data)
    loader = DataLoader(shuffled_shard(stream, seed=0, epoch=0), batch_size=256, collate_fn=preprocess)

    def ours_stream() -> None:
        seen = 0
        for x_0 in loader:
            seen += len(x_0)
            if seen >= num_images:
                return

    start = time.perf_counter()
    digits = decode_stream(stream, preprocess)
    decode_seconds = time.perf_counter() - start

    def ours_decoded() -> None:
        for epoch in range(3):
            for indices in epoch_order(len(digits), seed=0, epoch=epoch).split(256):
                preprocess.scale(digits[indices])

    plain_stream = load_dataset(data, split="train", streaming=True).shuffle(seed=0, buffer_size=10_000)

    def plain() -> None:
        for i, example in enumerate(plain_stream):
            torch.from_numpy(np.asarray(example["image"], dtype=np.float32) / 127.5 - 1)
            if i + 1 >= num_images:
                return

    epoch_seconds = median_seconds(ours_decoded, 3) / 3
    return {
        "data_images_per_second": len(digits) / epoch_seconds,
        "data_decode_once_seconds": decode_seconds,
        "data_first_epoch_images_per_second": len(digits) / (decode_seconds + epoch_seconds),
        "data_stream_images_per_second": num_images / median_seconds(ours_stream, 1),
        "plain_datasets_images_per_second": num_images / median_seconds(plain, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 100 sampling steps, mnist-small only")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a local copy of ylecun/mnist")
    parser.add_argument("--batch_size", type=int, default=64, help="training batch size")
    parts = ["train", "sample", "data"]
    parser.add_argument("--parts", nargs="+", choices=parts, default=parts, help="what to measure")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 3 if args.quick else 7
    presets = ["mnist-small"] if args.quick else ["mnist-small", "mnist"]
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

    if "train" in args.parts:
        for preset in presets:
            torch.manual_seed(0)
            ours = DDPMMnistUNet.from_preset(preset).to(device)
            theirs = diffusers_twin(ours).to(device)
            n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
            assert abs(n_theirs / n_ours - 1) < 0.01, f"architectures differ: {n_ours} vs {n_theirs} parameters"
            t_ours = median_seconds(train_step_fn(ours, args.batch_size, device), repeats)
            t_theirs = median_seconds(train_step_fn(theirs, args.batch_size, device), repeats)
            flops = training_flops(ours, args.batch_size, device)
            results[preset] = {
                "parameters": n_ours,
                "train_images_per_second": args.batch_size / t_ours,
                "diffusers_train_images_per_second": args.batch_size / t_theirs,
                "train_speedup_vs_diffusers": t_theirs / t_ours,
                "train_gflops_per_second": flops / t_ours / 1e9,
            }
            print(f"{preset}: training {results[preset]}", flush=True)

        peak = matmul_peak_gflops(device, 1024 if args.quick else 2048)
        results["matmul_peak_gflops"] = peak
        small = results["mnist-small"]
        results["train_speedup_vs_diffusers"] = small["train_speedup_vs_diffusers"]
        results["train_fraction_of_peak"] = small["train_gflops_per_second"] / peak
        print(f"matmul peak {peak:.1f} GFLOP/s; training reaches {results['train_fraction_of_peak']:.1%}", flush=True)

    if "sample" in args.parts:
        # Sampling: the full DDPM loop, our pipeline against diffusers' DDPMPipeline with the twin UNet.
        steps = 100 if args.quick else 1000
        torch.manual_seed(0)
        ours = DDPMMnistUNet.from_preset("mnist-small").to(device).eval()
        theirs = diffusers_twin(ours).to(device).eval()
        ours_pipe = DDPMMnistPipeline(ours, DDPMMnistScheduler())
        theirs_pipe = DDPMPipeline(theirs, DDPMScheduler())
        sample_repeats = 1 if args.quick else 3
        s_ours = sampling_images_per_second(ours_pipe, 16, steps, sample_repeats)
        s_theirs = sampling_images_per_second(theirs_pipe, 16, steps, sample_repeats)
        results.update(
            sampling_steps=steps,
            sample_images_per_second=s_ours,
            diffusers_sample_images_per_second=s_theirs,
            sample_speedup_vs_diffusers=s_ours / s_theirs,
        )
        print(f"sampling at {steps} steps: {s_ours:.2f} vs diffusers {s_theirs:.2f} images/s", flush=True)

    if "data" in args.parts and os.path.isdir(args.data):
        rates = data_images_per_second(args.data, 5_000 if args.quick else 20_000)
        results.update(rates)
        print("data: " + ", ".join(f"{key} {value:.1f}" for key, value in rates.items()), flush=True)

    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
