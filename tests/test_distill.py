"""Tests of trajectory distillation (`ddpm_mnist.distillation`) and of `training/distill.py` on a tiny teacher.

The teacher is the `tiny` U-Net, class-conditional, with random weights: its paths are some fixed map from noise and
label to an image, which is all distillation needs. Each run of the script is a real process.
"""

from __future__ import annotations

import itertools
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet
from ddpm_mnist.cli import main
from ddpm_mnist.distillation import distillation_batch, distillation_loss, student_scheduler, teacher_trajectories
from ddpm_mnist.errors import UsageError
from ddpm_mnist.schedulers import SCHEDULERS
from tests.utils import HIDE_PACKAGE, assert_usage_error, logged_scalars, run_python, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "training" / "distill.py"
TEACHER_STEPS = 4
TINY = [
    f"--teacher_num_inference_steps={TEACHER_STEPS}",
    "--train_batch_size=4",
    "--states_per_path=2",
    "--learning_rate=1e-3",
    "--lr_warmup_steps=0",
    "--checkpointing_steps=50",
    "--ema_max_decay=0.9",
    "--save_images_steps=1000",
    "--num_samples=10",
    "--mixed_precision=fp32",
    "--logger=tensorboard",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional teacher pipeline folder."""
    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    DDPMMnistPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler()).save_pretrained(folder)
    return folder


def distill(output_dir: Path, teacher: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run the script into `output_dir`; require success."""
    command = [sys.executable, str(DISTILL), f"--pretrained_teacher_model={teacher}", f"--output_dir={output_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([*command, *TINY, *flags], capture_output=True, text=True, timeout=300, env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    return process


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    """100 steps of distillation of the tiny teacher."""
    output_dir = tmp_path_factory.mktemp("distill") / "student"
    distill(output_dir, teacher, "--max_train_steps=100")
    return output_dir


def loaded_teacher(teacher: Path) -> DDPMMnistPipeline:
    """The teacher on the sampler the script gives it by default (UniPC), without a progress bar."""
    pipe = DDPMMnistPipeline.from_pretrained(teacher)
    pipe.scheduler = SCHEDULERS["unipc"].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_teacher_paths_start_at_the_noise_and_end_where_the_pipeline_ends(teacher):
    pipe = loaded_teacher(teacher)
    labels = torch.tensor([3, 10])  # a digit and the null class
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    states, timesteps, x_0 = teacher_trajectories(pipe, x_T, labels, TEACHER_STEPS, guidance_scale=1.5)
    assert states.shape == (TEACHER_STEPS, 2, 1, 28, 28) and timesteps.shape == (TEACHER_STEPS,)
    torch.testing.assert_close(states[0], x_T, rtol=0, atol=0)
    assert timesteps[0] == 999 and (timesteps[1:] < timesteps[:-1]).all()
    # The end is the pipeline's own digit from the same noise (the null class unguided), clipped to [-1, 1].
    drawn = pipe(
        class_labels=[3], guidance_scale=1.5, num_inference_steps=TEACHER_STEPS, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    torch.testing.assert_close(x_0[:1] / 2 + 0.5, drawn, rtol=0, atol=1e-5)
    assert x_0.abs().max() <= 1


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_the_loss_is_zero_for_a_student_that_predicts_the_path_end(prediction_type):
    """An oracle that knows x_0 gives the exact target of its prediction type: v = sqrt(abar) eps - sqrt(1 - abar) x_0
    with eps solved from x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (Salimans & Ho 2022, eq. 4 of the DDPM paper)."""
    scheduler = student_scheduler(DDPMMnistScheduler(), prediction_type)
    x_0, x_t, t = torch.rand(3, 1, 28, 28) * 2 - 1, torch.randn(3, 1, 28, 28), torch.tensor([999, 500, 20])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (x_t - alpha_bar.sqrt() * x_0) / (1 - alpha_bar).sqrt()
    target = x_0 if prediction_type == "sample" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x_0

    def oracle(sample, timesteps, class_labels=None):
        return type("Output", (), {"sample": target})

    assert distillation_loss(oracle, scheduler, x_t, t, None, x_0).item() < 1e-10
    assert distillation_loss(oracle, scheduler, x_t, t, None, x_0 + 0.1).item() == pytest.approx(0.01, rel=1e-4)


def test_a_batch_takes_the_first_state_and_distinct_others_of_each_path(teacher):
    torch.manual_seed(0)
    x_t, t, y, x_0 = distillation_batch(loaded_teacher(teacher), 64, TEACHER_STEPS, 1.5, 0.25, states_per_path=3)
    assert x_t.shape == x_0.shape == (192, 1, 28, 28) and t.shape == y.shape == (192,)
    per_path = t.view(64, 3)
    assert (per_path[:, 0] == 999).all()  # pure noise, where the student begins
    assert all(len(set(row.tolist())) == 3 for row in per_path)
    assert (y.view(64, 3) == y.view(64, 3)[:, :1]).all() and set(y.tolist()) <= set(range(11))
    assert 0 < (y.view(64, 3)[:, 0] == 10).float().mean() < 0.6  # the null class, about a quarter of the paths
    assert (x_0.view(64, 3, -1) == x_0.view(64, 3, -1)[:, :1]).all()  # one end per path
    # Each state lies on its own path: the paths drawn again from the same noise (the batch's first draw) and labels.
    torch.manual_seed(0)
    x_T, labels = torch.randn(64, 1, 28, 28), y.view(64, 3)[:, 0]
    states, timesteps, ends = teacher_trajectories(loaded_teacher(teacher), x_T, labels, TEACHER_STEPS, 1.5)
    index = (per_path[..., None] == timesteps).int().argmax(-1)  # (64, 3): which state of its path each one is
    torch.testing.assert_close(x_t.view(64, 3, 1, 28, 28), states[index, torch.arange(64)[:, None]])
    torch.testing.assert_close(x_0.view(64, 3, 1, 28, 28)[:, 0], ends)


def test_the_student_scheduler_is_deterministic_ddim_from_t_999():
    scheduler = student_scheduler(DDPMMnistScheduler())
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.prediction_type == "v_prediction"
    for steps, first in [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])]:
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == first
    with pytest.raises(ValueError, match="is not a student's target"):
        student_scheduler(DDPMMnistScheduler(), "epsilon")


def test_the_loss_falls_and_the_students_few_step_digits_move_toward_the_teachers(finished_run, teacher):
    loss = logged_scalars(finished_run, "loss")
    assert len(loss) == 100 and loss[-10:].mean() < 0.7 * loss[:5].mean()
    # One and four student steps from the same noise and labels as the teacher's paths, before distillation (the
    # teacher's weights read as v) and after: the student's digits come nearer the teacher's.
    pipe = loaded_teacher(teacher)
    labels, seed = list(range(10)) * 2, torch.Generator().manual_seed(1)
    target = pipe(class_labels=labels, guidance_scale=1.5, num_inference_steps=TEACHER_STEPS, output_type="pt",
                  generator=seed).images  # fmt: skip
    before = DDPMMnistPipeline(pipe.unet, student_scheduler(pipe.scheduler))
    after = DDPMMnistPipeline.from_pretrained(finished_run)
    distance = {}
    for (name, student), steps in itertools.product([("before", before), ("after", after)], (1, 4)):
        student.set_progress_bar_config(disable=True)
        drawn = student(class_labels=labels, num_inference_steps=steps, output_type="pt",
                        generator=torch.Generator().manual_seed(1)).images  # fmt: skip
        distance[name, steps] = (drawn - target).pow(2).mean().item()
    assert distance["after", 1] < 0.6 * distance["before", 1], distance
    assert distance["after", 4] < 0.9 * distance["before", 4], distance


def test_the_student_folder_loads_with_its_scheduler_and_card(finished_run):
    pipe = DDPMMnistPipeline.from_pretrained(finished_run)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.is_class_conditional
    card = (finished_run / "README.md").read_text()
    assert "num_inference_steps=4" in card and "guidance_scale=1.5" not in card  # the guidance is built in
    assert "its own scheduler, `DDIMScheduler`" in card and "distilled from" in card
    assert (finished_run / "samples" / "step-0000100.png").is_file()


@pytest.mark.parametrize("package", ["imported", "not installed"])
def test_the_student_samples_the_same_digits_with_or_without_the_package(finished_run, tmp_path, package):
    pipe = DDPMMnistPipeline.from_pretrained(finished_run)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(class_labels=[7, 1], num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    code = f"""{HIDE_PACKAGE if package == "not installed" else "import ddpm_mnist"}
import numpy as np
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(finished_run)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(class_labels=[7, 1], num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
np.save("remote.npy", images.images)
print(type(pipe.scheduler).__name__)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    assert run_python(code, env, tmp_path).strip().splitlines()[-1] == "DDIMScheduler"
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), expected, atol=1e-6, rtol=0)


def test_a_resumed_distillation_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, teacher, finished_run):
    checkpoint = finished_run / "checkpoints" / "checkpoint-50"
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / "checkpoint-50")
    distill(tmp_path / "resumed", teacher, "--max_train_steps=100", "--resume_from_checkpoint=latest")
    whole = load_file(finished_run / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    resumed_loss = logged_scalars(tmp_path / "resumed", "loss")
    np.testing.assert_array_equal(resumed_loss, logged_scalars(finished_run, "loss")[50:])


@pytest.fixture(scope="module")
def distill_module() -> dict:
    return runpy.run_path(str(DISTILL))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--states_per_path=5"], "--states_per_path 5 exceeds the 4 states of a teacher path"),
        (["--max_train_steps=0"], "--max_train_steps must be positive, got 0."),
        (["--guidance_scale=0.5"], "--guidance_scale must be at least 1, got 0.5."),
        (["--class_dropout_prob=1"], "--class_dropout_prob must be in [0, 1), got 1.0."),
        (["--num_inference_steps=1001"], "--num_inference_steps 1001 exceeds the teacher's 1000 diffusion steps"),
    ],
)
def test_bad_flags_are_refused_in_one_line_before_any_work(distill_module, teacher, tmp_path, flags, message):
    argv = [f"--pretrained_teacher_model={teacher}", f"--output_dir={tmp_path / 'run'}", *TINY, *flags]
    with pytest.raises(UsageError) as error:
        distill_module["check_args"](distill_module["parse_args"](argv))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_teacher_without_a_unet_or_guidance_without_labels_is_refused(distill_module, teacher, tmp_path):
    shutil.copytree(teacher, tmp_path / "broken", ignore=shutil.ignore_patterns("unet"))
    DDPMMnistPipeline(DDPMMnistUNet.from_preset("tiny"), DDPMMnistScheduler()).save_pretrained(tmp_path / "uncond")
    for folder, message in [
        ("broken", "is not a pipeline with unet/ and scheduler/ folders; pass a trained run's folder or a released"),
        ("uncond", "needs a class-conditional teacher, and"),
    ]:
        argv = [f"--pretrained_teacher_model={tmp_path / folder}", f"--output_dir={tmp_path / 'run'}"]
        with pytest.raises(UsageError, match=message):
            distill_module["check_args"](distill_module["parse_args"](argv))
    # An unconditional teacher distils unguided.
    distill_module["check_args"](distill_module["parse_args"]([*argv, "--guidance_scale=1"]))


def test_bad_input_through_the_script_exits_2_with_one_line(tmp_path, finished_run, teacher):
    command = [sys.executable, str(DISTILL), f"--pretrained_teacher_model={tmp_path / 'none'}"]
    assert_usage_error([*command, f"--output_dir={tmp_path / 'run'}"], "distill.py", "is not a pipeline with unet/")
    command = [sys.executable, str(DISTILL), f"--pretrained_teacher_model={teacher}", f"--output_dir={finished_run}"]
    assert_usage_error(command, "distill.py", "already holds a finished run (model_index.json)")
    assert_usage_error([*command, "--teacher_scheduler=ddpm"], "distill.py", "invalid choice: 'ddpm'")
    assert_usage_error(
        [*command, "--resume_from_checkpoint=latest", "--states_per_path=3"], "distill.py",
        "cannot resume",
    )  # fmt: skip


def test_the_benchmark_and_the_release_give_the_student_a_card_with_its_figures(
    finished_run, teacher, mnist_folder, tmp_path
):
    results, release = tmp_path / "distillation.json", tmp_path / "release"
    benchmark = [
        sys.executable, str(ROOT / "benchmarks" / "distillation.py"), str(finished_run),
        f"--pretrained_teacher_model={teacher}", f"--dataset_name={mnist_folder}", "--num_inference_steps", "1", "2",
        "--num_samples=20", "--seeds", "0", "1", f"--teacher_num_inference_steps={TEACHER_STEPS}",
        "--timing_samples=20", "--timing_steps=2", "--batch_size=10",
        f"--output={results}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(benchmark, capture_output=True, text=True, timeout=600, env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    scores = json.loads(results.read_text())
    assert list(scores["settings"]) == ["teacher", "student, 1 steps", "student, 2 steps"]
    assert scores["settings"]["teacher"]["fid_over_teacher"] == pytest.approx(1.0)
    for row in scores["settings"].values():
        assert len(row["fid"]) == len(row["class_accuracy"]) == 2 and all(0 <= a <= 1 for a in row["class_accuracy"])
        assert row["fid_over_floor"] == pytest.approx(np.mean(row["fid"]) / scores["floor_fid"])
    timing = scores["timing"]
    assert timing["speedup_vs_teacher"] == pytest.approx(timing["teacher_s"] / timing["student_2_steps_s"])
    command = [sys.executable, str(ROOT / "training" / "release.py"), str(finished_run), f"--output_dir={release}"]
    command += [f"--distillation_results={results}", "--hub_model_id=user/student"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    card = (release / "README.md").read_text()
    student = scores["settings"]["student, 2 steps"]
    assert f"| student, 2 steps | 2 | {student['fid'][0]:.2f}, {student['fid'][1]:.2f} |" in card
    assert f"| teacher | {2 * TEACHER_STEPS} |" in card and "num_inference_steps=2" in card
    assert (release / "samples" / "grid.png").is_file() and not (release / "checkpoints").exists()
    pipe = DDPMMnistPipeline.from_pretrained(release)
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="np").images.shape == (1, 28, 28, 1)


def test_the_cli_samples_the_student_on_its_own_scheduler(finished_run, tmp_path, capsys):
    argv = [str(finished_run), "--scheduler=ddim", "--num_inference_steps=4", "--class_labels", "7", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", *argv, "--num_samples=2", "--upscale=1", "--save_digits", f"--output_dir={tmp_path}"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    pipe = DDPMMnistPipeline.from_pretrained(finished_run)  # DDIM from its own config is its own scheduler
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(class_labels=[7, 1], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    for i, digit in enumerate(expected):
        written = np.asarray(Image.open(tmp_path / "digits" / f"{i:05d}.png"))
        assert np.abs(written.astype(int) - np.asarray(digit).astype(int)).max() <= 1


def test_a_student_release_refuses_a_run_without_a_teacher_or_results_in_one_line(finished_run, teacher, tmp_path):
    release = runpy.run_path(str(ROOT / "training" / "release.py"))
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "training.json").write_text(json.dumps({"training": {"learning_rate": 1e-4}}))
    cases = [
        (tmp_path / "trained", tmp_path / "results.json", [], "is not a finished training/distill.py run"),
        (finished_run, tmp_path / "none.json", [], "none.json cannot be read"),
        (finished_run, tmp_path / "results.json", [], "results.json cannot be read .*'args'"),
        (finished_run, tmp_path / "results.json", ["--num_samples=64"], "--num_samples plays no part with"),
    ]
    for run, results, flags, message in cases:
        argv = [str(run), f"--distillation_results={results}", f"--output_dir={tmp_path / 'out'}", "--hub_model_id=a/b"]
        with pytest.raises(UsageError, match=message) as error:
            release["check_args"](release["parse_args"]([*argv, *flags]))
        assert "\n" not in str(error.value)
    argv = [
        "--gpu_results=gpu",
        f"--distillation_results={tmp_path / 'results.json'}",
        "--output_dir=out",
        "--hub_model_id=a/b",
    ]
    with pytest.raises(UsageError, match="release different runs; pass one of them"):
        release["check_args"](release["parse_args"](argv))
    assert not (tmp_path / "out").exists()
