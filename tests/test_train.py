"""End-to-end tests of `training/train.py` on the tiny preset and a 96-image MNIST-schema fixture.

Each run is a real process (`python` or `accelerate launch`) started through `tests/launch_train.py`, which records
the examples each process decoded and a digest of its final weights.
"""

import contextlib
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
LAUNCHER = ROOT / "tests" / "launch_train.py"
HANG_SECONDS = 300  # no run here takes a tenth of this
# 96 examples in batches of 16: 6 batches per epoch on one process, 3 on each of two.
TINY = [
    "--preset=tiny",
    "--train_batch_size=16",
    "--lr_warmup_steps=4",
    "--save_images_steps=1000",
    "--ddpm_num_inference_steps=4",
    "--num_sample_images=4",
    "--shuffle_buffer_size=32",
    "--logger=tensorboard",
]


def train(tmp_path: Path, data: Path, run: str, *flags: str, launch: list[str] | None = None, **env: str):
    """Run training into tmp_path/run, recording into tmp_path/run-record; return (process, output_dir, record)."""
    output_dir, record = tmp_path / run, tmp_path / f"{run}-record"
    record.mkdir()
    command = [*(launch or [sys.executable]), str(LAUNCHER), f"--dataset_name={data}", f"--output_dir={output_dir}"]
    process = subprocess.Popen(
        [*command, *TINY, *flags],
        env={**os.environ, "RECORD_DIR": str(record), "PYTHONFAULTHANDLER": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        # A hang: SIGABRT makes every Python process of the run (launcher and workers) print all its threads'
        # stacks (PYTHONFAULTHANDLER) before it dies, so the failure says where it hung.
        os.killpg(process.pid, signal.SIGABRT)
        for pid_file in record.glob("pid-*.txt"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGABRT)
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"training hung for 300 s; the stacks at the time:\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), output_dir, record


def read_ids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


@pytest.mark.parametrize("data", [[], ["--decode_once"]], ids=["stream", "decode_once"])
def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, mnist_folder, data):
    whole, whole_dir, whole_record = train(tmp_path, mnist_folder, "whole", "--max_train_steps=9", *data)
    assert whole.returncode == 0, whole.stderr
    first, resumed_dir, _ = train(
        tmp_path, mnist_folder, "resumed", "--max_train_steps=4", "--checkpointing_steps=4", *data
    )
    assert first.returncode == 0, first.stderr
    second, _, resumed_record = train(
        tmp_path, mnist_folder, "resumed-2", f"--output_dir={resumed_dir}", "--max_train_steps=9",
        "--resume_from_checkpoint=latest", *data,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "checkpoint-4 at step 4" in second.stderr
    # The training weights (all processes' digests) and the released EMA weights are identical, bit for bit.
    assert (whole_record / "weights-0.txt").read_text() == (resumed_record / "weights-0.txt").read_text()
    ema = "unet/diffusion_pytorch_model.safetensors"
    assert (whole_dir / ema).read_bytes() == (resumed_dir / ema).read_bytes()
    # Steps 5-9 trained on the same batches, across the epoch boundary after batch 6.
    whole_ids, resumed_ids = read_ids(whole_record / "seen-0.txt"), read_ids(resumed_record / "seen-0.txt")
    assert len(whole_ids) == 9 * 16 and resumed_ids[-5 * 16 :] == whole_ids[4 * 16 :]
    assert sorted(whole_ids[: 6 * 16]) == list(range(96)), "epoch 1 showed every example once"


def test_the_output_folder_is_a_pipeline_with_card_and_samples(tmp_path, mnist_folder):
    process, output_dir, _ = train(tmp_path, mnist_folder, "out", "--max_train_steps=2", "--save_images_steps=1")
    assert process.returncode == 0, process.stderr
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (output_dir / name).is_file(), name
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["step-0000001.png", "step-0000002.png"]
    assert Image.open(output_dir / "samples" / "step-0000002.png").size == (56, 56)  # a 2x2 grid of 28x28
    card = (output_dir / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    assert "| optimizer steps | 2 |" in card and "176,849 parameters" in card
    assert not [p for p in output_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
                and "checkpoints" not in p.parts]  # fmt: skip
    assert list((output_dir / "logs").rglob("events.out.tfevents.*")), "tensorboard got the logs"
    pipe = DDPMMnistPipeline.from_pretrained(output_dir)
    assert pipe(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 28, 28, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_see_disjoint_data_and_end_with_identical_weights(tmp_path, mnist_folder):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # `--cpu --num_processes 2` starts one process; this is the form that starts a real 2-process CPU group.
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes=2", f"--main_process_port={free_port()}"]
    process, _, record = train(
        tmp_path, mnist_folder, "ddp", "--max_train_steps=3", launch=launch, ACCELERATE_USE_CPU="1"
    )
    assert process.returncode == 0, process.stderr
    assert "2 processes, 3 steps per epoch" in process.stderr
    seen = [read_ids(record / f"seen-{rank}.txt") for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 48
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(96))
    assert (record / "weights-0.txt").read_text() == (record / "weights-1.txt").read_text()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, mnist_folder):
    process, output_dir, _ = train(
        tmp_path, mnist_folder, "nan", "--max_train_steps=6", "--checkpointing_steps=1", INJECT_NAN_AT_BATCH="3"
    )
    assert process.returncode == 1
    assert "the loss became nan at step 3" in process.stderr.splitlines()[-1]
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert not (output_dir / "model_index.json").exists()


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, mnist_folder):
    record = tmp_path / "record"
    record.mkdir()
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), f"--dataset_name={mnist_folder}", f"--output_dir={tmp_path / 'out'}", *TINY,
         "--max_train_steps=100000", "--checkpointing_steps=100000"],
        env={**os.environ, "RECORD_DIR": str(record)},
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    seen = record / "seen-0.txt"
    deadline = time.time() + 120
    while not (seen.exists() and len(read_ids(seen)) >= 3 * 16) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    checkpoints = [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint-"), checkpoints
    assert f"stopped at step {checkpoints[0].split('-')[1]} on request" in stderr


def test_checkpoints_total_limit_keeps_the_newest(tmp_path, mnist_folder):
    process, output_dir, _ = train(
        tmp_path, mnist_folder, "limit", "--max_train_steps=5", "--checkpointing_steps=1", "--checkpoints_total_limit=2"
    )
    assert process.returncode == 0, process.stderr
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]


def test_bad_dataset_path_is_one_line_before_any_work(tmp_path):
    process = subprocess.run(
        [sys.executable, str(TRAIN), "--dataset_name=./no/such/folder", f"--output_dir={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 1
    assert process.stderr.strip().splitlines()[-1].startswith("error: dataset path './no/such/folder' does not exist")
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.fixture(scope="module")
def train_module() -> dict:
    return runpy.run_path(str(TRAIN))


@pytest.mark.parametrize(
    "flags, error, match",
    [
        (["--image_column=img"], ValueError, "no column 'img'; its columns are image, label"),
        (["--resume_from_checkpoint=/no/checkpoint"], FileNotFoundError, "is not a folder"),
        (["--model_config_name_or_path=/no/config.json"], FileNotFoundError, "is not a file"),
        (["--train_batch_size=0"], ValueError, "--train_batch_size must be at least 1"),
        (["--train_batch_size=200"], ValueError, "give no full batch"),
        (["--snr_gamma=0"], ValueError, "--snr_gamma must be positive"),
        (["--max_train_minutes=-1"], ValueError, "--max_train_minutes must be positive"),
        (["--push_to_hub", "--hub_model_id=a/b/c"], ValueError, "--hub_model_id is not a valid repo id"),
        (["--push_to_hub", "--hub_model_id=user/ddpm"], ValueError, "--push_to_hub needs a Hub token"),
    ],
)
def test_bad_arguments_fail_before_training(train_module, tmp_path, mnist_folder, monkeypatch, flags, error, match):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = train_module["parse_args"]([f"--dataset_name={mnist_folder}", f"--output_dir={tmp_path / 'out'}", *flags])
    with pytest.raises(error, match=match):
        train_module["main"](args)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_help_documents_every_flag_with_its_default(train_module, capsys):
    with pytest.raises(SystemExit):
        train_module["parse_args"](["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for flag in ("--dataset_name", "--learning_rate", "--ema_max_decay", "--checkpointing_steps", "--push_to_hub"):
        assert flag in text
    assert "(default: ylecun/mnist)" in text and "(default: 0.0002)" in text and "(default: 0.9999)" in text


def test_config_file_sets_defaults_and_flags_win(train_module, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"learning_rate": 0.001, "preset": "mnist-small", "train_batch_size": 7}')
    args = train_module["parse_args"]([f"--config={config}", "--train_batch_size=9"])
    assert (args.learning_rate, args.preset, args.train_batch_size) == (0.001, "mnist-small", 9)


def test_a_time_budget_ends_the_run_with_a_saved_pipeline(tmp_path, mnist_folder):
    process, output_dir, _ = train(
        tmp_path, mnist_folder, "budget", "--max_train_steps=50", "--max_train_minutes=1e-6", "--snr_gamma=5"
    )
    assert process.returncode == 0, process.stderr
    assert "| optimizer steps | 1 |" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_paper(train_module, prediction_type):
    """Hang et al. 2023, eq. 9 and its v / x_0 forms, against SNR_t from the linear betas computed here in float64."""
    scheduler = DDPMMnistScheduler()
    t = torch.tensor([0, 100, 300, 999])
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t.numpy()]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    expected = {
        "epsilon": np.minimum(snr, 5) / snr,
        "v_prediction": np.minimum(snr, 5) / (snr + 1),
        "sample": np.minimum(snr, 5),
    }[prediction_type]
    weights = train_module["min_snr_weight"](scheduler, t, 5.0, prediction_type)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-3)  # float32 1 - abar_0 = 1e-4 keeps ~4 digits
    assert snr[0] > 5 > snr[-1], "the test covers both sides of the clip"


def test_real_mnist_trains(tmp_path, real_mnist):
    process, output_dir, record = train(tmp_path, real_mnist, "real", "--max_train_steps=2")
    assert process.returncode == 0, process.stderr
    assert "60000 examples" in process.stderr
    assert len(read_ids(record / "seen-0.txt")) == 32
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
