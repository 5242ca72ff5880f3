"""Tests for the DDPM U-Net (`ddpm_mnist.unet_ddpm_mnist`)."""

import ast
import sys
from pathlib import Path

import pytest
import torch

from ddpm_mnist.unet_ddpm_mnist import PRESETS, DDPMMnistUNet, DDPMMnistUNetOutput
from tests.utils import randomize_zero_init

UNET_FILE = Path(__file__).resolve().parents[1] / "ddpm_mnist" / "unet_ddpm_mnist.py"


def _model(preset: str = "tiny", **overrides) -> DDPMMnistUNet:
    torch.manual_seed(0)
    return randomize_zero_init(DDPMMnistUNet.from_preset(preset, **overrides)).eval()


@pytest.fixture(scope="module")
def tiny() -> DDPMMnistUNet:
    return _model("tiny")


@pytest.fixture(scope="module")
def small() -> DDPMMnistUNet:
    return _model("mnist-small")


def _x(batch: int = 3, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


# --- architecture -----------------------------------------------------------------------------


def test_cifar10_preset_matches_paper_parameter_count():
    model = DDPMMnistUNet.from_preset("cifar10")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) <= 0.05e6  # "35.7 million parameters" (Ho et al. 2020, appendix B)
    assert n == 35_746_307  # exact count of the original diffusion_tf model


@pytest.mark.parametrize(("preset", "n_params"), [("mnist", 8_949_761), ("mnist-small", 1_623_169), ("tiny", 176_849)])
def test_preset_parameter_counts(preset, n_params):
    assert sum(p.numel() for p in DDPMMnistUNet.from_preset(preset).parameters()) == n_params


def test_fresh_model_predicts_zero_like_paper_init():
    model = DDPMMnistUNet.from_preset("tiny").eval()
    with torch.no_grad():
        out = model(_x(), 5).sample
    assert torch.count_nonzero(out) == 0


def test_mnist_preset_forward_shape():
    model = _model("mnist")
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32), torch.tensor([3, 999])).sample
    assert out.shape == (2, 1, 32, 32)
    assert torch.isfinite(out).all()


# --- timestep handling ------------------------------------------------------------------------

TIMESTEP_FORMS = {
    "int": lambda b: 7,
    "float": lambda b: 7.0,
    "0d": lambda b: torch.tensor(7),
    "1": lambda b: torch.tensor([7]),
    "B": lambda b: torch.full((b,), 7),
}


@pytest.mark.parametrize("preset", ["tiny", "mnist-small"])
@pytest.mark.parametrize("form", list(TIMESTEP_FORMS))
def test_timestep_forms_shape_and_equal_to_int(preset, form, tiny, small):
    model = tiny if preset == "tiny" else small
    x = _x(batch=2)
    with torch.no_grad():
        ref = model(x, 7).sample
        out = model(x, TIMESTEP_FORMS[form](2)).sample
    assert out.shape == (2, 1, 28, 28)
    assert torch.equal(out, ref)


def test_timestep_changes_output(tiny):
    x = _x(batch=1)
    with torch.no_grad():
        a, b, c = (tiny(x, t).sample for t in (0, 1, 500))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)


def test_per_sample_timesteps_are_used(tiny):
    x = _x(batch=1).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = tiny(x, torch.tensor([10, 900])).sample
    assert not torch.allclose(out[0], out[1])


# --- determinism, batching, output types ------------------------------------------------------


def test_eval_mode_is_deterministic(small):
    x = _x()
    with torch.no_grad():
        assert torch.equal(small(x, 42).sample, small(x, 42).sample)


def test_dropout_active_in_train_mode():
    model = _model("mnist-small").train()
    x = _x()
    with torch.no_grad():
        assert not torch.equal(model(x, 42).sample, model(x, 42).sample)


@pytest.mark.parametrize("preset", ["tiny", "mnist-small"])
def test_batch_independence(preset, tiny, small):
    model = tiny if preset == "tiny" else small
    x = _x(batch=4)
    t = torch.tensor([1, 250, 600, 999])
    with torch.no_grad():
        batched = model(x, t).sample
        for i in range(4):
            single = model(x[i : i + 1], t[i : i + 1]).sample
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)


def test_return_dict_false_gives_tuple(tiny):
    x = _x()
    with torch.no_grad():
        out = tiny(x, 3, return_dict=False)
        ref = tiny(x, 3)
    assert isinstance(out, tuple) and len(out) == 1
    assert isinstance(ref, DDPMMnistUNetOutput)
    assert torch.equal(out[0], ref.sample)


def test_channels_last_input(tiny):
    x = _x()
    with torch.no_grad():
        ref = tiny(x, 3).sample
        out = tiny(x.to(memory_format=torch.channels_last), 3).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_forward():
    model = _model("tiny").to(torch.bfloat16)
    with torch.no_grad():
        out = model(_x().to(torch.bfloat16), 999).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- serialization, presets -------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    loaded = DDPMMnistUNet.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.channel_mult) == tuple(tiny.config.channel_mult)
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x, 123).sample, tiny(x, 123).sample)


def test_from_preset_with_overrides():
    model = DDPMMnistUNet.from_preset("mnist-small", dropout=0.0, base_channels=64)
    assert model.config.dropout == 0.0
    assert model.config.base_channels == 64
    assert tuple(model.config.channel_mult) == PRESETS["mnist-small"]["channel_mult"]
    assert model.conv_in.out_channels == 64


def test_preset_names():
    assert set(DDPMMnistUNet.preset_names()) == {"cifar10", "mnist", "mnist-small", "tiny"}
    assert set(PRESETS) == set(DDPMMnistUNet.preset_names())


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown preset 'nope'.*cifar10.*mnist-small.*tiny"):
        DDPMMnistUNet.from_preset("nope")


def test_file_imports_only_torch_diffusers_stdlib():
    tree = ast.parse(UNET_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break trust_remote_code loading"
            roots.add(node.module.split(".")[0])
    assert roots - {"torch", "diffusers"} <= set(sys.stdlib_module_names)


# --- gradients --------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = DDPMMnistUNet.from_preset("tiny").train()
    x, t = _x(batch=8), torch.randint(0, 1000, (8,))
    model(x, t).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    # With the zero-initialised weights perturbed, every parameter gets a nonzero gradient.
    model.zero_grad(set_to_none=True)
    randomize_zero_init(model)
    model(x, t).sample.square().mean().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(sample_size=30), r"sample_size=30 is not divisible by 2\*\*\(len\(channel_mult\)-1\)=4"),
        (dict(base_channels=24), r"channel count 24 .* not divisible by norm_num_groups=32"),
        (dict(norm_num_groups=48), r"not divisible by norm_num_groups=48"),
        (dict(attention_resolutions=(16,)), r"attention_resolutions \[16\] .*pick from \[28, 14, 7\]"),
        (dict(channel_mult=()), r"channel_mult=\(\) must be a non-empty"),
        (dict(layers_per_block=0), r"must all be positive integers"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        DDPMMnistUNet.from_preset("mnist-small", **overrides)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 3, 28, 28), r"Expected sample of shape \(B, 1, 28, 28\).*got \(2, 3, 28, 28\)"),
        ((2, 1, 32, 32), r"Expected sample of shape \(B, 1, 28, 28\).*got \(2, 1, 32, 32\)"),
        ((1, 28, 28), r"Expected sample of shape \(B, 1, 28, 28\).*got \(1, 28, 28\)"),
    ],
)
def test_bad_sample_raises(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.zeros(shape), 1)


@pytest.mark.parametrize("timestep", [torch.tensor([1, 2, 3]), torch.zeros(2, 1)])
def test_bad_timestep_shape_raises(tiny, timestep):
    with pytest.raises(ValueError, match=r"timestep must be a scalar.*\(B,\)=\(2,\)"):
        tiny(_x(batch=2), timestep)


def test_every_group_norm_sees_a_contiguous_activation():
    """The attention output is a channels_last view; the residual add must not pass that layout on (CPU GroupNorm
    is several times slower on channels_last activations, 15x in bf16: benchmarks/README.md)."""
    model = DDPMMnistUNet.from_preset("tiny")
    layouts = []
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    model(torch.randn(2, 1, 28, 28), torch.tensor([1, 500]))
    assert len(layouts) == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) and all(layouts)
