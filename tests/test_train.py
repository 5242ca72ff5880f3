"""End-to-end tests of `training/train.py` on the tiny preset and a 96-image MNIST-schema fixture.

Each run is a real process (`python` or `accelerate launch`) started through `tests/launch_train.py`, which records
the examples each process decoded and a digest of its final weights.
"""

import contextlib
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as DatasetImage
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler, DDPMMnistUNet, training_utils
from ddpm_mnist.errors import UsageError
from ddpm_mnist.training_utils import TrainingProgress, min_snr_weight, time_budget_steps
from tests.utils import assert_usage_error, logged_scalars, png_bytes

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
    "--num_inference_steps=4",
    "--num_samples=4",
    "--mixed_precision=fp32",  # exactness is checked in fp32 (on a bf16 CPU, auto would choose bf16)
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


def resume_from_a_copy(tmp_path: Path, data: Path, whole_dir: Path, step: int, *flags: str):
    """Resume into tmp_path/resumed from a copy of `whole_dir`'s checkpoint-`step`, all that a run interrupted after
    that checkpoint leaves (the uninterrupted run saved it on its way, by the same code that saves a run's last one)."""
    checkpoint = f"checkpoint-{step}"
    shutil.copytree(whole_dir / "checkpoints" / checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint)
    return train(tmp_path, data, "resumed", "--resume_from_checkpoint=latest", *flags)


@pytest.mark.parametrize("data", [[], ["--decode_once"]], ids=["stream", "decode_once"])
def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, mnist_folder, data):
    whole, whole_dir, whole_record = train(
        tmp_path, mnist_folder, "whole", "--max_train_steps=9", "--checkpointing_steps=4", *data
    )
    assert whole.returncode == 0, whole.stderr
    second, resumed_dir, resumed_record = resume_from_a_copy(
        tmp_path, mnist_folder, whole_dir, 4, "--max_train_steps=9", *data
    )
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


@pytest.mark.parametrize("data", [[], ["--decode_once"]], ids=["stream", "decode_once"])
def test_a_conditional_run_sees_each_digit_label_drops_some_and_resumes_bitwise(tmp_path, mnist_folder, data):
    flags = ["--class_conditional", "--class_dropout_prob=0.5", "--save_images_steps=6", "--max_train_steps=6", *data]
    whole, whole_dir, whole_record = train(tmp_path, mnist_folder, "whole", "--checkpointing_steps=4", *flags)
    assert whole.returncode == 0, whole.stderr
    # The fixture's example i has label i % 10: the UNet saw each example's label, or the null class 10.
    ids, labels = read_ids(whole_record / "seen-0.txt"), read_ids(whole_record / "labels-0.txt")
    assert len(ids) == len(labels) == 6 * 16
    assert all(label in (i % 10, 10) for i, label in zip(ids, labels, strict=True))
    assert 20 <= labels.count(10) <= 76, "about half the labels dropped to the null class"
    # Its sample grid has one row per digit: 4 samples round up to one column of 10 digits, 4x upscaled.
    assert Image.open(whole_dir / "samples" / "step-0000006.png").size == (28 * 4, 28 * 4 * 10)
    pipe = DDPMMnistPipeline.from_pretrained(whole_dir)
    assert pipe.is_class_conditional and pipe.unet.config.num_class_embeds == 10
    assert pipe(class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=2, output_type="np").images.shape == (
        2, 28, 28, 1,
    )  # fmt: skip
    second, resumed_dir, resumed_record = resume_from_a_copy(tmp_path, mnist_folder, whole_dir, 4, *flags)
    assert second.returncode == 0, second.stderr
    assert "checkpoint-4 at step 4" in second.stderr
    assert read_ids(resumed_record / "labels-0.txt") == labels[4 * 16 :], "the same labels were dropped after resume"
    assert (whole_record / "weights-0.txt").read_text() == (resumed_record / "weights-0.txt").read_text()
    ema = "unet/diffusion_pytorch_model.safetensors"
    assert (whole_dir / ema).read_bytes() == (resumed_dir / ema).read_bytes()


@pytest.fixture(scope="module")
def finished_training(tmp_path_factory: pytest.TempPathFactory, mnist_folder: Path):
    """A finished 5-step run of the tiny preset: a checkpoint after every step, of which the newest 2 are kept
    (checkpoint-4 and checkpoint-5), and a sample grid every 2 steps and at the end. Its process (with the log) and
    its folder."""
    process, output_dir, _ = train(
        tmp_path_factory.mktemp("finished"), mnist_folder, "run", "--max_train_steps=5", "--checkpointing_steps=1",
        "--checkpoints_total_limit=2", "--save_images_steps=2",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    return process, output_dir


@pytest.fixture(scope="module")
def finished_run(finished_training) -> Path:
    """The folder of `finished_training`."""
    return finished_training[1]


def test_the_output_folder_is_a_pipeline_with_card_and_samples(finished_run):
    output_dir = finished_run
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (output_dir / name).is_file(), name
    # A grid every 2 steps, and the last step's for the card.
    samples = ["step-0000002.png", "step-0000004.png", "step-0000005.png"]
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == samples
    assert Image.open(output_dir / "samples" / "step-0000004.png").size == (224, 224)  # 2x2 digits of 28x28, 4x
    card = (output_dir / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    assert "| optimizer steps | 5 |" in card and "176,849 parameters" in card
    assert not [p for p in output_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
                and "checkpoints" not in p.parts]  # fmt: skip
    assert list((output_dir / "logs").rglob("events.out.tfevents.*")), "tensorboard got the logs"
    pipe = DDPMMnistPipeline.from_pretrained(output_dir)
    assert pipe(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 28, 28, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes() -> list[str]:
    """`accelerate launch` of a real 2-process CPU group (`--cpu --num_processes 2` would start one process)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes=2", f"--main_process_port={free_port()}"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, mnist_folder: Path):
    """An uninterrupted 5-step run of a 2-process group (3 steps per epoch): its process, folder and record."""
    process, output_dir, record = train(
        tmp_path_factory.mktemp("ddp"), mnist_folder, "whole", "--max_train_steps=5", launch=two_processes(),
        ACCELERATE_USE_CPU="1",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    return process, output_dir, record


def test_two_processes_see_disjoint_data_draw_their_own_noise_and_end_with_identical_weights(two_process_run):
    process, _, record = two_process_run
    assert "2 processes, 3 steps per epoch" in process.stderr
    seen = [read_ids(record / f"seen-{rank}.txt") for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 5 * 16
    # Each epoch (3 batches of 16 per process, then the 2 of the next) the processes see other examples; the first
    # shows every example once.
    for epoch in (slice(0, 48), slice(48, 80)):
        assert not set(seen[0][epoch]) & set(seen[1][epoch])
    assert sorted(seen[0][:48] + seen[1][:48]) == list(range(96))
    # In every step the two processes drew other timesteps and other noise.
    noise = [(record / f"noise-{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(noise[0]) == len(noise[1]) == 5
    for step_0, step_1 in zip(*noise, strict=True):
        (*t_0, eps_0), (*t_1, eps_1) = step_0.split(), step_1.split()
        assert len(t_0) == len(t_1) == 16 and t_0 != t_1 and eps_0 != eps_1
    assert (record / "weights-0.txt").read_text() == (record / "weights-1.txt").read_text()


def test_a_resumed_two_process_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, mnist_folder, two_process_run):
    env = {"ACCELERATE_USE_CPU": "1"}
    _, whole_dir, whole_record = two_process_run
    first, resumed_dir, _ = train(tmp_path, mnist_folder, "first", "--max_train_steps=2", launch=two_processes(), **env)
    assert first.returncode == 0, first.stderr
    second, _, resumed_record = train(
        tmp_path, mnist_folder, "second", f"--output_dir={resumed_dir}", "--max_train_steps=5",
        "--resume_from_checkpoint=latest", launch=two_processes(), **env,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "checkpoint-2 at step 2" in second.stderr
    assert "resuming with a changed setting, max_train_steps: 2 -> 5" in second.stderr
    for rank in (0, 1):
        assert (whole_record / f"weights-{rank}.txt").read_text() == (
            resumed_record / f"weights-{rank}.txt"
        ).read_text()
        # Steps 3-5 drew the same timesteps and noise as the uninterrupted run did.
        whole_noise = (whole_record / f"noise-{rank}.txt").read_text().splitlines()
        assert (resumed_record / f"noise-{rank}.txt").read_text().splitlines() == whole_noise[2:]
    ema = "unet/diffusion_pytorch_model.safetensors"
    assert (whole_dir / ema).read_bytes() == (resumed_dir / ema).read_bytes()


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
    wait_for_batches(record / "seen-0.txt", 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    checkpoints = [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint-"), checkpoints
    assert f"stopped at step {checkpoints[0].split('-')[1]} on request" in stderr


def test_checkpoints_total_limit_keeps_the_newest(finished_run):
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]


@pytest.fixture(scope="module")
def bad_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST-layout folders that training must refuse: no image column, no examples, a damaged parquet file."""
    root = tmp_path_factory.mktemp("bad-data")
    for name, rows in (("no-image", {"label": [1, 2]}), ("empty", {"image": [], "label": []})):
        (root / name / "mnist").mkdir(parents=True)
        features = Features({"label": Value("int64")}) if name == "no-image" else None
        if name == "empty":
            features = Features({"image": DatasetImage(), "label": Value("int64")})
        Dataset.from_dict(rows, features=features).to_parquet(root / name / "mnist" / "train-00000-of-00001.parquet")
    (root / "corrupt" / "mnist").mkdir(parents=True)
    (root / "corrupt" / "mnist" / "train-00000-of-00001.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8)
    return root


@pytest.fixture(scope="module")
def train_module() -> dict:
    return runpy.run_path(str(TRAIN))


def test_a_conditional_model_started_from_an_unconditional_one_begins_as_it(tmp_path, train_module):
    """--pretrained_model_name_or_path: every label (and the null class) gives the pretrained model's prediction."""
    torch.manual_seed(0)
    pretrained = DDPMMnistUNet.from_preset("tiny")
    pretrained.save_pretrained(tmp_path / "run" / "unet")
    unet = DDPMMnistUNet.from_preset("tiny", num_class_embeds=10)
    x_t, t = torch.randn(11, 1, 28, 28), torch.full((11,), 500)
    train_module["load_pretrained_weights"](unet, str(tmp_path / "run"))
    with torch.no_grad():
        expected = pretrained(x_t, t).sample
        for class_labels in (torch.arange(11), None):
            torch.testing.assert_close(unet(x_t, t, class_labels=class_labels).sample, expected, rtol=0, atol=0)
    # A conditional model cannot seed an unconditional run: its class embedding would be dropped silently.
    unet.save_pretrained(tmp_path / "cond" / "unet")
    with pytest.raises(UsageError, match="is a class-conditional model; continue it with --class_conditional"):
        train_module["load_pretrained_weights"](pretrained, str(tmp_path / "cond"))


def test_the_class_embedding_learns_at_its_own_rate(train_module):
    """--class_embedding_lr: AdamW's first step moves each parameter by its group's learning rate (times the sign of
    its gradient, with a negligible eps), so the class embedding moves 10x further than the rest; the schedule scales
    both."""
    torch.manual_seed(0)
    unet = DDPMMnistUNet.from_preset("tiny", num_class_embeds=10)
    for p in unet.parameters():  # as a trained model's: no zero-initialized layer that stops the gradient
        torch.nn.init.normal_(p, std=0.05)
    flags = ["--class_conditional", "--learning_rate=1e-3", "--lr_scheduler=cosine", "--lr_warmup_steps=0"]
    args = train_module["parse_args"]([*flags, "--class_embedding_lr=1e-2", "--adam_epsilon=1e-30"])
    optimizer, scheduler = train_module["make_optimizer"](unet, args, 1, 10)
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    x_t, labels = torch.randn(10, 1, 28, 28), torch.arange(10)
    unet(x_t, torch.full((10,), 500), class_labels=labels).sample.square().mean().backward()
    optimizer.step()
    moved = {name: (p.detach() - before[name]).abs() for name, p in unet.named_parameters()}
    torch.testing.assert_close(moved["class_embedding.weight"][:10], torch.full((10, 64), 1e-2), rtol=1e-2, atol=0)
    assert moved["class_embedding.weight"][10].max() == 0, "the null class had no gradient"
    rest = torch.cat([m.flatten() for name, m in moved.items() if name != "class_embedding.weight"])
    assert rest.max() == pytest.approx(1e-3, rel=1e-3)
    for _ in range(5):
        scheduler.step()
    np.testing.assert_allclose(scheduler.get_last_lr(), [5e-4, 5e-3], rtol=1e-6)  # cosine at half way
    args = train_module["parse_args"](flags)
    optimizer, _ = train_module["make_optimizer"](unet, args, 1, 10)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3]  # one group, as before the flag existed


# Bad input: flags, data and folders. Each is refused with one line naming the problem and the fix, before the model
# is built, and leaves no output folder behind. `{data}` is the fixture's MNIST folder, `{bad}` the bad datasets'.
BAD_INPUTS = {
    "dataset path missing": (["--dataset_name=./no/such/folder"], "--dataset_name './no/such/folder' does not exist"),
    "no image column": (["--dataset_name={bad}/no-image"], "has no column 'image'; its columns are label. Pass"),
    "other image column named": (["--image_column=img"], "no column 'img'; its columns are image, label"),
    "no label column": (
        ["--class_conditional", "--label_column=digit"],
        "has no column 'digit'; its columns are image, label. Pass the right one as --label_column",
    ),
    "class embedding lr, unconditional": (["--class_embedding_lr=1e-2"], "add --class_conditional"),
    "class dropout 1": (["--class_conditional", "--class_dropout_prob=1"], "--class_dropout_prob must be in [0, 1)"),
    "empty dataset": (["--dataset_name={bad}/empty"], "has no examples in its 'train' split; pass a non-empty one"),
    "corrupt parquet": (["--dataset_name={bad}/corrupt"], "check or re-download its files"),
    "batch size 0": (["--train_batch_size=0"], "--train_batch_size must be positive, got 0"),
    "batch larger than the data": (["--train_batch_size=200"], "give no full batch of 200 x 1; lower"),
    "learning rate -1": (["--learning_rate=-1"], "--learning_rate must be positive, got -1.0"),
    "steps 0": (["--max_train_steps=0"], "--max_train_steps must be positive, got 0"),
    "epochs -2": (["--num_epochs=-2"], "--num_epochs must be positive, got -2"),
    "minutes -1": (["--max_train_minutes=-1"], "--max_train_minutes must be positive"),
    "snr gamma 0": (["--snr_gamma=0"], "--snr_gamma must be positive"),
    "warm-up -5": (["--lr_warmup_steps=-5"], "--lr_warmup_steps must be at least 0, got -5"),
    "adam beta 1": (["--adam_beta2=1"], "--adam_beta2 must be in [0, 1), got 1.0"),
    "more sampling steps than T": (
        ["--ddpm_num_steps=10", "--num_inference_steps=20"],
        "--num_inference_steps 20 exceeds the 10 diffusion steps (--ddpm_num_steps); sample with at most that many",
    ),
    "cifar10 preset": (["--preset=cifar10"], "--preset cifar10 is a model of 3-channel images, and MNIST digits have"),
    "model config missing": (["--model_config_name_or_path=/no/config.json"], "is not a readable UNet config.json"),
    "pretrained model missing": (["--pretrained_model_name_or_path=/no/pipeline"], "is not a pipeline with a unet/"),
    "resume path missing": (["--resume_from_checkpoint={out}/checkpoints/checkpoint-7"], "is not a folder; pass"),
    "resume path elsewhere": (["--resume_from_checkpoint={bad}"], "checkpoints are read only from the run's own"),
    "output_dir is a file": (["--output_dir={file}"], "is a file; pass a folder (new, or one of your runs"),
    "malformed repo id": (["--push_to_hub", "--hub_model_id=a/b/c"], "--hub_model_id is not a valid repo id"),
    "no Hub token": (["--push_to_hub", "--hub_model_id=user/ddpm"], "--push_to_hub needs a Hub token that can write"),
}


def bad_input_flags(flags: list[str], tmp_path: Path, mnist_folder: Path, bad_datasets: Path) -> list[str]:
    """The case's flags after the defaults, placeholders filled in; `{file}` becomes a file that exists."""
    (tmp_path / "a-file").write_text("not a folder")
    places = dict(data=mnist_folder, bad=bad_datasets, out=tmp_path / "out", file=tmp_path / "a-file")
    defaults = [f"--dataset_name={mnist_folder}", f"--output_dir={tmp_path / 'out'}", *TINY]
    return defaults + [flag.format(**places) for flag in flags]


@pytest.mark.parametrize("flags, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_in_one_line_before_any_work(
    train_module, tmp_path, mnist_folder, bad_datasets, monkeypatch, flags, message
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    built = []
    monkeypatch.setattr(train_module["DDPMMnistUNet"], "from_config", lambda *a, **k: built.append(1))
    args = train_module["parse_args"](bad_input_flags(flags, tmp_path, mnist_folder, bad_datasets))
    with pytest.raises(UsageError) as error:
        train_module["main"](args)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not built, "the model was built before the input was checked"
    assert not (tmp_path / "out").exists(), "an output folder was left behind"


@pytest.mark.parametrize("case", ["learning rate -1", "cifar10 preset", "corrupt parquet", "output_dir is a file"])
def test_bad_input_through_the_script_exits_2_with_one_line(tmp_path, mnist_folder, bad_datasets, case):
    flags, message = BAD_INPUTS[case]
    command = [sys.executable, str(TRAIN), *bad_input_flags(flags, tmp_path, mnist_folder, bad_datasets)]
    assert_usage_error(command, "train.py", message)
    assert not (tmp_path / "out").exists()


def test_images_of_another_mode_and_size_are_converted_with_a_log_line(tmp_path):
    rgb = tmp_path / "rgb" / "mnist"
    rgb.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
    rows = {"image": [{"bytes": png_bytes(p, mode="RGB"), "path": None} for p in pixels], "label": [0] * 32}
    features = Features({"image": DatasetImage(), "label": Value("int64")})
    Dataset.from_dict(rows, features=features).to_parquet(rgb / "train-00000-of-00001.parquet")
    process, output_dir, _ = train(tmp_path, rgb.parent, "rgb", "--max_train_steps=1")
    assert process.returncode == 0, process.stderr
    assert "converting RGB images of size (32, 32) to 28x28 greyscale (mode L)" in process.stderr
    assert (output_dir / "model_index.json").is_file()


def test_an_output_dir_with_a_run_is_refused_unless_resumed_or_overwritten(train_module, tmp_path, finished_run):
    args = train_module["parse_args"]([f"--output_dir={finished_run}", *TINY])
    with pytest.raises(UsageError, match="already holds a finished run .*--resume_from_checkpoint latest.*--overwrite"):
        train_module["check_args"](args)
    shutil.copytree(finished_run / "checkpoints", tmp_path / "other" / "checkpoints")
    args = train_module["parse_args"]([f"--output_dir={tmp_path / 'other'}", *TINY])
    with pytest.raises(UsageError, match="already holds a run's checkpoints"):
        train_module["check_args"](args)


def test_overwrite_output_dir_replaces_the_old_run(tmp_path, mnist_folder, finished_run):
    shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    process, output_dir, _ = train(
        tmp_path, mnist_folder, "again", f"--output_dir={tmp_path / 'run'}", "--overwrite_output_dir",
        "--max_train_steps=1",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine", "only the run's own files are replaced"


def check_resume(train_module: dict, run: Path, flags: list[str], num_processes: int = 1, **classes: int) -> None:
    """train.py's resume check of `run`'s checkpoint-5 for a run with `flags`: its settings, the names it compares."""
    args = train_module["parse_args"]([f"--output_dir={run}", *TINY, "--resume_from_checkpoint=latest", *flags])
    settings = train_module["run_settings"](args, num_processes, **classes)
    names = train_module["RESUME_MUST_KEEP"], train_module["RESUME_MAY_CHANGE"]
    training_utils.check_resume(run / "checkpoints" / "checkpoint-5", settings, *names)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_batch_size=8"], "train_batch_size: 16 -> 8"),
        (["--preset=mnist-small", "--learning_rate=1e-3"], "unet_config.base_channels: 16 -> 32; "),
        (["--learning_rate=1e-3"], "(learning_rate: 0.0002 -> 0.001)"),
        (["--seed=3"], "seed: 0 -> 3"),
    ],
)
def test_resuming_with_other_settings_is_refused_naming_them(train_module, finished_run, flags, message):
    with pytest.raises(ValueError, match="cannot resume .*checkpoint-5 with other settings") as error:
        check_resume(train_module, finished_run, flags)
    assert message in str(error.value)


def test_resuming_across_a_change_of_conditioning_is_refused(train_module, finished_run):
    with pytest.raises(ValueError, match="cannot resume") as error:
        check_resume(train_module, finished_run, ["--class_conditional"], num_classes=10)
    assert "unet_config.num_class_embeds: None -> 10" in str(error.value)
    assert "class_dropout_prob: None -> 0.1" in str(error.value)


def test_resuming_with_another_number_of_processes_is_refused(train_module, finished_run):
    with pytest.raises(ValueError, match=r"other settings \(num_processes: 1 -> 2\)"):
        check_resume(train_module, finished_run, [], num_processes=2)


def test_a_damaged_checkpoint_is_refused_before_the_model_is_built(train_module, tmp_path, finished_run):
    run = shutil.copytree(finished_run, tmp_path / "run")
    weights = run / "checkpoints" / "checkpoint-5" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors is damaged .*resume from an earlier checkpoint"):
        check_resume(train_module, run, [])


def test_a_resume_refused_through_the_script_names_the_flag_in_one_line(tmp_path, mnist_folder, finished_run):
    run = shutil.copytree(finished_run, tmp_path / "run")
    command = [sys.executable, str(TRAIN), f"--dataset_name={mnist_folder}", f"--output_dir={run}", *TINY]
    flags = ["--resume_from_checkpoint=latest", "--learning_rate=1e-3"]
    message = "(learning_rate: 0.0002 -> 0.001); resume with the checkpoint's settings, or start a new run in another "
    assert_usage_error([*command, *flags], "train.py", message + "--output_dir.")


def test_a_second_training_on_one_output_dir_is_refused_and_the_first_is_unharmed(tmp_path, mnist_folder):
    base = [f"--dataset_name={mnist_folder}", f"--output_dir={tmp_path / 'out'}", *TINY, "--checkpointing_steps=2"]

    def start(record: str, *flags: str) -> subprocess.Popen:
        (tmp_path / record).mkdir()
        env = {**os.environ, "RECORD_DIR": str(tmp_path / record)}
        return subprocess.Popen(
            [sys.executable, str(LAUNCHER), *base, *flags], env=env, stderr=subprocess.PIPE, text=True
        )

    first = start("first", "--max_train_steps=100000")
    wait_for_batches(tmp_path / "first" / "seen-0.txt", 3)
    # The lock is checked first: a second training is refused before it reads any data (here, none it could read;
    # were the lock checked later, or not at all, it would fail on that data instead).
    unread = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            *base,
            "--resume_from_checkpoint=latest",
            f"--dataset_name={tmp_path / 'nothing'}",
        ],
        capture_output=True,
        text=True,
    )
    assert unread.returncode == 2
    assert "is in use by another training (pid " in unread.stderr.strip().splitlines()[-1]
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0 and "on request" in stderr, stderr
    # A run killed outright leaves no lock behind: the next one takes the folder over.
    killed = start("killed", "--resume_from_checkpoint=latest", "--max_train_steps=100000")
    wait_for_batches(tmp_path / "killed" / "seen-0.txt", 1)
    killed.kill()
    killed.communicate(timeout=60)
    third = subprocess.run(
        [sys.executable, str(TRAIN), *base, "--resume_from_checkpoint=latest", "--max_train_steps=1"],
        capture_output=True,
        text=True,
    )
    assert third.returncode == 0, third.stderr


def wait_for_batches(seen: Path, count: int, timeout: float = 120) -> None:
    """Wait until a recorded run has trained on `count` batches of 16 in all."""
    deadline = time.time() + timeout
    while not (seen.exists() and len(read_ids(seen)) >= count * 16):
        assert time.time() < deadline, f"no {count} batches in {timeout} s"
        time.sleep(0.1)


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
        tmp_path, mnist_folder, "budget", "--max_train_steps=50", "--max_train_minutes=1e-6", "--snr_gamma=5",
        "--scheduler=unipc",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    card = (output_dir / "README.md").read_text()
    assert "| optimizer steps | 1 |" in card
    # The time limit may end the run before its 50 steps, so the bar shows no total, only the steps and the time left.
    assert "/50" not in process.stderr and "1step [" in process.stderr and "left=00:00" in process.stderr
    assert "clamping frac" not in process.stderr
    # The card's code draws as the run's grid was drawn: UniPC on the 4 steps of TINY.
    assert "pipe.scheduler = UniPCMultistepScheduler.from_config" in card
    assert "num_inference_steps=4," in card and "the setting that drew the digits above" in card


def planned_steps(process: subprocess.CompletedProcess, minutes: str) -> int:
    """The step count a run's time budget became, from its log."""
    return int(re.search(rf"time budget of {minutes} minutes: (\d+) steps", process.stderr)[1])


def test_a_time_budget_alone_becomes_the_step_count_of_the_bar_and_the_schedule(tmp_path, mnist_folder):
    process, output_dir, _ = train(
        tmp_path, mnist_folder, "timed", "--max_train_minutes=0.05", "--lr_scheduler=cosine", "--lr_warmup_steps=0"
    )
    assert process.returncode == 0, process.stderr
    steps = planned_steps(process, "0.05")
    assert f"learning-rate schedule: cosine over {steps} steps" in process.stderr
    assert f"| optimizer steps | {steps} |" in (output_dir / "README.md").read_text()
    # The cosine runs over exactly those steps, to zero at the last one.
    expected = [2e-4 * (1 + np.cos(np.pi * step / steps)) / 2 for step in range(1, steps + 1)]
    np.testing.assert_allclose(logged_scalars(output_dir, "lr"), expected, rtol=1e-5, atol=1e-12)
    # The bar counts steps against that total, reaches it, and ends without tqdm's warning of a count past its total.
    totals = set(re.findall(r"\| *\d+/(\d+) \[", process.stderr))
    assert totals == {str(steps)} and f"| {steps}/{steps} [" in process.stderr
    assert "clamping frac" not in process.stderr


def test_a_time_budgeted_run_resumed_from_a_checkpoint_ends_bitwise_equal_to_the_uninterrupted_one(
    tmp_path, mnist_folder
):
    """A 0.1-minute budget at 1 step per second (a clock the launcher fixes, whatever the machine's load) is 6 steps.
    The first run is stopped (SIGTERM) right after its checkpoint at step 1, so it ends at step 2; its resume keeps the
    6 steps (and measures nothing again) and ends with the weights of the run of 6 steps without a budget. Those are
    the weights of the uninterrupted run of that budget: its trial steps, run before its first step as the first run's
    were before its steps 1 and 2, leave weights, optimizer and random states alone, and any trace they left would be
    in the checkpoint of step 2, which the resumed run starts from."""
    timed = ["--max_train_minutes=0.1", "--checkpointing_steps=1", "--lr_scheduler=cosine", "--lr_warmup_steps=2"]
    clock = {"TRIAL_STEPS_PER_SECOND": "1"}
    first, resumed_dir, _ = train(tmp_path, mnist_folder, "first", *timed, STOP_AFTER_CHECKPOINT="1", **clock)
    assert first.returncode == 0, first.stderr
    assert "stopped at step 2 on request" in first.stderr and planned_steps(first, "0.1") == 6
    second, _, resumed_record = train(
        tmp_path, mnist_folder, "second", f"--output_dir={resumed_dir}", *timed, "--resume_from_checkpoint=latest"
    )
    assert second.returncode == 0, second.stderr
    assert "checkpoint-2 at step 2" in second.stderr and "time budget of" not in second.stderr
    assert "| 6/6 [" in second.stderr
    resumed_ids = read_ids(resumed_record / "seen-0.txt")
    assert len(resumed_ids) == 6 * 16, "the 2 batches passed over to resume, then 4 trained on: no trial steps"
    steps, steps_dir, steps_record = train(
        tmp_path, mnist_folder, "steps", "--max_train_steps=6", "--lr_scheduler=cosine", "--lr_warmup_steps=2"
    )
    assert steps.returncode == 0, steps.stderr
    ema = "unet/diffusion_pytorch_model.safetensors"
    assert resumed_ids[2 * 16 :] == read_ids(steps_record / "seen-0.txt")[2 * 16 :]
    assert (steps_record / "weights-0.txt").read_text() == (resumed_record / "weights-0.txt").read_text()
    assert (steps_dir / ema).read_bytes() == (resumed_dir / ema).read_bytes()


def test_the_step_bar_draws_each_step_once(finished_training):
    process, _ = finished_training  # its log lines (a checkpoint saved every step) come between the bar's draws
    draws = [draw for draw in process.stderr.split("\r") if "/5 [" in draw]
    for step in range(1, 5):  # the last step is drawn again when the bar closes
        assert sum(f"| {step}/5 [" in draw for draw in draws) <= 1, draws
    assert any("| 5/5 [" in draw and "img_s=" in draw for draw in draws), draws


def test_a_time_budget_is_measured_on_trial_steps_that_change_nothing():
    """`time_budget_steps` times whole trial steps (forward and backward of `gradient_accumulation_steps` batches) and
    leaves the weights, their gradients and the random state as they were."""

    class Trial:  # accelerate's Accelerator, as far as trial steps use it
        device = torch.device("cpu")

        @staticmethod
        def backward(loss: torch.Tensor) -> None:
            loss.backward()

    model, batches_seen = torch.nn.Linear(4, 1), []

    def slow_loss(x: torch.Tensor) -> torch.Tensor:
        batches_seen.append(x)
        time.sleep(0.02)
        return model(x + torch.randn_like(x)).square().mean()

    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    batches = ((torch.ones(2, 4),) for _ in range(1000))
    steps = time_budget_steps(Trial(), 0.01, model, slow_loss, batches, gradient_accumulation_steps=2)
    # 0.6 s at no more than 1 / (2 x 0.02 s) steps per second: at most 15 steps, fewer on a busy machine.
    assert 1 <= steps <= 15 and len(batches_seen) % 2 == 0 and len(batches_seen) >= 4
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, w) and p.grad is None for p, w in zip(model.parameters(), weights, strict=True))


def test_training_progress_checkpoints_its_position_and_time_only():
    progress = TrainingProgress()
    progress.global_step, progress.epoch, progress.batches_in_epoch, progress.train_seconds = 7, 1, 3, 12.5
    assert progress.state_dict() == {"global_step": 7, "epoch": 1, "batches_in_epoch": 3, "train_seconds": 12.5}
    resumed = TrainingProgress()
    resumed.load_state_dict(progress.state_dict())
    assert resumed.state_dict() == progress.state_dict()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_paper(prediction_type):
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
    weights = min_snr_weight(scheduler, t, 5.0, prediction_type)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-3)  # float32 1 - abar_0 = 1e-4 keeps ~4 digits
    assert snr[0] > 5 > snr[-1], "the test covers both sides of the clip"


def test_real_mnist_trains(tmp_path, real_mnist):
    process, output_dir, record = train(tmp_path, real_mnist, "real", "--max_train_steps=2")
    assert process.returncode == 0, process.stderr
    assert "60000 examples" in process.stderr
    assert len(read_ids(record / "seen-0.txt")) == 32
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
