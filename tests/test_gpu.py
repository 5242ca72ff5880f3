"""CUDA tests (marker `cuda`): skipped where there is no CUDA, run on a GPU by `benchmarks/gpu_run.sh`.

The pipeline on `cuda` with CPU and CUDA generators and every compatible scheduler, bf16 and fp16 pipelines,
`train.py` with bf16 and fp16 mixed precision and a resume, the NLL bound on CUDA against the CPU, and the
decode-once data path feeding the GPU. Tolerances allow for TF32 convolutions (PyTorch's default for cuDNN).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, UniPCMultistepScheduler

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.metrics.likelihood import variational_bound
from tests.test_pipeline import SWAPPED_SCHEDULERS
from tests.test_train import read_ids, train
from tests.utils import logged_scalars, tiny_unet

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def pipeline(device: str, dtype: torch.dtype = torch.float32) -> DDPMMnistPipeline:
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler()).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: DDPMMnistPipeline, generator: torch.Generator, steps: int = 10) -> torch.Tensor:
    return pipe(batch_size=4, generator=generator, num_inference_steps=steps, output_type="pt").images


@pytest.mark.parametrize("scheduler_class", [DDPMMnistScheduler, *SWAPPED_SCHEDULERS])
def test_pipeline_on_cuda_with_a_cpu_generator_draws_the_cpu_digits(scheduler_class):
    cpu, cuda = pipeline("cpu"), pipeline("cuda")
    for pipe in (cpu, cuda):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    expected = draw(cpu, torch.Generator().manual_seed(0))
    images = draw(cuda, torch.Generator().manual_seed(0))
    assert images.device.type == "cuda"
    torch.testing.assert_close(images.cpu(), expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("scheduler_class", [DDPMMnistScheduler, *SWAPPED_SCHEDULERS])
def test_pipeline_with_a_cuda_generator_is_deterministic_and_differs_by_seed(scheduler_class):
    pipe = pipeline("cuda")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    first, again = (draw(pipe, torch.Generator("cuda").manual_seed(3)) for _ in range(2))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - draw(pipe, torch.Generator("cuda").manual_seed(4))).abs().max() > 0.1
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheduler_class", [DDPMMnistScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler])
def test_half_precision_pipelines_draw_the_float32_digits(dtype, scheduler_class):
    reference, half = pipeline("cuda"), pipeline("cuda", dtype)
    for pipe in (reference, half):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    assert half.unet.dtype == dtype
    expected = draw(reference, torch.Generator().manual_seed(0))
    images = draw(half, torch.Generator().manual_seed(0))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    # Half-precision network outputs, float32 sampling arithmetic: the same digits up to a few grey levels.
    assert (images - expected).abs().mean() < 0.02


def test_nll_bound_on_cuda_agrees_with_the_cpu_for_the_same_inputs():
    unet = tiny_unet()
    scheduler = DDPMMnistScheduler(num_train_timesteps=50)
    x_0 = torch.randint(0, 256, (6, 1, 28, 28), generator=torch.Generator().manual_seed(1)) / 127.5 - 1
    bounds = {
        device: variational_bound(
            unet.to(device), scheduler, x_0, batch_size=4, generator=torch.Generator().manual_seed(2), progress=False
        )
        for device in ("cpu", "cuda")
    }
    assert bounds["cuda"].exact and bounds["cpu"].exact
    torch.testing.assert_close(bounds["cuda"].total_bpd, bounds["cpu"].total_bpd, rtol=1e-3, atol=0)
    torch.testing.assert_close(bounds["cuda"].terms_bpd, bounds["cpu"].terms_bpd, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_resumes_and_saves_a_working_pipeline(tmp_path, mnist_folder, precision):
    flags = [f"--mixed_precision={precision}", "--decode_once"]
    first, run, _ = train(tmp_path, mnist_folder, "run", "--max_train_steps=4", "--checkpointing_steps=4", *flags)
    assert first.returncode == 0, first.stderr
    resume = [f"--output_dir={run}", "--max_train_steps=8", "--resume_from_checkpoint=latest"]
    second, _, _ = train(tmp_path, mnist_folder, "run-2", *resume, *flags)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and (run / "checkpoints" / "checkpoint-8").is_dir()
    record = json.loads((run / "training.json").read_text())["training"]
    assert record["global_step"] == 8 and record["mixed_precision"] == precision
    assert torch.cuda.get_device_name() in record["hardware"]
    losses = logged_scalars(run, "loss")
    assert np.isfinite(losses).all() and len(losses) == 8
    pipe = DDPMMnistPipeline.from_pretrained(run).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(draw(pipe, torch.Generator().manual_seed(0), steps=3)).all()


def test_bf16_training_reaches_the_float32_loss_in_the_same_steps(tmp_path, mnist_folder):
    steps = ["--max_train_steps=30", "--decode_once", "--learning_rate=1e-3"]
    runs = {}
    for precision in ("fp32", "bf16"):
        process, runs[precision], _ = train(tmp_path, mnist_folder, precision, *steps, f"--mixed_precision={precision}")
        assert process.returncode == 0, process.stderr
    fp32, bf16 = logged_scalars(runs["fp32"], "loss"), logged_scalars(runs["bf16"], "loss")
    # Same seed, data order, t and eps: the curves differ only by rounding; compare the last 10 steps' mean.
    assert abs(bf16[-10:].mean() / fp32[-10:].mean() - 1) < 0.1, (fp32[-10:], bf16[-10:])
    assert bf16[-10:].mean() < 0.8 * bf16[:3].mean()  # and it did learn


def test_decode_once_feeds_the_gpu_the_same_examples_as_the_cpu(tmp_path, mnist_folder):
    records = {}
    for device, env in (("cuda", {}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
        process, _, records[device] = train(
            tmp_path, mnist_folder, device, "--max_train_steps=8", "--decode_once", **env
        )
        assert process.returncode == 0, process.stderr
    seen = read_ids(records["cuda"] / "seen-0.txt")
    assert seen == read_ids(records["cpu"] / "seen-0.txt")
    assert len(seen) == 8 * 16 and sorted(seen[:96]) == list(range(96))  # one exact epoch, then the next begins
