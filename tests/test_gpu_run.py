"""The GPU run on the CPU: `benchmarks/gpu_run.sh --dry-run` runs every stage at toy sizes, brings back at most 8
files, and `training/release.py --gpu_results` assembles a release folder from them."""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.errors import UsageError
from ddpm_mnist.hardware import has_native_bf16
from tests.test_hub import PIPELINE_FILES, REMOTE_CODE

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = ROOT / "benchmarks" / "gpu_run.sh"
STAGES = ["setup", "tests", "throughput", "train", "archive", "evaluate_fast", "evaluate_ddpm", "nll", "grid"]
RELEASE_FILES = ["README.md", *PIPELINE_FILES, *REMOTE_CODE, "samples/grid.png"]


@pytest.fixture(scope="module")
def driver() -> dict:
    return runpy.run_path(str(ROOT / "benchmarks" / "gpu_run.py"))


@pytest.fixture(scope="module")
def release_module() -> dict:
    return runpy.run_path(str(ROOT / "training" / "release.py"))


@pytest.fixture(scope="module")
def dry_run(mnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu") / "out"
    command = ["bash", str(GPU_RUN), str(out), "--dry-run", f"--dataset_name={mnist_folder}"]
    process = subprocess.run(
        command, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900
    )
    return process, out


def unpack(out: Path, parts: list[str], destination: Path) -> Path:
    """Join the archive parts as the release does it by hand: cat, then tar."""
    joined = destination / "pipeline.tar.gz"
    joined.write_bytes(b"".join((out / name).read_bytes() for name in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(destination / "run", filter="data")
    return destination / "run"


def test_the_dry_run_runs_every_stage_and_brings_back_at_most_8_files(dry_run, tmp_path):
    process, out = dry_run
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == STAGES and results["dry_run"] is True
    assert {name: stage["status"] for name, stage in results["stages"].items()} == dict.fromkeys(STAGES, "ok")
    stages = {name: stage["result"] for name, stage in results["stages"].items()}
    assert stages["tests"].get("skipped", 0) > 0 and "failed" not in stages["tests"]  # no CUDA here: all skipped
    throughput = stages["throughput"]
    assert throughput["tiny"]["train_ours_bf16"] > 0 and throughput["matmul_peak_gflops_fp32"] > 0
    if has_native_bf16("cpu"):
        assert 0 < throughput["train_fraction_of_bf16_peak"] < 1
    else:  # emulated bf16 (an AVX2-only CPU): its matmul rate is no peak, and is not measured
        assert throughput["matmul_peak_gflops_bf16"] is None and throughput["train_fraction_of_bf16_peak"] is None
    training = stages["train"]["training"]
    assert training["global_step"] == 6 and training["images_seen"] == 6 * 16 and training["mixed_precision"] == "bf16"
    assert (stages["evaluate_fast"]["num_images"], stages["evaluate_fast"]["steps"]) == (16, 5)
    assert stages["evaluate_fast"]["floor"]["num_images"] == 16
    assert (stages["evaluate_ddpm"]["num_images"], stages["evaluate_ddpm"]["steps"]) == (8, 20)  # all T = 20 steps
    assert stages["nll"]["exact"] is True and stages["nll"]["num_images"] == 8

    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == sorted(["results.json", "train.log", "stages.log", "grid.png", *stages["archive"]])
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert all((out / name).stat().st_size < 16 * 2**20 for name in files)
    run = unpack(out, stages["archive"], tmp_path)
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (run / "training.json").is_file()
    assert list((run / "logs").rglob("events.out.tfevents.*")) and not (run / "checkpoints").exists()
    # The summary table comes last: one line per stage, then the total.
    table = process.stdout.strip().splitlines()[-len(STAGES) - 2 :]
    assert table[0].split()[:3] == ["stage", "status", "seconds"] and table[-1].startswith("total")
    assert [line.split()[:2] for line in table[1:-1]] == [[name, "ok"] for name in STAGES]
    peak_cell = "of the bf16 matmul peak" if has_native_bf16("cpu") else "bf16 matmul peak not measured"
    assert peak_cell in table[1 + STAGES.index("throughput")]


def test_the_archive_is_split_into_parts_that_join_back(driver, tmp_path):
    run, out, work = tmp_path / "run", tmp_path / "out", tmp_path / "work"
    for folder in (run / "unet", run / "checkpoints" / "checkpoint-1", out, work):
        folder.mkdir(parents=True)
    weights = os.urandom(40 * 2**20)  # incompressible: 40 MB of archive
    (run / "unet" / "weights.safetensors").write_bytes(weights)
    (run / "checkpoints" / "checkpoint-1" / "optimizer.bin").write_bytes(b"state")
    parts = driver["pack_pipeline"](run, out, work)
    assert parts == ["pipeline.tar.gz.00", "pipeline.tar.gz.01", "pipeline.tar.gz.02"]
    assert all((out / name).stat().st_size <= 15 * 2**20 for name in parts)
    unpacked = unpack(out, parts, work)
    assert (unpacked / "unet" / "weights.safetensors").read_bytes() == weights
    assert not (unpacked / "checkpoints").exists()


def test_fraction_of_the_bf16_peak_counts_the_flops_of_one_image(driver):
    # 100 GFLOP/s at 10 images/s: 10 GFLOP per image; at 30 bf16 images/s that is 300 of a 600 GFLOP/s peak.
    models = {"train_gflops_per_second_ours_fp32": 100.0, "train_ours_fp32": 10.0, "train_ours_bf16": 30.0}
    assert driver["bf16_fraction_of_peak"]({"mnist": models, "matmul_peak_gflops_bf16": 600.0}, "mnist") == 0.5
    assert driver["bf16_fraction_of_peak"]({"mnist": models}, "mnist") is None


def test_training_steps_follow_the_measured_throughput(driver):
    measured = {"mnist": {"train_ours_bf16": 8000.0}}
    assert driver["planned_steps"](measured, 300, 256) == 6562  # 300 s x 8000 images/s x 0.7 / 256
    assert driver["planned_steps"](None, 300, 256) == 3281  # the fallback, 4000 images/s


def test_bad_input_is_refused_in_one_line_before_any_work(driver, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.json").write_text("{}")
    process = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), str(tmp_path / "full"), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert process.returncode == 2 and process.stderr.count("\n") == 1, process.stderr
    assert "is a file or a non-empty folder; pass a new or empty folder" in process.stderr
    for flags, message in [
        ([str(tmp_path / "new"), "--dry-run", f"--dataset_name={tmp_path}"], "holds no MNIST parquet files"),
        ([str(tmp_path / "new"), "--budget_minutes=0"], "--budget_minutes must be positive"),
    ]:
        with pytest.raises(UsageError, match=message):
            driver["main"](driver["parse_args"](flags))
    assert not (tmp_path / "new").exists()


def release(module: dict, results: Path, output_dir: Path, *flags: str) -> None:
    arguments = [f"--gpu_results={results}", f"--output_dir={output_dir}", "--hub_model_id=tester/gpu", *flags]
    module["main"](module["parse_args"](arguments))


def test_the_release_is_assembled_from_the_dry_run_without_sampling(dry_run, release_module, tmp_path, capsys):
    _, out = dry_run
    results = json.loads((out / "results.json").read_text())
    release(release_module, out, tmp_path / "release", "--note=Trained for a test.")
    folder = tmp_path / "release"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(RELEASE_FILES)
    assert (folder / "samples" / "grid.png").read_bytes() == (out / "grid.png").read_bytes()
    card = (folder / "README.md").read_text()
    stages = {name: stage["result"] for name, stage in results["stages"].items()}
    training = stages["train"]["training"]
    assert (
        f"| hardware | {training['hardware']} |" in card and f"| training time | {training['training_time']} |" in card
    )
    assert "| mixed precision | bf16 |" in card and results["stages"]["setup"]["result"]["device"] in card
    assert "| metric | DDPM, 5 steps (N=16) | real floor (N=16) | DDPM, 20 steps (N=8) | real floor (N=8) |" in card
    assert f"| {stages['evaluate_fast']['fid']:.4f} | {stages['evaluate_fast']['floor']['fid']:.4f} |" in card
    assert f"**{stages['nll']['nll_bpd']:.3f} +- " in card and "exact over all T terms" in card
    # The GPU release's own targets, its NLL bound among them, on the recommended setting's column.
    assert "**Targets** (at DDPM, 5 steps, N=16):" in card and "- mean classifier confidence " in card
    nll_line = f"- NLL bound {stages['nll']['nll_bpd']:.3f} bits/dim (target <= 1.3): **"
    assert "(target <= 1.3x): **" in card and nll_line in card
    assert "--lr_scheduler=cosine" in card and results["stages"]["setup"]["result"]["device"] in card
    assert "`benchmarks/gpu_run.py`.\n\nTrained for a test.\n" in card  # the note closes the evaluation section
    assert "ylecun/mnist" in card and str(out) not in card
    assert "num_inference_steps=20, generator=generator" in card  # the card's code: DDPM on all T = 20 steps
    model_index = json.loads((folder / "model_index.json").read_text())
    assert "_name_or_path" not in model_index  # the folder it was unpacked into stays here
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output_dir"] == str(folder)
    # The release holds the GPU run's weights: the same digits for the same seed.
    trained = DDPMMnistPipeline.from_pretrained(unpack(out, stages["archive"], tmp_path))
    draws = [
        p(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
        for p in (DDPMMnistPipeline.from_pretrained(folder), trained)
    ]
    torch.testing.assert_close(*draws, rtol=0, atol=0)


def test_the_release_refuses_an_incomplete_run_or_an_existing_folder(dry_run, release_module, tmp_path):
    _, out = dry_run
    with pytest.raises(UsageError, match="has no results.json; pass the folder that benchmarks/gpu_run.sh wrote"):
        release(release_module, tmp_path, tmp_path / "new")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="exists; pass a new folder"):
        release(release_module, out, tmp_path / "taken")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    results = json.loads((broken / "results.json").read_text())
    results["stages"]["nll"]["status"] = "timeout"
    (broken / "results.json").write_text(json.dumps(results))
    with pytest.raises(UsageError, match="did not finish nll"):
        release(release_module, broken, tmp_path / "new")
    (broken / "results.json").write_text(json.dumps(json.loads((out / "results.json").read_text())))
    (broken / "pipeline.tar.gz.00").unlink()
    with pytest.raises(UsageError, match="lacks pipeline.tar.gz.00"):
        release(release_module, broken, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # A release comes from a run or from GPU results, never both.
    with pytest.raises(SystemExit):
        release_module["parse_args"]([str(tmp_path), f"--gpu_results={out}", "--output_dir=x", "--hub_model_id=a/b"])
