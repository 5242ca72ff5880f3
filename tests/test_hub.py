"""The Hub round trip against the stand-in of tests/hub_server.py: push, load by repo id, load without the package.

Pushes go through each of diffusers' own paths (`pipe.push_to_hub`, `pipe.save_pretrained(..., push_to_hub=True)`)
and through the package's folder push at the end of training.

Client code runs in fresh interpreters with the environment of `HubServer.client_env`: huggingface_hub reads
HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is imported, and this process imported it with the offline settings
of conftest.py.
"""

import hashlib
import importlib.metadata
import inspect
import json
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from diffusers import DiffusionPipeline
from diffusers.utils import PushToHubMixin
from diffusers.utils.dynamic_modules_utils import get_relative_import_files

from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.hub import export_pipeline_folder, upload_patterns
from ddpm_mnist.model_card import render_model_card
from tests.hub_server import WRITE_TOKEN, HubServer
from tests.test_train import TINY
from tests.utils import tiny_unet

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
# Where the pushed repo carries the package's modules for trust_remote_code, and their source: the pipeline module
# with the modules it imports relatively, beside it, and each component's module in its folder.
REMOTE_CODE = {
    "pipeline_ddpm_mnist.py": ROOT / "ddpm_mnist" / "pipeline_ddpm_mnist.py",
    **{Path(f).name: Path(f) for f in get_relative_import_files(ROOT / "ddpm_mnist" / "pipeline_ddpm_mnist.py")},
    "unet/unet_ddpm_mnist.py": ROOT / "ddpm_mnist" / "unet_ddpm_mnist.py",
    "scheduler/scheduling_ddpm_mnist.py": ROOT / "ddpm_mnist" / "scheduling_ddpm_mnist.py",
}
PIPELINE_FILES = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                  "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
WITHOUT_PACKAGE = "import sys\nsys.modules['ddpm_mnist'] = None  # a user who never installed ddpm-mnist\n"
# Script lines defining `sample(pipe)`: 2 digits drawn with a fixed seed, as an array.
SAMPLE = """
import numpy as np
import torch

def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=2, num_inference_steps=10, generator=generator, output_type="np").images
"""
# Script lines saving the PIL `images` a snippet of the model card made to the .npy file named by `format`.
SAVE_IMAGES = "import numpy as np\nnp.save({!r}, np.stack([np.asarray(image) for image in images]))\n"
CARD_CODE = r"```python\n(.*?)```"  # the model card's code blocks, with re.DOTALL
# Two tiny runs of 2 steps with T = 10, so that the card's sampling code runs in a moment.
PUSH_RUN = [*TINY, "--max_train_steps=2", "--checkpointing_steps=2", "--ddpm_num_steps=10", "--push_to_hub"]
# One pipeline in memory pushed to a repo of its own by each of diffusers' push paths (the `pushes` fixture), and the
# full model card pushed through one of them: repo name -> the titles of its commits after the initial one (a pull
# request's included), and the revision that holds the pipeline.
PUSHES = {
    "via-push": (["Upload digits"], "main"),
    "via-pr": (["Propose digits"], "refs/pr/1"),
    "via-save": (["Save digits"], "main"),
    "with-card": (["Upload DDPMMnistPipeline", "Update weights"], "main"),
}


def client_env(hub: HubServer, hf_home: Path, token: str | None = WRITE_TOKEN) -> dict[str, str]:
    """`hub.client_env`, with one compute thread: clients run side by side, and tiny models gain nothing from more."""
    return {**hub.client_env(hf_home, token), "OMP_NUM_THREADS": "1"}


def python(code: str, env: dict[str, str], cwd: Path) -> str:
    """Run `code` in a fresh interpreter, require success and return its stdout."""
    process = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr
    return process.stdout


def start_training(data: Path, output_dir: Path, env: dict[str, str], *flags: str) -> subprocess.Popen:
    """Start `training/train.py` on `data` into `output_dir`, its output captured."""
    command = [sys.executable, str(TRAIN), f"--dataset_name={data}", f"--output_dir={output_dir}", *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(hub: HubServer, mnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimpleNamespace]:
    """`train.py --push_to_hub` twice side by side: to tester/tiny, and to tester/broken, whose commits fail."""
    tmp = tmp_path_factory.mktemp("runs")
    hub.fail_commits_to.add("tester/broken")
    env = client_env(hub, tmp / "hf")
    # Different seeds: the Hub stores an LFS object once, so equal weights would go up only once.
    processes = {
        name: start_training(mnist_folder, tmp / name, env, *PUSH_RUN, f"--hub_model_id=tester/{name}", f"--seed={i}")
        for i, name in enumerate(("tiny", "broken"))
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr, dir=tmp / name)
    return results


@pytest.fixture(scope="module")
def pushes(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The `PUSHES` of one tiny pipeline with random weights, each loaded back with and without the package.

    With the package: the pushes, the in-memory pipeline's digits (`memory.npy`), each repo's digits loaded with
    `DDPMMnistPipeline` (`package-<repo>.npy`) and the card code for package users of via-push's short card and
    with-card's full card (`card-package-<repo>.npy`). Without it: each repo's digits loaded by diffusers with
    `trust_remote_code=True` (`remote-<repo>.npy`), the last of them saved again (`resaved/`), and the cards' code for
    the others (`card-remote-<repo>.npy`).
    Returns the folder of those files, and by repo the URLs the pushes returned (commit, pull request) and the
    modules of the pipeline diffusers loaded.
    """
    tmp = tmp_path_factory.mktemp("pushes")
    env = {**client_env(hub, tmp / "hf"), "PYTHONPATH": str(ROOT)}
    with_package = f"""{SAMPLE}
import json, re
from huggingface_hub import hf_hub_download
from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.model_card import render_model_card
from tests.utils import tiny_unet

pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=10))
urls = {{
    "via-push": pipe.push_to_hub("via-push", "Upload digits"),  # diffusers' positional commit_message
    "via-pr": pipe.push_to_hub("via-pr", "Propose digits", create_pr=True),
    "via-save": pipe.save_pretrained("saved", push_to_hub=True, repo_id="via-save", commit_message="Save digits"),
}}
render_model_card(pipe, "tester/with-card").save("full/README.md")
first = DDPMMnistPipeline(tiny_unet(seed=1), DDPMMnistScheduler(num_train_timesteps=10))
urls["with-card"] = first.save_pretrained("full", push_to_hub=True, repo_id="with-card")  # keeps that README.md
pipe.push_to_hub("with-card", "Update weights")  # other weights to a repo with a card: the card stays
np.save("memory.npy", sample(pipe))
for name, (_, revision) in {PUSHES!r}.items():
    np.save(f"package-{{name}}.npy", sample(DDPMMnistPipeline.from_pretrained(f"tester/{{name}}", revision=revision)))
for name in ("via-push", "with-card"):
    blocks = re.findall({CARD_CODE!r}, open(hf_hub_download(f"tester/{{name}}", "README.md")).read(), flags=re.DOTALL)
    exec(blocks[0] + {SAVE_IMAGES!r}.format(f"card-package-{{name}}.npy") + "".join(blocks[1:-1]))
print(json.dumps({{name: [str(url), url.pr_url] for name, url in urls.items()}}))
"""
    urls = json.loads(python(with_package, env, tmp).splitlines()[-1])
    without_package = f"""{WITHOUT_PACKAGE}{SAMPLE}
import json, re
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download

modules = {{}}
for name, (_, revision) in {PUSHES!r}.items():
    pipe = DiffusionPipeline.from_pretrained(f"tester/{{name}}", revision=revision, trust_remote_code=True)
    modules[name] = [type(part).__module__ for part in (pipe, pipe.unet, pipe.scheduler)]
    np.save(f"remote-{{name}}.npy", sample(pipe))
pipe.save_pretrained("resaved")  # the code diffusers ran saves itself again
for name in ("via-push", "with-card"):
    blocks = re.findall({CARD_CODE!r}, open(hf_hub_download(f"tester/{{name}}", "README.md")).read(), flags=re.DOTALL)
    exec(blocks[-1] + {SAVE_IMAGES!r}.format(f"card-remote-{{name}}.npy"))
print(json.dumps(modules))
"""
    modules = json.loads(python(without_package, env, tmp).splitlines()[-1])
    return SimpleNamespace(dir=tmp, urls=urls, modules=modules)


def test_train_pushes_the_pipeline_card_samples_and_code_and_nothing_else(runs, hub):
    run = runs["tiny"]
    assert run.returncode == 0, run.stderr
    files = hub.files("tester/tiny")
    assert sorted(files) == sorted([".gitattributes", "README.md", "samples/step-0000002.png", *PIPELINE_FILES,
                                    *REMOTE_CODE])  # fmt: skip
    # Checkpoints (with their optimizer states) and tensorboard logs exist locally, and stayed there.
    assert (run.dir / "checkpoints" / "checkpoint-2" / "optimizer.bin").is_file()
    assert list((run.dir / "logs").rglob("events.out.tfevents.*"))
    # What went up is the run folder as `save_pretrained` wrote it, code included.
    for path in ("README.md", "samples/step-0000002.png", *PIPELINE_FILES, *REMOTE_CODE):
        assert files[path] == (run.dir / path).read_bytes(), path
    assert_remote_code_layout(files)
    # The weights went through the LFS protocol to the storage origin, which never saw the token.
    weights_sha = hashlib.sha256(files["unet/diffusion_pytorch_model.safetensors"]).hexdigest()
    assert ("PUT", f"cdn:/upload/{weights_sha}", False) in hub.requests
    assert ("POST", "/tester/tiny.git/info/lfs/objects/verify", True) in hub.requests
    assert not [request for request in hub.requests if request[1].startswith("cdn:") and request[2]]
    # The token is in no file, local or uploaded, and in no log line.
    local_files = [p.read_bytes() for p in run.dir.rglob("*") if p.is_file()]
    assert not [data for data in [*files.values(), *local_files] if WRITE_TOKEN.encode() in data]
    assert WRITE_TOKEN not in run.stdout + run.stderr


def test_export_writes_exactly_what_a_push_uploads_and_it_loads(runs, hub, tmp_path):
    run = runs["tiny"]
    exported = export_pipeline_folder(run.dir, tmp_path / "release")
    files = {p.relative_to(exported).as_posix(): p.read_bytes() for p in exported.rglob("*") if p.is_file()}
    pushed = {path: data for path, data in hub.files("tester/tiny").items() if path != ".gitattributes"}
    assert files == pushed
    pipe = DDPMMnistPipeline.from_pretrained(exported)
    assert type(pipe.unet).__module__ == "ddpm_mnist.unet_ddpm_mnist"  # the package's classes, not the copies
    with pytest.raises(FileExistsError, match="release exists; export into a new folder"):
        export_pipeline_folder(run.dir, exported)


def test_a_failed_upload_keeps_the_folder_and_its_retry_command_works(runs, hub, tmp_path):
    run = runs["broken"]
    assert run.returncode == 1
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("train.py: error: the upload to tester/broken failed (") and "500" in error, error
    assert f"{run.dir} is intact" in error
    assert [commit.title for commit in hub.repos["tester/broken"].commits.values()] == ["initial commit"]
    for path in [*PIPELINE_FILES, "README.md", "samples/step-0000002.png", "checkpoints/checkpoint-2"]:
        assert (run.dir / path).exists(), path
    # Once the Hub is back, the printed command alone finishes the push.
    hub.fail_commits_to.discard("tester/broken")
    program, flag, code = shlex.split(error.split("Retry the upload alone with: ", 1)[1])
    assert (program, flag) == ("python", "-c")
    python(code, client_env(hub, tmp_path / "hf"), tmp_path)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert hub.files("tester/broken")[weights] == (run.dir / weights).read_bytes()


def test_from_pretrained_by_repo_id_with_revision_cache_dir_local_files_only_and_offline(runs, hub, tmp_path):
    run = runs["tiny"]
    assert run.returncode == 0, run.stderr
    # Online: push the trained folder, then a second commit with another schedule, and load in every way.
    online = f"""
import json
from huggingface_hub import HfApi
from ddpm_mnist import DDPMMnistPipeline
from ddpm_mnist.hub import push_pipeline_folder

first = push_pipeline_folder({str(run.dir)!r}, "tester/loads").rsplit("/", 1)[1]
config = json.load(open({str(run.dir / "scheduler" / "scheduler_config.json")!r}))
config["num_train_timesteps"] = 20
HfApi().upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="scheduler/scheduler_config.json",
                    repo_id="tester/loads")
main = DDPMMnistPipeline.from_pretrained("tester/loads")
pinned = DDPMMnistPipeline.from_pretrained("tester/loads", revision=first)
elsewhere = DDPMMnistPipeline.from_pretrained("tester/loads", cache_dir="cache")
cached = DDPMMnistPipeline.from_pretrained("tester/loads", local_files_only=True)
try:
    DDPMMnistPipeline.from_pretrained("tester/loads", local_files_only=True, cache_dir="empty")
    not_cached = "loaded"
except Exception as e:
    not_cached = type(e).__name__
local = DDPMMnistPipeline.from_pretrained({str(run.dir)!r})
print(json.dumps({{
    "classes": sorted({{type(c).__module__ for p in (main, pinned) for c in (p, p.unet, p.scheduler)}}),
    "steps": [p.scheduler.config.num_train_timesteps for p in (main, pinned, elsewhere, cached)],
    "pinned_is_local": bool((sample(pinned) == sample(local)).all()),
    "not_cached": not_cached,
}}))
np.save("main.npy", sample(main))
"""
    env = client_env(hub, tmp_path / "hf")
    result = json.loads(python(SAMPLE + online, env, tmp_path))
    assert result["classes"] == ["ddpm_mnist.pipeline_ddpm_mnist", "ddpm_mnist.scheduling_ddpm_mnist",
                                 "ddpm_mnist.unet_ddpm_mnist"]  # fmt: skip
    assert result["steps"] == [20, 10, 20, 20]
    assert result["pinned_is_local"]
    assert result["not_cached"] == "LocalEntryNotFoundError"
    assert (tmp_path / "cache" / "models--tester--loads" / "snapshots").is_dir()
    # Offline, with no Hub at all: what was downloaded loads, pinned or not; nothing else does.
    offline = """
from ddpm_mnist import DDPMMnistPipeline
assert (sample(DDPMMnistPipeline.from_pretrained("tester/loads")) == np.load("main.npy")).all()
try:
    DDPMMnistPipeline.from_pretrained("tester/tiny")
except Exception as e:
    print(type(e).__name__)
"""
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert python(SAMPLE + offline, env, tmp_path).split() == ["LocalEntryNotFoundError"]


def assert_remote_code_layout(files: dict[str, bytes]) -> None:
    """The repo's model_index.json names the code files it carries, verbatim copies of the package's modules."""
    for path, source in REMOTE_CODE.items():
        assert files[path] == source.read_bytes(), f"{path} is not a verbatim copy of {source.name}"
    index = json.loads(files["model_index.json"])
    assert index["_class_name"] == ["pipeline_ddpm_mnist", "DDPMMnistPipeline"]
    assert index["unet"] == ["unet_ddpm_mnist", "DDPMMnistUNet"]
    assert index["scheduler"] == ["scheduling_ddpm_mnist", "DDPMMnistScheduler"]


def test_push_to_hub_takes_diffusers_arguments():
    ours, diffusers = (inspect.signature(cls.push_to_hub).parameters for cls in (DDPMMnistPipeline, PushToHubMixin))
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in diffusers.values()]


@pytest.mark.parametrize("name", PUSHES)
def test_each_push_path_uploads_weights_code_and_a_card(pushes, hub, name):
    titles, revision = PUSHES[name]
    repo = hub.repos[f"tester/{name}"]  # the token's user is the namespace of a bare name
    assert [commit.title for commit in repo.commits.values()] == ["initial commit", *titles]
    files = hub.files(f"tester/{name}", revision)
    assert sorted(files) == sorted([".gitattributes", "README.md", *PIPELINE_FILES, *REMOTE_CODE])
    assert_remote_code_layout(files)
    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "unconditional-image-generation"
    assert f'DDPMMnistPipeline.from_pretrained("tester/{name}")' in card
    assert f'DiffusionPipeline.from_pretrained("tester/{name}", trust_remote_code=True)' in card
    commit_url, pr_url = pushes.urls[name]  # what the first push returned
    repo_url, _, sha = commit_url.rpartition("/commit/")
    assert repo_url == f"{hub.endpoint}/tester/{name}" and repo.commits[sha].title == titles[0]
    assert (pr_url is not None) == (revision != "main")


def test_a_pull_request_leaves_main_alone(pushes, hub):
    assert sorted(hub.files("tester/via-pr")) == [".gitattributes"]
    assert pushes.urls["via-pr"][1] == f"{hub.endpoint}/tester/via-pr/discussions/1"


def test_a_full_card_goes_up_from_the_folder_and_a_later_push_keeps_it(pushes, hub):
    repo = hub.repos["tester/with-card"]
    cards = [commit.files["README.md"].data.decode() for commit in list(repo.commits.values())[1:]]
    assert cards[0] == cards[1] == (pushes.dir / "full" / "README.md").read_text()
    assert "preset `tiny`" in cards[0] and "its training run was not recorded" in cards[0]
    short = hub.files("tester/via-push")["README.md"].decode()
    assert "preset `tiny`" not in short, "a push without a card in the folder or the repo writes the short card"


@pytest.mark.parametrize("name", PUSHES)
def test_each_pushed_repo_gives_the_same_digits_with_and_without_the_package(pushes, name):
    memory = np.load(pushes.dir / "memory.npy")
    assert memory.shape == (2, 28, 28, 1) and memory.std() > 0.05, "random weights give varied digits"
    np.testing.assert_array_equal(np.load(pushes.dir / f"package-{name}.npy"), memory)
    np.testing.assert_array_equal(np.load(pushes.dir / f"remote-{name}.npy"), memory)
    assert [module.rpartition(".")[2] for module in pushes.modules[name]] == [
        "pipeline_ddpm_mnist", "unet_ddpm_mnist", "scheduling_ddpm_mnist"]  # fmt: skip
    assert all(module.startswith("diffusers_modules.") for module in pushes.modules[name])


@pytest.mark.parametrize("name", ["via-push", "with-card"])  # the short card, and the full one
def test_the_cards_code_runs_and_gives_the_same_digits_with_and_without_the_package(pushes, name):
    package = np.load(pushes.dir / f"card-package-{name}.npy")
    remote = np.load(pushes.dir / f"card-remote-{name}.npy")
    assert package.shape == (16, 28, 28) and package.std() > 10, "random weights give varied digits"
    np.testing.assert_array_equal(remote, package)


def test_a_pipeline_loaded_as_remote_code_saves_the_same_layout(pushes):
    folder = pushes.dir / "resaved"
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sorted(files) == sorted([*PIPELINE_FILES, *REMOTE_CODE])
    assert_remote_code_layout(files)


def test_a_folder_saved_without_the_code_is_refused_with_the_fix(tmp_path):
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    DiffusionPipeline.save_pretrained(pipe, tmp_path)  # diffusers' own layout, without the code files
    with pytest.raises(ValueError, match=r"without the code that trust_remote_code runs; save it again with `DDPM"):
        upload_patterns(tmp_path)


def test_export_keeps_the_pipeline_its_card_and_pictures_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=10)).save_pretrained(run)
    beside = ["README.md", "samples/step-0000002.png", "training.json", "notes/plan.png",
              "checkpoints/checkpoint-2/unet/config.json", "checkpoints/checkpoint-2/optimizer.bin",
              "logs/train/events.out.tfevents.1"]  # fmt: skip
    for name in beside:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(name.encode())
    exported = export_pipeline_folder(run, tmp_path / "release")
    files = {p.relative_to(exported).as_posix(): p.read_bytes() for p in exported.rglob("*") if p.is_file()}
    assert sorted(files) == sorted([*PIPELINE_FILES, *REMOTE_CODE, "README.md", "samples/step-0000002.png"])
    assert all(data == (run / path).read_bytes() for path, data in files.items())
    (run / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"unet holds pickled weights \(\.bin\); save with safe_serialization=True"):
        upload_patterns(run)


def test_the_card_and_the_hub_glue_import_neither_datasets_nor_torchmetrics():
    code = "import sys, ddpm_mnist.hub, ddpm_mnist.model_card\nprint({'datasets', 'torchmetrics'} & set(sys.modules))"
    assert python(code, {**os.environ, "PYTHONPATH": str(ROOT)}, ROOT).strip() == "set()"


def test_the_card_links_the_home_page_only_when_the_package_metadata_has_one(monkeypatch):
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    assert importlib.metadata.metadata("ddpm-mnist").get("Home-page") is None, "setup.py sets no url"
    card = render_model_card(pipe, "tester/linked").text
    assert "ddpm-mnist, which implements the paper" in card and "[ddpm-mnist](" not in card
    metadata = {"Name": "ddpm-mnist", "Home-page": "https://example.org/ddpm-mnist"}
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: metadata if name == "ddpm-mnist" else None)
    assert "[ddpm-mnist](https://example.org/ddpm-mnist), which" in render_model_card(pipe, "tester/linked").text


def test_the_model_card_has_the_hub_metadata_and_the_training_details(runs, hub):
    assert runs["tiny"].returncode == 0, runs["tiny"].stderr
    card = hub.files("tester/tiny")["README.md"].decode()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert metadata["datasets"] == ["ylecun/mnist"] and metadata["license"] == "apache-2.0"
    assert {"ddpm", "mnist"} <= set(metadata["tags"]) and "model-index" not in metadata
    assert 'pipe = DDPMMnistPipeline.from_pretrained("tester/tiny")' in card
    assert 'pipe = DiffusionPipeline.from_pretrained("tester/tiny", trust_remote_code=True)' in card
    assert "](samples/step-0000002.png)" in card and "samples/step-0000002.png" in hub.files("tester/tiny")
    assert "| optimizer steps | 2 |" in card and "176,849 parameters" in card and "preset `tiny`" in card
    assert "T = 10" in card and "Evaluation results" not in card
    assert "| data | `ylecun/mnist` (a local copy), split `train`," in card  # the Hub id, never the local path


def test_a_path_that_is_no_folder_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(OSError, match="no/such/folder is neither a folder nor a Hub repo id"):
        DDPMMnistPipeline.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_evaluation_results_render_as_a_table_and_as_model_index():
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    results = {"fid": 3.1, "kid": 0.002, "precision": 0.71, "recall": 0.55, "mean_confidence": 0.97, "nll_bpd": 1.2}
    card = render_model_card(pipe, "tester/evaluated", eval_results=results)
    model_index = card.data.to_dict()["model-index"][0]
    assert model_index["name"] == "evaluated"
    reported = {m["type"]: m["value"] for r in model_index["results"] for m in r["metrics"]}
    assert reported == results
    assert model_index["results"][0]["dataset"]["type"] == "ylecun/mnist"
    assert "| FID | 3.1 |" in card.text and "| NLL (bits/dim) | 1.2 |" in card.text
    with pytest.raises(ValueError, match="unknown metrics is; the card knows fid, kid"):
        render_model_card(pipe, "tester/evaluated", eval_results={"is": 9.0})
    # Each metric is rounded to its own decimals: FID to 3, KID to 5.
    rounded = render_model_card(pipe, "tester/evaluated", eval_results={"fid": 3.14159, "kid": 0.0012345}).data
    assert [(r.metric_type, r.metric_value) for r in rounded.eval_results] == [("fid", 3.142), ("kid", 0.00123)]


def test_the_card_shows_the_release_pictures_and_a_given_evaluation_section():
    pipe = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    training = {"global_step": 5, "learning_rate": 1e-3, "use_ema": True}
    card = render_model_card(
        pipe,
        "tester/released",
        pictures={"grid": "samples/grid.png", "denoising": "samples/denoising.png", "loss": "samples/loss.png"},
        training=training,
        eval_results={"fid": 3.1},
        evaluation="| scheduler | FID |\n| --- | --- |\n| DDIM, 50 steps | 3.1 |",
    ).text
    for image in ("samples/grid.png", "samples/denoising.png", "samples/loss.png"):
        assert f"]({image})" in card
    assert "| DDIM, 50 steps | 3.1 |" in card and "| FID | 3.1 |" not in card
    with pytest.raises(ValueError, match="unknown pictures samples; the card knows grid, denoising, loss"):
        render_model_card(pipe, "tester/released", pictures={"samples": "samples/grid.png"})


def test_a_class_conditional_card_asks_for_digits_with_the_recommended_guidance_and_keeps_hub_metadata():
    pipe = DDPMMnistPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler())
    card = render_model_card(
        pipe,
        "tester/digits",
        pictures={
            "grid": "samples/grid.png",
            "guidance": "samples/guidance.png",
            "completion": "samples/completion.png",
        },
        recommended_scheduler=("unipc", 20),
        recommended_guidance_scale=2.5,
        eval_results={"fid": 3.1, "class_accuracy": 0.993},
        evaluation="| scheduler | FID |",
    )
    metadata = yaml.safe_load(card.content.split("---\n")[1])
    # The Hub has no class-conditional task: the unconditional one stays, and tags say what the model is.
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "unconditional-image-generation"
    assert {"class-conditional", "classifier-free-guidance"} <= set(metadata["tags"])
    assert "unconditional-image-generation" not in metadata["tags"]
    (result,) = metadata["model-index"][0]["results"]
    assert result["task"] == {"type": "unconditional-image-generation", "name": "Class-conditional image generation"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"fid": 3.1, "class_accuracy": 0.993}
    text = card.text
    # Both ways to load it draw one of each digit with the recommended scheduler, steps and guidance.
    call = "    class_labels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],\n    guidance_scale=2.5,\n    num_inference_steps=20,\n"
    assert text.count(call) == 2
    assert text.count("pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)") == 2
    assert 'DiffusionPipeline.from_pretrained("tester/digits", trust_remote_code=True)' in text
    assert "inpaint = DDPMMnistInpaintPipeline(**pipe.components)" in text and "t=250," in text  # T = 1000
    assert "](samples/completion.png)" in text and "](samples/guidance.png)" in text
    assert "interpolation.png" not in text and "without any conditioning" not in text


def test_a_conditional_card_without_a_recommendation_draws_without_guidance_and_an_unconditional_one_takes_no_labels():
    conditional = DDPMMnistPipeline(tiny_unet(num_class_embeds=10), DDPMMnistScheduler(num_train_timesteps=40))
    text = render_model_card(conditional, "tester/digits").text
    assert "guidance_scale=2" not in text and "at guidance scale" not in text and ", without guidance" in text
    assert "num_inference_steps=40," in text and "UniPC" not in text and "t=10," in text  # T / 4
    unconditional = DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler())
    card = render_model_card(unconditional, "tester/any", training={"pretrained_model_name_or_path": "tester/base"})
    assert "class_labels" not in card.text and "class-conditional" not in card.data.tags
    assert "| started from | `tester/base` (its U-Net weights) |" in card.text
    assert "started from" not in render_model_card(unconditional, "tester/any", training={"global_step": 1}).text


def test_push_to_hub_without_a_usable_token_fails_before_training(hub, mnist_folder, tmp_path):
    cases = {
        "no-token": (None, "tester/x", "--push_to_hub needs a Hub token that can write to tester/x: no token found"),
        "invalid-token": ("hf_no_such_token", "tester/x", f"{hub.endpoint} refused the token (HTTP 401)"),
        "read-only": ("hf_standin_read_token", "reader/x", "the token of reader is read-only"),
    }  # a malformed --hub_model_id fails the same way, in test_train.py's test_bad_arguments_fail_before_training
    seen_before = len(hub.requests)
    processes = {}
    for name, (token, repo_id, _) in cases.items():
        env = client_env(hub, tmp_path / "hf", token)
        processes[name] = start_training(mnist_folder, tmp_path / name, env, *PUSH_RUN, f"--hub_model_id={repo_id}")
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        error = stderr.strip().splitlines()[-1]
        assert process.returncode == 2 and error.startswith("train.py: error: ") and cases[name][2] in error, stderr
        assert not (tmp_path / name).exists(), f"{name}: training started"
        assert cases[name][0] is None or cases[name][0] not in stderr, f"{name}: the token was printed"
    # The only question asked of the Hub was whose the token is.
    assert {path for _, path, _ in hub.requests[seen_before:]} == {"/api/whoami-v2"}


@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("DDPM_MNIST_REAL_HUB_ENDPOINT")),
    reason="pushes to a real Hub only with HF_TOKEN and DDPM_MNIST_REAL_HUB_ENDPOINT set",
)
def test_round_trip_on_a_real_hub(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": os.environ["DDPM_MNIST_REAL_HUB_ENDPOINT"], "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)}  # fmt: skip
    name = f"ddpm-mnist-test-{uuid.uuid4().hex[:8]}"
    push = f"""
from ddpm_mnist import DDPMMnistPipeline, DDPMMnistScheduler
from ddpm_mnist.hub import check_push_access
from tests.utils import tiny_unet
repo_id = check_push_access({name!r})
print(repo_id)
DDPMMnistPipeline(tiny_unet(), DDPMMnistScheduler(num_train_timesteps=10)).push_to_hub(repo_id, private=True)
pipe = DDPMMnistPipeline.from_pretrained(repo_id)
"""
    repo_id = python(SAMPLE + push + 'np.save("package.npy", sample(pipe))', env, tmp_path).split()[0]
    try:
        remote = f"""
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({repo_id!r}, trust_remote_code=True)
"""
        python(WITHOUT_PACKAGE + SAMPLE + remote + 'np.save("remote.npy", sample(pipe))', env, tmp_path)
        np.testing.assert_array_equal(np.load(tmp_path / "remote.npy"), np.load(tmp_path / "package.npy"))
    finally:
        python(f"from huggingface_hub import delete_repo\ndelete_repo({repo_id!r})\n", env, tmp_path)
