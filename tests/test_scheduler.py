"""Tests for `ddpm_mnist.scheduling_ddpm_mnist`, mostly against `diffusers.DDPMScheduler` (same config)."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ddpm_mnist.scheduling_ddpm_mnist import DDPMMnistScheduler, DDPMMnistSchedulerOutput

TOL = {"atol": 1e-6, "rtol": 1e-6}
SHAPE = (2, 1, 3, 3)


def _pair(**config) -> tuple[DDPMMnistScheduler, DDPMScheduler]:
    return DDPMMnistScheduler(**config), DDPMScheduler(**config)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------------------------------------
# Precomputed tables


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_tables_match_diffusers_and_closed_forms(beta_schedule):
    ours, ref = _pair(beta_schedule=beta_schedule)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == torch.float32
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-6, rtol=0)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)  # bit-identical: step relies on it

    # Closed forms of eq. 4 and 7 in float64 on diffusers' alpha_bar, with beta_t = 1 - abar_t / abar_{t-1}.
    abar = ref.alphas_cumprod.double()
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1 - abar / abar_prev
    var = beta * (1 - abar_prev) / (1 - abar)
    expected = {
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "posterior_variance": var,
        "posterior_log_variance_clipped": torch.cat([var[1:2], var[1:]]).log(),
        "posterior_mean_coef1": abar_prev.sqrt() * beta / (1 - abar),
        "posterior_mean_coef2": (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar),
    }
    for name, value in expected.items():
        table = getattr(ours, name)
        assert table.dtype == torch.float32 and table.shape == (1000,), name
        torch.testing.assert_close(table.double(), value, **TOL, msg=name)

    # ... which is eq. 7 with the nominal betas to 1e-6.
    nominal = ours.betas.double() * (1 - abar_prev) / (1 - abar)
    torch.testing.assert_close(ours.posterior_variance.double(), nominal, atol=1e-6, rtol=0)
    assert ours.posterior_variance[0] == 0
    assert ours.posterior_mean_coef1[0] == 1 and ours.posterior_mean_coef2[0] == 0

    # Posterior variance equals what diffusers' step uses (its "fixed_small" variance).
    diffusers_var = torch.stack([ref._get_variance(t) for t in range(1, 1000)])
    torch.testing.assert_close(ours.posterior_variance[1:], diffusers_var, atol=1e-6, rtol=0)


def test_paper_linear_schedule_values():
    s = DDPMMnistScheduler()
    torch.testing.assert_close(s.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    torch.testing.assert_close(s.alphas_cumprod[-1], torch.tensor(4.0358e-5), rtol=1e-3, atol=0)
    assert s.init_noise_sigma == 1.0 and s.order == 1 and len(s) == 1000
    assert torch.equal(s.timesteps, torch.arange(999, -1, -1))
    assert s.num_inference_steps is None and s.custom_timesteps is False


def test_trained_betas():
    linear = DDPMMnistScheduler()
    s = DDPMMnistScheduler(trained_betas=linear.betas.clone())
    assert torch.equal(s.alphas_cumprod, linear.alphas_cumprod)
    assert isinstance(s.config.trained_betas, list)  # tensor argument kept JSON-serialisable
    with pytest.raises(ValueError, match="trained_betas has 10 values"):
        DDPMMnistScheduler(trained_betas=[1e-3] * 10)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DDPMMnistScheduler(num_train_timesteps=2, trained_betas=[0.5, 1.0])


# ----------------------------------------------------------------------------------------------------------
# Forward process


def test_add_noise_and_velocity_match_diffusers_for_every_timestep():
    ours, ref = _pair()
    x0, noise = _randn(1000, 1, 3, 3, seed=1), _randn(1000, 1, 3, 3, seed=2)
    t = torch.arange(1000)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **TOL)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), **TOL)
    # eq. 4 by hand.
    abar = ours.alphas_cumprod.view(-1, 1, 1, 1)
    by_hand = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(ours.add_noise(x0, noise, t), by_hand, **TOL)


def test_add_noise_scalar_timestep_and_dtype():
    ours, ref = _pair()
    x0, noise = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    for t in (0, 500, torch.tensor(999)):
        expected = ref.add_noise(x0, noise, torch.as_tensor(t).reshape(1))
        torch.testing.assert_close(ours.add_noise(x0, noise, t), expected, **TOL)
    out = ours.add_noise(x0.double(), noise.double(), torch.tensor([3, 7]))
    assert out.dtype == torch.float64
    assert ours.add_noise(x0.bfloat16(), noise.bfloat16(), 3).dtype == torch.bfloat16


def test_predict_x0_from_eps_inverts_add_noise():
    s = DDPMMnistScheduler()
    x0, eps = _randn(*SHAPE, seed=1).double(), _randn(*SHAPE, seed=2).double()
    t = torch.tensor([10, 900])
    torch.testing.assert_close(s.predict_x0_from_eps(s.add_noise(x0, eps, t), eps, t), x0, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Inference schedules


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_matches_diffusers_for_every_n(spacing):
    ours, ref = _pair(timestep_spacing=spacing)
    for n in range(1, 1001):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == n
        assert ours.custom_timesteps is False
        # diffusers' "trailing" sometimes appends a bogus -1 (n + 1 steps); ours keeps exactly n.
        if spacing == "trailing" and len(ref.timesteps) == n + 1:
            assert ref.timesteps[-1] == -1
        assert torch.equal(ours.timesteps, ref.timesteps[:n]), n


def test_set_timesteps_steps_offset_and_previous_timestep():
    ours, ref = _pair(steps_offset=1)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps[0] == 981
    for t in ours.timesteps.tolist():
        prev = ours.previous_timestep(t)
        assert isinstance(prev, int) and prev == int(ref.previous_timestep(t))
    batch = ours.previous_timestep(ours.timesteps)
    assert torch.equal(batch, torch.cat([ours.timesteps[1:], torch.tensor([-1])]))
    full = DDPMMnistScheduler()
    assert full.previous_timestep(0) == -1 and full.previous_timestep(500) == 499


def test_custom_timesteps_match_diffusers():
    ours, ref = _pair()
    custom = [999, 800, 500, 123, 7, 0]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.custom_timesteps is True
    for t in custom:
        assert ours.previous_timestep(t) == int(ref.previous_timestep(t))
    ours.set_timesteps(timesteps=torch.tensor(custom))
    assert ours.timesteps.tolist() == custom


def test_set_timesteps_device_and_reset():
    s = DDPMMnistScheduler()
    s.set_timesteps(10, device="cpu")
    assert s.timesteps.device.type == "cpu"
    s.set_timesteps(1000)
    assert torch.equal(s.timesteps, torch.arange(999, -1, -1))
    s.set_timesteps(torch.tensor(25))  # any integer type, e.g. a 0-d tensor
    assert s.num_inference_steps == 25 and s.timesteps[0] == 960


# ----------------------------------------------------------------------------------------------------------
# Reverse step vs diffusers


def _compare_chain(ours, ref, timesteps, seed: int = 0):
    """Step both schedulers at every timestep from the same (x_t, model output, generator seed)."""
    x, out = _randn(*SHAPE, seed=seed) * 2, _randn(*SHAPE, seed=seed + 1)
    got, want = [], []
    for t in timesteps.tolist():
        a = ours.step(out, t, x, generator=torch.Generator().manual_seed(t))
        b = ref.step(out, t, x, generator=torch.Generator().manual_seed(t))
        assert isinstance(a, DDPMMnistSchedulerOutput)
        got.append(torch.stack([a.prev_sample, a.pred_original_sample]))
        want.append(torch.stack([b.prev_sample, b.pred_original_sample]))
    torch.testing.assert_close(torch.stack(got), torch.stack(want), **TOL)


SCHEDULES = [(None, "leading")] + [(n, sp) for n in (50, 7) for sp in ("leading", "trailing", "linspace")]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize(("num_steps", "spacing"), SCHEDULES)
def test_step_matches_diffusers(prediction_type, variance_type, num_steps, spacing):
    # clip_sample=False so that the 1 / sqrt(alpha_bar) amplification of x_0 errors is visible.
    config = dict(
        prediction_type=prediction_type,
        variance_type=variance_type,
        timestep_spacing=spacing,
        clip_sample=False,
    )
    ours, ref = _pair(**config)
    if num_steps is not None:
        ours.set_timesteps(num_steps)
        ref.set_timesteps(num_steps)
    _compare_chain(ours, ref, ours.timesteps)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_step_matches_diffusers_with_clipping(variance_type):
    ours, ref = _pair(variance_type=variance_type)
    _compare_chain(ours, ref, ours.timesteps)
    ours, ref = _pair(variance_type=variance_type, clip_sample_range=0.5)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    _compare_chain(ours, ref, ours.timesteps)


def test_step_custom_timesteps_match_diffusers():
    ours, ref = _pair(clip_sample=False)
    custom = [999, 700, 300, 40, 3, 0]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    _compare_chain(ours, ref, ours.timesteps)


def test_step_tuple_dtype_and_no_noise_at_t0():
    s = DDPMMnistScheduler()
    x, out = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2)
    prev, x0 = s.step(out, 5, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    res = s.step(out, 5, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prev, res.prev_sample) and torch.equal(x0, res.pred_original_sample)
    # t = 0: the mean only, whatever the generator.
    a = s.step(out, 0, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = s.step(out, 0, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(a, b)
    assert s.step(out.double(), 5, x.double()).prev_sample.dtype == torch.float64
    assert s.step(out.bfloat16(), 5, x.bfloat16()).prev_sample.dtype == torch.bfloat16
    assert torch.equal(s.scale_model_input(x, 3), x)


# ----------------------------------------------------------------------------------------------------------
# Per-sample timesteps and per-sample generators


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("num_steps", [None, 50])
def test_batched_timesteps_equal_per_sample_steps(prediction_type, variance_type, num_steps):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=False)
    ours, ref = _pair(**config)
    if num_steps is not None:
        ours.set_timesteps(num_steps)
        ref.set_timesteps(num_steps)
    ts = ours.timesteps[[0, 1, 17, -2, -1, 25]]  # includes the last step (t = 0: no noise)
    x, out = _randn(6, 1, 3, 3, seed=3), _randn(6, 1, 3, 3, seed=4)
    seeds = list(range(10, 16))
    batched = ours.step(out, ts, x, generator=_gens(seeds))
    for i, (t, seed) in enumerate(zip(ts.tolist(), seeds, strict=True)):
        for sched in (ours, ref):
            gen = torch.Generator().manual_seed(seed)
            single = sched.step(out[i : i + 1], t, x[i : i + 1], generator=gen)
            torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample, **TOL)
            torch.testing.assert_close(batched.pred_original_sample[i], single.pred_original_sample[0], **TOL)


def test_batched_timesteps_deterministic_part_and_shapes():
    s = DDPMMnistScheduler(variance_type="fixed_large")
    x, out = _randn(4, 1, 3, 3, seed=5), _randn(4, 1, 3, 3, seed=6)
    ts = torch.tensor([999, 0, 500, 1])
    batched = s.step(out, ts, x, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ts.tolist()):
        single = s.step(out[i : i + 1], t, x[i : i + 1], generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(batched.pred_original_sample[i], single.pred_original_sample[0], **TOL)
    torch.testing.assert_close(batched.prev_sample[1], s.step(out[1:2], 0, x[1:2]).prev_sample[0], **TOL)
    with pytest.raises(ValueError, match="one value per sample"):
        s.step(out, torch.tensor([1, 2]), x)


def test_generator_list_matches_diffusers_and_single_generators():
    ours, ref = _pair()
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    x, out = _randn(3, 1, 3, 3, seed=7), _randn(3, 1, 3, 3, seed=8)
    t = int(ours.timesteps[10])
    got = ours.step(out, t, x, generator=_gens([1, 2, 3])).prev_sample
    torch.testing.assert_close(got, ref.step(out, t, x, generator=_gens([1, 2, 3])).prev_sample, **TOL)
    for i, seed in enumerate([1, 2, 3]):
        single = ours.step(out[i : i + 1], t, x[i : i + 1], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got[i : i + 1], single.prev_sample, **TOL)
    # Different generators give different noise.
    assert not torch.allclose(got[0], got[1])


# ----------------------------------------------------------------------------------------------------------
# diffusers interoperability


@pytest.mark.parametrize(
    "cls",
    [
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        DDPMScheduler,
    ],
)
def test_compatible_schedulers_share_alphas_cumprod(cls):
    ours = DDPMMnistScheduler()
    other = cls.from_config(ours.config)
    torch.testing.assert_close(other.alphas_cumprod, ours.alphas_cumprod, atol=1e-6, rtol=0)
    assert cls in ours.compatibles


def test_from_diffusers_config():
    ours = DDPMMnistScheduler.from_config(DDPMScheduler(beta_end=0.03).config)
    assert ours.config.beta_end == 0.03
    assert torch.equal(ours.alphas_cumprod, DDPMScheduler(beta_end=0.03).alphas_cumprod)


def test_save_load_round_trip(tmp_path):
    config = dict(
        num_train_timesteps=200,
        beta_end=0.03,
        variance_type="fixed_large",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
        steps_offset=1,
    )
    s = DDPMMnistScheduler(**config)
    s.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = DDPMMnistScheduler.from_pretrained(tmp_path)
    public = {k: v for k, v in s.config.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == public
    for key, value in config.items():
        assert loaded.config[key] == value
    assert torch.equal(loaded.posterior_mean_coef1, s.posterior_mean_coef1)
    # diffusers' own DDPMScheduler reads the same file.
    assert torch.equal(DDPMScheduler.from_pretrained(tmp_path).alphas_cumprod, s.alphas_cumprod)


# ----------------------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("beta_schedule", "cosine"),
        ("variance_type", "learned"),
        ("variance_type", "learned_range"),
        ("variance_type", "fixed_small_log"),
        ("prediction_type", "eps"),
        ("timestep_spacing", "uniform"),
    ],
)
def test_unknown_config_strings_raise(key, value):
    with pytest.raises(ValueError, match=rf"Unknown {key} '{value}'; expected one of: .+"):
        DDPMMnistScheduler(**{key: value})


@pytest.mark.parametrize("n", [0, -3, 1001, 2.5, True])
def test_bad_num_inference_steps_raise(n):
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\]"):
        DDPMMnistScheduler().set_timesteps(n)


@pytest.mark.parametrize(
    ("timesteps", "match"),
    [
        ([0, 10, 20], "strictly descending"),
        ([20, 20, 10], "strictly descending"),
        ([1000, 500, 0], r"must lie in \[0, 1000\)"),
        ([500, 10, -1], r"must lie in \[0, 1000\)"),
        ([], "non-empty"),
        ([5.0, 2.0], "integers"),
    ],
)
def test_bad_custom_timesteps_raise(timesteps, match):
    with pytest.raises(ValueError, match=match):
        DDPMMnistScheduler().set_timesteps(timesteps=timesteps)


def test_other_bad_inputs_raise():
    s = DDPMMnistScheduler()
    with pytest.raises(ValueError, match="not both"):
        s.set_timesteps(10, timesteps=[5, 0])
    with pytest.raises(ValueError, match="Pass num_inference_steps or timesteps"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="outside"):
        DDPMMnistScheduler(steps_offset=1).set_timesteps(1000)
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 2"):
        DDPMMnistScheduler(num_train_timesteps=1)
    x = torch.zeros(*SHAPE)
    with pytest.raises(ValueError, match=r"\[1000\] are not in \[0, 1000\)"):
        s.step(x, 1000, x)
    s.set_timesteps(50)
    with pytest.raises(ValueError, match=r"\[7\] are not in the 50 timesteps"):
        s.step(x, 7, x)
    with pytest.raises(ValueError, match="not in the 50 timesteps"):
        s.previous_timestep(torch.tensor([980, 7]))


def test_posterior_of_a_respaced_chain_is_eq_7_with_the_one_step_beta():
    s = DDPMMnistScheduler()
    abar = s.alphas_cumprod.double()
    x_0, x_t = _randn(*SHAPE, seed=9), _randn(*SHAPE, seed=10)
    # The full chain: t -> t - 1, the paper's tables.
    mean, variance = s.q_posterior_mean_variance(x_0.double(), x_t.double(), 500)
    expected = s.posterior_mean_coef1[500].double() * x_0.double() + s.posterior_mean_coef2[500].double() * x_t.double()
    torch.testing.assert_close(mean, expected, **TOL)
    torch.testing.assert_close(variance.flatten(), s.posterior_variance[500:501].double(), **TOL)
    # Respaced: t -> t' = the next inference timestep, in float64 from alpha_bar by hand.
    s.set_timesteps(timesteps=[999, 700, 300, 0])
    t, t_prev = torch.tensor([700, 300, 0]), torch.tensor([300, 0, -1])
    abar_t, abar_p = abar[t], torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones(3, dtype=torch.float64))
    beta = 1 - abar_t / abar_p
    x_0, x_t = _randn(3, 1, 2, 2, seed=11).double(), _randn(3, 1, 2, 2, seed=12).double()
    mean, variance = s.q_posterior_mean_variance(x_0, x_t, t)
    coef1 = (abar_p.sqrt() * beta / (1 - abar_t)).view(3, 1, 1, 1)
    coef2 = ((1 - beta).sqrt() * (1 - abar_p) / (1 - abar_t)).view(3, 1, 1, 1)
    torch.testing.assert_close(mean, coef1 * x_0 + coef2 * x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(variance.flatten(), beta * (1 - abar_p) / (1 - abar_t), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not in the 4 timesteps set by set_timesteps"):
        s.q_posterior_mean_variance(x_0, x_t, 500)
