"""Tests for benchmarks/guidance_quality.py: autoguidance, checkpoints scored with their EMA weights, the grid."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import EMAModel

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.errors import UsageError, run_entry_point
from ddpm_mnist.training_utils import SETTINGS_FILE, TrainingProgress
from tests.utils import tiny_unet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "guidance_quality.py"
T = 10


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """The script's functions, loaded without running it."""
    return SimpleNamespace(**runpy.run_path(str(SCRIPT)))


def conditional_pipeline(seed: int) -> DDPMMnistPipeline:
    pipe = DDPMMnistPipeline(tiny_unet(seed, num_class_embeds=10), DDPMMnistScheduler(num_train_timesteps=T))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two saved tiny class-conditional pipelines with other weights: a model and a weak guide."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"pipeline{seed}")
        conditional_pipeline(seed).save_pretrained(folder)
        folders.append(str(folder))
    return tuple(folders)


def test_autoguidance_moves_away_from_the_weak_models_conditional_prediction(bench):
    main, weak = conditional_pipeline(0), conditional_pipeline(1)
    guided = bench.AutoGuidedPipeline(main.unet, main.scheduler, weak.unet)
    x_t, labels = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([2, 7, 9])
    with torch.no_grad():
        eps = main.unet(x_t, 5, class_labels=labels).sample
        eps_weak = weak.unet(x_t, 5, class_labels=labels).sample
        assert torch.allclose(guided.predict_noise(x_t, 5, labels, 2.5), eps_weak + 2.5 * (eps - eps_weak), atol=1e-6)
        assert torch.equal(guided.predict_noise(x_t, 5, labels, 1.0), eps)  # scale 1: the model alone
        # Guided by itself, the model is unguided at any scale.
        self_guided = bench.AutoGuidedPipeline(main.unet, main.scheduler, main.unet)
        assert torch.allclose(self_guided.predict_noise(x_t, 5, labels, 3.0), eps, atol=1e-5)


def fake_checkpoint(folder: Path, unet, ema_unet, step: int, train_seconds: float) -> Path:
    """A checkpoint as train.py writes it: the training weights, the EMA and the progress registered in that order
    (accelerate pickles their state_dicts), and the run's settings."""
    folder.mkdir(parents=True)
    ema = EMAModel(ema_unet.parameters())
    torch.save(ema.state_dict(), folder / "custom_checkpoint_0.pkl")
    progress = TrainingProgress()
    progress.global_step, progress.train_seconds = step, train_seconds
    torch.save(progress.state_dict(), folder / "custom_checkpoint_1.pkl")
    settings = {
        "unet_config": dict(unet.config),
        "ddpm_num_steps": T,
        "ddpm_beta_schedule": "linear",
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        "train_batch_size": 16,
        "num_processes": 2,
        "gradient_accumulation_steps": 1,
    }
    (folder / SETTINGS_FILE).write_text(json.dumps(settings))
    return folder


def test_a_checkpoint_is_scored_with_its_ema_weights(bench, tmp_path):
    unet, ema_unet = tiny_unet(0, num_class_embeds=10), tiny_unet(1, num_class_embeds=10)
    checkpoint = fake_checkpoint(tmp_path / "checkpoint-40", unet, ema_unet, step=40, train_seconds=90.0)
    pipe, trained = bench.load_model(str(checkpoint), "fp32")
    assert trained == {"global_step": 40, "images_seen": 40 * 16 * 2, "train_minutes": 1.5}
    loaded = dict(pipe.unet.named_parameters())
    for name, param in ema_unet.named_parameters():
        assert torch.equal(loaded[name], param), name
    assert pipe.scheduler.config.num_train_timesteps == T and pipe.is_class_conditional


def test_the_grid_scores_each_setting_and_draws_scale_1_once(bench, pipeline_dirs, mnist_folder, tmp_path, capsys):
    model, weak = pipeline_dirs
    argv = [model, "--guides", "null", weak, "--guidance_intervals", "all", "3:6", "--guidance_scales", "1", "3"]
    argv += ["--seeds", "0", "1", "--num_samples", "10", "--num_inference_steps", "3", "--dtype", "fp32"]
    argv += ["--dataset_name", str(mnist_folder), "--output_dir", str(tmp_path)]
    bench.main(argv)
    result = json.loads((tmp_path / "guidance_quality.json").read_text())
    settings = [
        (c["guide"], c["guidance_interval"] and tuple(c["guidance_interval"]), c["guidance_scale"], c["seed"])
        for c in result["cells"]
    ]
    guided = [(g, i, 3.0, s) for g in ("null", weak) for i in (None, (3, 6)) for s in (0, 1)]
    assert sorted(settings, key=str) == sorted([("null", None, 1.0, 0), ("null", None, 1.0, 1), *guided], key=str)
    by_setting = {setting: cell for setting, cell in zip(settings, result["cells"], strict=True)}
    for cell in result["cells"]:
        assert cell["fid_over_floor"] == pytest.approx(cell["fid"] / result["floor"]["fid"])
        assert 0 <= cell["class_accuracy"] <= 1 and len(cell["class_accuracy_per_digit"]) == 10
    # The seed, the guide and the interval each change the digits.
    fids = {setting: cell["fid"] for setting, cell in by_setting.items()}
    assert fids[("null", None, 3.0, 0)] != fids[("null", None, 3.0, 1)]
    assert fids[("null", None, 3.0, 0)] != fids[(weak, None, 3.0, 0)] != fids[(weak, (3, 6), 3.0, 0)]
    assert (tmp_path / "guidance_quality.png").stat().st_size > 0
    assert "guide=null interval=all scale=1 seed=0: accuracy" in capsys.readouterr().out
    # Earlier results of the same setting join a new run's cells and figure; of another setting they are refused.
    common = [
        "--num_samples",
        "10",
        "--num_inference_steps",
        "3",
        "--dtype",
        "fp32",
        "--dataset_name",
        str(mnist_folder),
    ]
    bench.main([weak, "--guidance_scales", "2", "--include", str(tmp_path / "guidance_quality.json"), *common,
                "--output_dir", str(tmp_path / "joined")])  # fmt: skip
    joined = json.loads((tmp_path / "joined" / "guidance_quality.json").read_text())
    assert joined["models"] == [model, weak] and joined["cells"][:-1] == result["cells"]
    # Each run keeps its own grid.
    assert [run["guides"] for run in joined["runs"]] == [["null", weak], ["null"]]
    assert [run["guidance_scales"] for run in joined["runs"]] == [[1.0, 3.0], [2.0]]
    assert (joined["cells"][-1]["model"], joined["cells"][-1]["guidance_scale"]) == (weak, 2.0)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UsageError, match="is not a guidance_quality.json"):
        bench.main(["--include", str(tmp_path / "other.json"), *common, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="has another num_samples"):
        bench.main(["--include", str(tmp_path / "guidance_quality.json"), *common[2:], "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{uncond}"], "is not class-conditional"),
        (["{model}", "--guidance_intervals", "5"], "'5' is not an interval; pass all or low:high"),
        (["{model}", "--guidance_intervals", "6:2"], "guidance_interval must be timesteps (low, high) with 0 <= low"),
        (["{model}", "--guidance_scales", "0.5"], "guidance_scale must be a number of at least 1"),
        (["./no/such/model"], "is not a folder"),
    ],
)
def test_bad_input_fails_in_one_line_before_sampling(
    bench, pipeline_dirs, mnist_folder, tmp_path, capsys, argv, message
):
    uncond = tmp_path / "uncond"
    DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=T)).save_pretrained(uncond)
    argv = [a.format(model=pipeline_dirs[0], uncond=uncond) for a in argv]
    argv += ["--dataset_name", str(mnist_folder), "--output_dir", str(tmp_path / "out"), "--num_samples", "10"]
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(lambda: bench.main(argv), "guidance_quality.py")
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage line before
    assert "guidance_quality.py: error:" in last_line and message in last_line
    assert not (tmp_path / "out").exists()
