"""Tests for benchmarks/time_to_quality.py: one toy-size run on the 96-digit fixture, its bad input, its ratio."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "time_to_quality.py"
SNAPSHOTS = [0.02, 0.04]  # training minutes: 1.2 s and 2.4 s of each side's training loop
TOY = ["--snapshot_minutes", *map(str, SNAPSHOTS), "--num_samples", "16", "--num_inference_steps", "4"]
METRICS = {"fid", "kid", "precision", "recall", "mean_confidence", "class_histogram", "num_images"}


def run_script(*flags: str) -> subprocess.CompletedProcess:
    """The script in a subprocess on one thread (the machine is shared), offline, on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "--device", "cpu", *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def refusal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *flags: str) -> tuple[int, list[str]]:
    """The script run as `__main__` in this process, for input it refuses before any work: its exit status and the
    lines it wrote to stderr. (What a fresh interpreter would add, `test_a_recipe_that_is_not_json_is_refused` sees.)"""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--device", "cpu", *flags])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return exit_status.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def toy_run(mnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy benchmark: the tiny preset, batch 16, two snapshots of seconds, 16 samples of 4 DDPM steps in bf16."""
    folder = tmp_path_factory.mktemp("ttq")
    recipe = {
        "preset": "tiny",
        "train_batch_size": 16,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 5,
        "checkpointing_steps": 1000,
        "save_images_steps": 100000,
        "num_samples": 4,
        "num_inference_steps": 4,
    }
    (folder / "recipe.json").write_text(json.dumps(recipe))
    flags = ["--config", str(folder / "recipe.json"), "--output_dir", str(folder / "out"), *TOY, "--dtype", "bf16"]
    result = run_script(*flags, "--dataset_name", str(mnist_folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


def test_both_sides_have_every_snapshot(toy_run: Path) -> None:
    results = json.loads((toy_run / "time_to_quality.json").read_text())
    assert results["settings"]["num_samples"] == 16
    assert results["settings"]["recipe"]["preset"] == "tiny"
    assert results["settings"]["sampling_dtype"] == "bf16"
    assert METRICS <= set(results["floor"]) and results["floor"]["num_images"] == 16
    for side, batch in (("recipe", 16), ("baseline", 16)):
        snapshots = results[side]
        assert [s["minutes"] for s in snapshots] == SNAPSHOTS
        steps = [s["steps"] for s in snapshots]
        assert 0 < steps[0] < steps[1], f"{side} did not train on between snapshots: {steps}"
        assert [s["images_seen"] for s in snapshots] == [batch * n for n in steps]
        for s in snapshots:
            assert METRICS <= set(s["metrics"]) and s["metrics"]["num_images"] == 16
            assert s["metrics"]["unet_dtype"] == "torch.bfloat16", f"{side} did not sample in bf16"
            assert 0 <= s["metrics"]["mean_confidence"] <= 1 and s["metrics"]["fid"] >= 0
            assert sum(s["metrics"]["class_histogram"]) == pytest.approx(1)
    assert [row["minutes"] for row in results["equal_minutes"]] == SNAPSHOTS
    ratio = results["ratio"]
    assert ratio["baseline_minutes"] == SNAPSHOTS[-1]
    assert ratio["baseline_final_fid"] == results["baseline"][-1]["metrics"]["fid"]
    if ratio["recipe_minutes_to_baseline_final_fid"] is not None:
        assert ratio["speedup"] == pytest.approx(SNAPSHOTS[-1] / ratio["recipe_minutes_to_baseline_final_fid"])
    # The recipe's run was resumed once: one train.py run per snapshot, in its own folder.
    assert (toy_run / "recipe" / "model_index.json").is_file()
    assert (toy_run / "recipe" / "train.log").read_text().count("resumed from") == 1


def test_curve_is_a_png(toy_run: Path) -> None:
    assert (toy_run / "time_to_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--snapshot_minutes", "20", "10"], "--snapshot_minutes"),
        (["--num_inference_steps", "0"], "--num_inference_steps"),
    ],
)
def test_bad_flag_is_one_line_with_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, flags: list[str], problem: str
) -> None:
    (tmp_path / "recipe.json").write_text(json.dumps({"preset": "tiny"}))
    flags = ["--config", str(tmp_path / "recipe.json"), "--output_dir", str(tmp_path / "out"), *flags]
    status, lines = refusal(monkeypatch, capsys, *flags)
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("time_to_quality.py: error: ") and problem in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_recipe_that_is_not_json_is_refused(tmp_path: Path) -> None:
    """Through a fresh interpreter, as a user runs it: nothing its imports print breaks the one line."""
    (tmp_path / "recipe.json").write_text("preset: tiny")
    result = run_script("--config", str(tmp_path / "recipe.json"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "--config" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("time_to_quality.py: error: ") and not (tmp_path / "out").exists()


def test_a_recipe_whose_decay_would_follow_each_snapshot_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "recipe.json").write_text(json.dumps({"preset": "tiny", "lr_scheduler": "cosine"}))
    flags = ["--config", str(tmp_path / "recipe.json"), "--output_dir", str(tmp_path / "out")]
    status, lines = refusal(monkeypatch, capsys, *flags)
    assert status == 2 and len(lines) == 1
    assert "decays its learning rate (cosine) with no max_train_steps" in lines[0]
    assert not (tmp_path / "out").exists()


def test_minutes_to_reach_interpolates_between_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    minutes_to_reach = runpy.run_path(str(SCRIPT))["minutes_to_reach"]
    # FID 100 at 10 min, 60 at 20 min: 80 is reached halfway, at 15 min.
    assert minutes_to_reach([10, 20, 30], [100, 60, 40], 80) == pytest.approx(15)
    assert minutes_to_reach([10, 20, 30], [100, 60, 40], 40) == pytest.approx(30)
    assert minutes_to_reach([10, 20], [50, 40], 80) == 10  # already there at the first snapshot
    assert minutes_to_reach([10, 20], [100, 90], 80) is None
