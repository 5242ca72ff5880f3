"""`training/release.py` on a tiny finished run: the release folder, its pictures, its card, and its refusals."""

import contextlib
import io
import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.errors import UsageError
from ddpm_mnist.evaluation import load_test_digits
from ddpm_mnist.metrics.quality import SampleQuality
from ddpm_mnist.model_card import seed_spread_line
from tests.test_hub import PIPELINE_FILES, REMOTE_CODE
from tests.test_train import train
from tests.utils import write_mnist_folder

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "training" / "release.py"


@pytest.fixture(scope="module")
def release_module() -> dict:
    return runpy.run_path(str(RELEASE))


@pytest.fixture(scope="module")
def finished_run(mnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step tiny run with T = 10, so that 1000-step-DDPM stands in as 10-step DDPM."""
    process, output_dir, _ = train(
        tmp_path_factory.mktemp("run"), mnist_folder, "run", "--max_train_steps=3", "--ddpm_num_steps=10"
    )
    assert process.returncode == 0, process.stderr
    return output_dir


@pytest.fixture(scope="module")
def conditional_run(finished_run: Path, mnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`finished_run` fine-tuned with labels for 3 steps into a class-conditional model, with T = 25: the
    inpainting pipeline's default 25 steps just fit."""
    process, output_dir, _ = train(
        tmp_path_factory.mktemp("conditional"), mnist_folder, "conditional", "--max_train_steps=3",
        "--ddpm_num_steps=25", "--class_conditional", f"--pretrained_model_name_or_path={finished_run}",
        "--class_embedding_lr=0.02",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    return output_dir


def arguments(run: Path, out: Path, data: Path, *flags: str) -> list[str]:
    """release.py's command line for a tiny release of `run` into `out`, with `flags` last (the last of a flag wins)."""
    return [str(run), f"--output_dir={out}", "--hub_model_id=tester/released", f"--dataset_name={data}",
            "--num_samples=64", "--ddpm_samples=64", "--reference_images=32", "--nll_images=8", "--batch_size=64",
            "--num_inference_steps=5", "--nll_timesteps=3", "--device=cpu", *flags]  # fmt: skip


def release(module: dict, run: Path, out: Path, data: Path, *flags: str) -> None:
    module["main"](module["parse_args"](arguments(run, out, data, *flags)))


def test_the_release_folder_is_the_pushed_layout_with_pictures_and_results(
    release_module, finished_run, mnist_folder, tmp_path, capsys
):
    out, curve = tmp_path / "release", tmp_path / "curve.png"
    Image.new("RGB", (40, 30), "white").save(curve)
    flags = ["--note=Trained for a test.", f"--time_to_quality_image={curve}", "--dtype=bf16", "--extra_seeds=1"]
    release(release_module, finished_run, out, mnist_folder, *flags)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", *PIPELINE_FILES, *REMOTE_CODE, "samples/denoising.png", "samples/grid.png", "samples/loss.png",
        "samples/nll_terms.png", "samples/time_to_quality.png",
    ])  # fmt: skip
    assert Image.open(out / "samples" / "grid.png").size == (8 * 28 * 3, 8 * 28 * 3)
    assert Image.open(out / "samples" / "denoising.png").size == (11 * 28 * 3, 28 * 3)
    assert Image.open(out / "samples" / "time_to_quality.png").size == (40, 30)
    for config in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        assert "_name_or_path" not in json.loads((out / config).read_text()), config  # the run's folder stays here
    card = (out / "README.md").read_text()
    for picture in ("grid", "denoising", "loss", "nll_terms", "time_to_quality"):
        assert f"](samples/{picture}.png)" in card, picture
    # The pipeline's own DDPM on 5 respaced steps is the recommended setting: scored first, and in the card's code.
    assert "| metric | DDPM, 5 steps (N=64) | real floor (N=64) | DDPM, 10 steps (N=64) | real floor (N=64) |" in card
    assert "num_inference_steps=5, generator=generator" in card and "on 5 evenly spaced timesteps of the 10" in card
    assert "**Targets** (at DDPM, 5 steps, N=64):" in card and "Trained for a test." in card
    assert "| optimizer steps | 3 |" in card
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    quality = result["results"]["DDPM, 5 steps"]["quality"]
    assert f"- mean classifier confidence {quality['mean_confidence']:.3f} (target >= 0.95): **" in card
    low, high = min(quality["class_histogram"]), max(quality["class_histogram"])
    assert f"- every digit's share between {low:.1%} and {high:.1%} (target 7.0% to 13.0%): **missed by" in card
    assert result["nll"]["exact"] is False and result["nll"]["num_timesteps"] == 3
    # One more seed of the recommended setting: other digits, shown as a range beside the card's seed.
    (spread,) = result["seed_spread"]
    assert spread["num_images"] == 64 and spread["fid"] != quality["fid"]
    low_fid, high_fid = sorted([quality["fid"], spread["fid"]])
    assert (
        f"Seed to seed: 64 samples from each of 2 seeds (the card's and the next 1) give FID {low_fid:.2f} to "
        f"{high_fid:.2f} (" in card
    )
    assert "unbiased estimate from 3 timesteps" in card and "with the U-Net in bf16" in card
    # The release holds the run's weights (fp32, though it sampled in bf16): the same digits for the same seed.
    released, trained = DDPMMnistPipeline.from_pretrained(out), DDPMMnistPipeline.from_pretrained(finished_run)
    draws = [
        p(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
        for p in (released, trained)
    ]
    torch.testing.assert_close(*draws, rtol=0, atol=0)


def test_an_existing_release_or_an_unfinished_run_is_refused_before_any_work(
    release_module, finished_run, mnist_folder, tmp_path
):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="exists; pass a new folder"):
        release(release_module, finished_run, tmp_path / "taken", mnist_folder)
    with pytest.raises(UsageError, match="model_index.json is missing; pass the output_dir of a finished"):
        release(release_module, tmp_path, tmp_path / "new", mnist_folder)
    with pytest.raises(UsageError, match=r"--num_samples must be at least 64 \(the card's 8x8 grid\), got 32"):
        release(release_module, finished_run, tmp_path / "new", mnist_folder, "--num_samples=32")
    with pytest.raises(UsageError, match=r"--extra_seeds must be 0 \(no spread\) or more, got -1"):
        release(release_module, finished_run, tmp_path / "new", mnist_folder, "--extra_seeds=-1")
    # What the library refuses (a ValueError in its own words) comes back naming the flag to fix.
    library_refusals = {
        "--num_inference_steps=11": r"^--num_inference_steps: .*\b11\b.*1\.\.10",  # T = 10
        "--reference_images=2": r"^--dataset_name, --reference_images: .*reference_images.*\b2\b",
    }
    for flag, message in library_refusals.items():
        with pytest.raises(UsageError, match=message) as error:
            release(release_module, finished_run, tmp_path / "new", mnist_folder, flag)
        assert "\n" not in str(error.value), flag
    assert not (tmp_path / "new").exists()


def test_the_seed_spread_gives_ranges_and_counts_the_seeds_that_meet_every_target(release_module):
    def quality(confidence: float, rarest: float, fid: float) -> SampleQuality:
        shares = [rarest] + [(1 - rarest) / 9] * 9
        return SampleQuality(fid, 0.0, 0.0, 0.9, 0.9, confidence, 3.3, rarest, shares, 1000)

    floor = quality(0.98, 0.1, 20.0)
    # Seed 0 meets every target (1.95x); the next two miss the FID (2.5x) and the shares (6%).
    line = seed_spread_line(
        release_module["TARGETS"],
        quality(0.96, 0.08, 39.0),
        [quality(0.97, 0.09, 50.0), quality(0.955, 0.06, 30.0)],
        floor,
    )
    assert line == (
        "Seed to seed: 1000 samples from each of 3 seeds (the card's and the next 2) give FID 30.00 to 50.00 "
        "(1.50 to 2.50x the floor, mean 1.98x), mean confidence 0.955 to 0.970 and a rarest digit at 6.0% to 9.0%; "
        "every target is met at 1 of these 3 seeds. The verdicts above are the card's seed alone, and every ratio uses "
        "the one floor above (itself one draw of real digits)."
    )
    # Seeds that agree to the digits shown give one value, not "39.00 to 39.00".
    same = seed_spread_line(release_module["TARGETS"], quality(0.96, 0.08, 39.0), [quality(0.96, 0.08, 39.001)], floor)
    assert "give FID 39.00 (1.95x the floor, mean 1.95x), mean confidence 0.960 and a rarest digit at 8.0%;" in same


@pytest.fixture(scope="module")
def larger_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset like `mnist_folder` with 128 training digits: the floor of a conditional release's 100 samples."""
    return write_mnist_folder(tmp_path_factory.mktemp("mnist"), np.random.default_rng(1), num_train=128, num_test=32)


@pytest.fixture(scope="module")
def conditional_release(release_module, conditional_run, larger_mnist, tmp_path_factory) -> tuple[Path, dict]:
    """The release of `conditional_run` (100 samples at the default guidance 1.5, a sweep over 1 and 1.5 at as many)
    and the JSON summary it printed."""
    out = tmp_path_factory.mktemp("conditional-release") / "release"
    flags = ["--num_samples=100", "--extra_seeds=1", "--sweep_samples=100", "--guidance_scales", "1", "1.5"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        release(release_module, conditional_run, out, larger_mnist, *flags)
    return out, json.loads(stdout.getvalue().strip().splitlines()[-1])


def test_a_conditional_release_scores_class_accuracy_and_draws_its_own_pictures(conditional_release):
    out, result = conditional_release
    files = {p.relative_to(out).as_posix() for p in (out / "samples").iterdir()}
    assert {"samples/guidance.png", "samples/completion.png", "samples/interpolation.png"} <= files
    assert Image.open(out / "samples" / "grid.png").size == (10 * 28 * 3, 10 * 28 * 3)  # one row of 10 per digit
    assert Image.open(out / "samples" / "completion.png").size == (8 * 28 * 3, 3 * 28 * 3)
    assert Image.open(out / "samples" / "interpolation.png").size == (13 * 28 * 3, 28 * 3)  # 11 lambdas and the ends
    card = (out / "README.md").read_text()
    recommended = result["results"]["DDPM, 5 steps, guidance 1.5"]
    ddpm = result["results"]["DDPM, 25 steps, guidance 1.5"]
    quality = recommended["quality"]
    assert quality["num_images"] == 100 and ddpm["quality"]["num_images"] == 64
    # Balanced labels: every digit's accuracy is over its 10 samples, in tenths; the overall one is their mean.
    per_digit = quality["class_accuracy_per_digit"]
    assert all(round(share * 10, 6) == round(share * 10) for share in per_digit)
    assert quality["class_accuracy"] == pytest.approx(sum(per_digit) / 10)
    row = f"| DDPM, 5 steps, guidance 1.5 (N=100) | {quality['class_accuracy']:.1%} | " + " | ".join(
        f"{share:.1%}" for share in per_digit
    )
    assert row in card and "| DDPM, 25 steps, guidance 1.5 (N=64) | " in card
    assert f"- class accuracy {quality['class_accuracy']:.1%} (target >= 99.5%): **" in card
    worst = min(range(10), key=per_digit.__getitem__)
    assert f"- lowest class accuracy of a digit {per_digit[worst]:.1%}, digit {worst}'s (target >= 98% for" in card
    assert "(target >= 0.98)" in card and "(target <= 1.3x)" in card and "every digit's share" not in card
    # The sweep: scale 1.5 is the recommended setting itself (as many samples, one seed); scale 1 was drawn.
    sweep, floor = result["guidance_sweep"], result["guidance_sweep_floor"]
    assert list(sweep) == ["1", "1.5"] and sweep["1.5"] == quality and sweep["1"]["fid"] != quality["fid"]
    for scale, scores in sweep.items():
        assert (
            f"| {scale} | {scores['fid']:.2f} | {scores['fid'] / floor['fid']:.2f} | {scores['class_accuracy']:.1%} | "
            f"{scores['mean_confidence']:.3f} |" in card
        )
    assert result["seed_spread"][0]["class_accuracy"] == pytest.approx(
        sum(result["seed_spread"][0]["class_accuracy_per_digit"]) / 10
    )
    assert "It bounds the model's unconditional p(x)" in card
    for picture in ("grid", "guidance", "completion", "interpolation"):
        assert f"](samples/{picture}.png)" in card, picture


def test_the_conditional_card_is_hub_correct_and_says_where_training_started(conditional_release, conditional_run):
    out, result = conditional_release
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert {"class-conditional", "classifier-free-guidance"} <= set(card.data.tags)
    (evaluated,) = {r.task_type for r in card.data.eval_results}
    assert evaluated == card.data.pipeline_tag
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["class_accuracy"] == round(
        result["results"]["DDPM, 5 steps, guidance 1.5"]["quality"]["class_accuracy"], 4
    )
    started = json.loads((conditional_run / "training.json").read_text())["training"]["pretrained_model_name_or_path"]
    assert (
        f"| started from | `{started}` (its U-Net weights; a class embedding it did not have started at zero) |"
        in card.text
    )
    assert "warm-up steps (the class embedding: 0.02) |" in card.text


def test_the_conditional_cards_code_runs_with_and_without_the_package(conditional_release, monkeypatch, tmp_path):
    out, _ = conditional_release
    monkeypatch.chdir(tmp_path)  # the card's code saves a digit where it runs
    blocks = [
        block.replace('"tester/released"', repr(str(out)))
        for block in re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.DOTALL)
    ]
    package, remote, editing = blocks
    assert "guidance_scale=1.5" in package and "num_inference_steps=5" in package
    scope = {}
    exec(package + editing, scope)
    labels = [int(label) for label in re.search(r"class_labels=\[([\d, ]+)\]", package)[1].split(",")]
    assert len(scope["images"]) == len(labels) == 10 and (tmp_path / "seven.png").is_file()
    assert len(scope["completed"]) == 1 and len(scope["row"]) == 11
    kept = np.asarray(scope["images"][8])[:14]
    np.testing.assert_array_equal(np.asarray(scope["completed"][0])[:14], kept)  # RePaint keeps the known half
    remote_scope = {}
    exec(remote, remote_scope)
    assert [np.asarray(image).tolist() for image in remote_scope["images"]] == [
        np.asarray(image).tolist() for image in scope["images"]
    ]


def test_the_completion_picture_shows_the_test_digits_their_kept_halves_and_completions(conditional_release,
                                                                                         larger_mnist):  # fmt: skip
    out, _ = conditional_release
    picture = np.asarray(Image.open(out / "samples" / "completion.png"))[::3, ::3]  # undo the 3x upscale
    original, kept, completed = picture[:28], picture[28:56], picture[56:]
    digits = load_test_digits(larger_mnist, range(8))
    expected = ((digits[:, 0] + 1) / 2 * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(original, np.concatenate(list(expected), axis=1))
    np.testing.assert_array_equal(kept[:14], original[:14])
    assert not kept[14:].any()  # the half to fill in is black
    np.testing.assert_array_equal(completed[:14], original[:14])


def test_bad_guidance_flags_are_refused_in_one_line_before_any_work(
    release_module, finished_run, conditional_run, mnist_folder, tmp_path
):
    def check(run: Path, *flags: str) -> None:
        release_module["check_args"](
            release_module["parse_args"](arguments(run, tmp_path / "new", mnist_folder, *flags))
        )

    cases = {
        (finished_run, "--guidance_scale=2"): "--guidance_scale 2 needs a class-conditional run, and ",
        (conditional_run, "--guidance_scale=0.5", "--num_samples=100"): "guidance scale 0.5 is below 1; pass ",
        (conditional_run, "--guidance_scales", "1", "0", "--num_samples=100"): "guidance scale 0 is below 1; pass ",
        (conditional_run, "--sweep_samples=5", "--num_samples=100"): r"--sweep_samples must be 0 \(skip the sweep\)",
        (conditional_run, "--num_samples=64"): r"--num_samples must be at least 100 for a class-conditional run",
    }
    for (run, *flags), message in cases.items():
        with pytest.raises(UsageError, match=message) as error:
            check(run, *flags)
        assert "\n" not in str(error.value), flags
    check(finished_run, "--guidance_scale=1")  # no guidance is what an unconditional run draws with
    check(conditional_run, "--num_samples=100", "--sweep_samples=0")


def test_flags_that_sample_or_score_a_run_are_refused_beside_gpu_results(release_module, tmp_path):
    def check(*flags: str) -> None:
        argv = ["--gpu_results", str(tmp_path / "gpu"), f"--output_dir={tmp_path / 'new'}", "--hub_model_id=a/b"]
        release_module["check_args"](release_module["parse_args"]([*argv, *flags]))

    cases = {
        ("--num_samples=500",): "--num_samples",
        ("--scheduler=unipc", "--num_inference_steps=20"): "--scheduler",
        ("--guidance_scales", "1", "3"): "--guidance_scales",
        ("--dataset_name=path/to/mnist",): "--dataset_name",
    }
    for flags, name in cases.items():
        expected = f"^{name} plays no part with --gpu_results, which hold the scores"
        with pytest.raises(UsageError, match=expected) as error:
            check(*flags)
        assert "\n" not in str(error.value), flags
    check("--note=Trained on a GPU.", "--seed=0")  # the card's own flags, and a default given as it is
