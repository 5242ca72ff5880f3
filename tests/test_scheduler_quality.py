"""Tests for benchmarks/scheduler_quality.py, run in-process on a tiny pipeline and a small MNIST-layout folder."""

from __future__ import annotations

import json
import math
import runpy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.errors import run_entry_point
from ddpm_mnist.metrics.quality import SampleQuality
from tests.utils import tiny_unet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scheduler_quality.py"
T = 10  # the tiny pipeline's training timesteps: --steps above it are skipped


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on 2 cores busy with other work, a second OpenMP thread slows the tiny tensor ops here
    by one to two orders of magnitude (the test checks results, not speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """The script's functions, loaded without running it."""
    return SimpleNamespace(**runpy.run_path(str(SCRIPT)))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny pipeline with a 10-step schedule."""
    folder = tmp_path_factory.mktemp("pipeline")
    DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def pipeline_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int, int]]:
    """Every pipeline call as (scheduler class, its T, num_inference_steps, batch_size); the calls still run."""
    calls = []
    original = DDPMMnistPipeline.__call__

    def spy(self, *args, **kwargs):
        scheduler = self.scheduler
        steps, size = kwargs["num_inference_steps"], kwargs["batch_size"]
        calls.append((type(scheduler).__name__, scheduler.config.num_train_timesteps, steps, size))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDPMMnistPipeline, "__call__", spy)
    return calls


def quality(fid: float, num_images: int = 100) -> SampleQuality:
    """Scores with the given FID; the other values only need to be plausible."""
    return SampleQuality(fid, 0.01, 0.001, 0.8, 0.7, 0.9, 3.3, 0.09, [0.1] * 10, num_images)


def test_every_option_states_its_default(bench, capsys):
    parser = bench.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in action.help, f"{'/'.join(action.option_strings)} does not state its default"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--reference_images" in capsys.readouterr().out


def test_tabulates_each_scheduler_at_each_step_count(bench, pipeline_dir, mnist_folder, capsys, pipeline_calls):
    argv = [pipeline_dir, "--schedulers", "ddpm", "ddim", "--num_inference_steps", "4", "2", str(T + 1)]
    argv += ["--batch_size", "5", "--num_samples", "12", "--reference_images", "24", "--json", "--device", "cpu"]
    argv += ["--dataset_name", str(mnist_folder)]
    bench.main(argv)
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])

    pairs = [("ddpm", 2), ("ddpm", 4), ("ddim", 2), ("ddim", 4)]
    assert [(cell["scheduler"], cell["steps"]) for cell in result["cells"]] == pairs
    assert result["skipped_steps"] == [T + 1] and f"skipping {T + 1} steps" in out
    assert result["num_samples"] == 12 and result["reference_images"] == 24 and result["pipeline"] == pipeline_dir
    for cell in result["cells"]:
        assert math.isfinite(cell["fid"]) and math.isfinite(cell["kid"])
        assert 0 <= cell["precision"] <= 1 and 0 <= cell["recall"] <= 1 and 0 < cell["mean_confidence"] <= 1
        assert cell["seconds"] > 0 and cell["images_per_second"] == pytest.approx(12 / cell["seconds"])
        assert cell["fid_vs_ddpm_1000"] is None
    assert len({cell["fid"] for cell in result["cells"]}) == 4  # each scheduler and step count gives other digits
    assert math.isfinite(result["floor"]["fid"]) and result["floor"]["num_images"] == 12
    assert result["within_10_percent_of_ddpm_1000"] is None  # DDPM at 1000 steps cannot run with T = 10

    # Each cell samples 12 digits in batches of 5 with its own scheduler on the pipeline's schedule; nothing at T + 1.
    expected = [
        (scheduler, T, steps, size)
        for scheduler, steps in [("DDPMMnistScheduler", 2), ("DDPMMnistScheduler", 4)]
        + [("DDIMScheduler", 2), ("DDIMScheduler", 4)]
        for size in (5, 5, 2)
    ]
    sampling = [call for call in pipeline_calls if call[3] > 1]  # leave out a 1-image warm-up
    assert sampling == expected

    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| scheduler | steps | FID | FID / DDPM-1000 | KID |") and rows[1].startswith("| --- |")
    assert [row.split(" | ")[:2] for row in rows[2:6]] == [[f"| {s}", str(n)] for s, n in pairs]
    assert rows[6].startswith("| real floor (12 train digits) | - |") and len(rows) == 7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["./no/such/pipeline"], "is not a folder"),
        (["{pipe}", "--schedulers", "ddim", "euler"], "invalid choice: 'euler'"),
        (["{pipe}", "--num_inference_steps", "2", "0"], "--num_inference_steps and --batch_size take integers of"),
        (
            ["{pipe}", "--num_inference_steps", str(T + 1)],
            f"every --num_inference_steps value exceeds the pipeline's {T}",
        ),
        (["{pipe}", "--num_samples", "97"], "which holds 96"),
        (["{pipe}", "--num_samples", "3"], "num_samples must be at least 4"),
        (["{pipe}", "--guidance_scale", "2"], "--guidance_scale above 1 needs a class-conditional pipeline"),
    ],
)
def test_bad_input_fails_in_one_line_before_sampling(
    bench, pipeline_dir, mnist_folder, capsys, pipeline_calls, argv, message
):
    argv = [a.format(pipe=pipeline_dir) for a in argv] + [
        "--dataset_name",
        str(mnist_folder),
        "--reference_images",
        "8",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(lambda: bench.main(argv), "scheduler_quality.py")
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("scheduler_quality.py: error:") and message in line
    assert pipeline_calls == []


def test_fewest_steps_within_ten_percent_of_ddpm_1000(bench):
    Cell = bench.Cell
    cells = [
        Cell("ddpm", 1000, quality(10.0), 50.0),
        Cell("ddim", 50, quality(10.2), 2.5),
        Cell("ddim", 10, quality(12.0), 0.5),
        Cell("ddim", 20, quality(10.9), 1.0),
        Cell("dpm++", 10, quality(11.5), 0.5),
        Cell("dpm++", 20, quality(11.2), 1.0),
        Cell("unipc", 10, quality(9.0), 0.5),
    ]
    fewest = bench.fewest_steps_near_baseline(cells)
    assert fewest == {"ddpm": 1000, "ddim": 20, "dpm++": None, "unipc": 10}
    assert bench.fewest_steps_near_baseline(cells[1:]) is None

    entry = cells[3].as_dict(bench.baseline_fid(cells))
    assert entry["fid_vs_ddpm_1000"] == pytest.approx(1.09) and entry["images_per_second"] == pytest.approx(100)
    table = bench.markdown_table(cells, quality(1.5, num_images=100))
    assert "| ddim | 20 | 10.9000 | 1.09 |" in table
    assert "| real floor (100 train digits) | - | 1.5000 | 0.15 |" in table
    summary = bench.summary_lines(cells)
    assert any(line.startswith("ddim:") and line.endswith("at 20 steps") for line in summary)
    assert any(line.startswith("dpm++:") and "none of the step counts" in line for line in summary)


def test_a_conditional_pipeline_draws_every_digit_with_guidance_and_scores_class_accuracy(
    bench, tmp_path, mnist_folder, capsys, monkeypatch
):
    folder = tmp_path / "conditional"
    DDPMMnistPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(folder)
    calls = []
    original = DDPMMnistPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("class_labels"), kwargs.get("guidance_scale")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDPMMnistPipeline, "__call__", spy)
    argv = [str(folder), "--schedulers", "ddpm", "--num_inference_steps", "2", "--guidance_scale", "2"]
    argv += ["--batch_size", "8", "--num_samples", "20", "--reference_images", "24", "--json", "--device", "cpu"]
    bench.main([*argv, "--dataset_name", str(mnist_folder)])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])

    warm_up, *sampled = [(labels.tolist(), scale) for labels, scale in calls if labels is not None]
    assert warm_up == ([0], 2.0)  # one image, guided as the cells are
    digits = [label for labels, _ in sampled for label in labels]
    assert digits == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]  # in batches of 8, 8 and 4
    assert [len(labels) for labels, _ in sampled] == [8, 8, 4] and {scale for _, scale in sampled} == {2.0}
    (cell,) = result["cells"]
    assert result["guidance_scale"] == 2.0 and 0 <= cell["class_accuracy"] <= 1
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].endswith("| images/s | class accuracy |")
    assert rows[2].endswith(f"| {cell['class_accuracy']:.3f} |") and rows[3].endswith("| - |")  # the floor: none
