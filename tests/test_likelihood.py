"""Tests for the variational bound (`ddpm_mnist.metrics.likelihood`) against closed forms computed here by hand."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from numpy.polynomial.hermite_e import hermegauss
from torch.distributions import Normal, kl_divergence

from ddpm_mnist import DDPMMnistScheduler
from ddpm_mnist.data import ImagePreprocessor, load_image_stream
from ddpm_mnist.metrics.likelihood import discretized_gaussian_log_likelihood, gaussian_kl, variational_bound
from tests.utils import OracleUNet, tiny_unet

H = 1 / 255  # half a bin of 8-bit data in [-1, 1]
T = 20


def schedule(**kwargs) -> DDPMMnistScheduler:
    """A short schedule that still ends near N(0, I): T = 20, beta from 1e-4 to 0.2."""
    return DDPMMnistScheduler(num_train_timesteps=T, beta_end=0.2, **kwargs)


def hand_schedule(scheduler: DDPMMnistScheduler) -> SimpleNamespace:
    """Eq. 4 and 7 in float64 from the schedule's definition: its (float32) alpha_bar_t and betas, t = 0..T-1.

    As in the scheduler (and diffusers), the one-step beta of the posterior is 1 - alpha_bar_t / alpha_bar_{t-1}.
    """
    alpha_bar = scheduler.alphas_cumprod.double()
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta = 1 - alpha_bar / alpha_bar_prev
    return SimpleNamespace(
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        beta=beta,
        beta_tilde=(1 - alpha_bar_prev) / (1 - alpha_bar) * beta,
        sigma_large=scheduler.betas.double(),  # sigma_t^2 of "fixed_large"
    )


def random_digits(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """n random 8-bit images in [-1, 1] with some pixels at both edge values; padded with -1 up to `size`."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, 1, 28, 28), generator=gen)
    levels[:, :, 0, :4] = torch.tensor([0, 255, 0, 255])
    border = (size - 28) // 2
    return torch.nn.functional.pad(levels / 127.5 - 1, (border,) * 4, value=-1.0)


def bin_log_mass(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(x's 8-bit bin) under N(mean, std^2) from plain CDFs, edge bins open-ended."""
    normal = Normal(mean, std)
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + H))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - H))
    return (upper - lower).log()


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 1000, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [1], [3], [3]])
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(gaussian_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)
    assert gaussian_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_discretized_log_likelihood_matches_normal_cdf():
    gen = torch.Generator().manual_seed(1)
    x = random_digits(4).double().flatten()
    std = 10 ** (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 2.2)  # 0.006 .. 0.6
    mean = x + 3 * std * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    expected = bin_log_mass(x, mean, std)
    ok = expected > -20  # beyond that plain CDF differences lose digits
    assert ok.float().mean() > 0.9
    actual = discretized_gaussian_log_likelihood(x, mean, 2 * std.log())
    torch.testing.assert_close(actual[ok], expected[ok], rtol=1e-7, atol=1e-9)
    assert torch.isfinite(actual).all() and (actual <= 0).all()


@pytest.mark.parametrize(("mean", "std"), [(0.0, 0.01), (0.3, 0.2), (-1.0, 0.004), (3.0, 0.5), (-0.7, 40.0)])
def test_discretized_likelihood_is_a_distribution_over_the_256_values(mean, std):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(
        x, torch.tensor(mean, dtype=torch.float64), torch.tensor(2 * math.log(std))
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_discretized_likelihood_is_accurate_far_in_the_tails():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    x = torch.tensor([0.0, 0.0, -0.5], dtype=torch.float64)
    mean = torch.tensor([0.6, -0.6, -0.2], dtype=torch.float64)  # 60 std from the bin: CDF differences underflow
    std = torch.tensor(0.01, dtype=torch.float64)
    actual = discretized_gaussian_log_likelihood(x, mean, 2 * std.log())
    for value, xi, mi in zip(actual.tolist(), x.tolist(), mean.tolist(), strict=True):
        upper, lower = (xi + H - mi) / 0.01, (xi - H - mi) / 0.01
        if lower > 0:  # 1 - 1e-780 needs no 780 digits from the upper tail's side
            upper, lower = -lower, -upper
        mass = mpmath.ncdf(upper) - mpmath.ncdf(lower)
        assert value == pytest.approx(float(mpmath.log(mass)), rel=1e-9)
    assert torch.isinf(bin_log_mass(x, mean, std)).any(), "the plain formula underflows here"


@pytest.mark.parametrize("sample_size", [28, 32])
def test_oracle_on_one_image_has_zero_diffusion_terms_and_the_bound_is_prior_plus_decoder(sample_size):
    scheduler, hand = schedule(), hand_schedule(schedule())
    x_0 = random_digits(1, sample_size)
    unet = OracleUNet(sample_size=sample_size).set_target(x_0, scheduler.alphas_cumprod).eval()
    bound = variational_bound(unet, scheduler, x_0, generator=torch.Generator().manual_seed(0), progress=False)

    assert bound.exact and bound.terms_bpd.shape == (1, T - 1)
    assert bound.terms_bpd.abs().max() < 1e-8
    bits = 784 * math.log(2)
    x = x_0.double()
    # L_T over every pixel of the model input (padding included), per digit dimension.
    abar = hand.alpha_bar[-1]
    prior = 0.5 * (abar * x**2 + (1 - abar) - 1 - torch.log(1 - abar)).sum() / bits
    # L_0 over the digit's pixels: mean = x_0 exactly, sigma_1^2 = beta_tilde of the paper's t = 2.
    border = (sample_size - 28) // 2
    digit = x[..., border : border + 28, border : border + 28]
    decoder = -bin_log_mass(digit, digit, hand.beta_tilde[1].sqrt()).sum() / bits
    assert bound.prior_bpd.item() == pytest.approx(prior.item(), rel=1e-5)
    assert bound.decoder_bpd.item() == pytest.approx(decoder.item(), rel=1e-5)
    assert bound.total_bpd.item() == pytest.approx((prior + decoder).item(), rel=1e-5)


def test_oracle_with_fixed_large_pays_exactly_the_variance_mismatch():
    scheduler = schedule(variance_type="fixed_large")
    hand = hand_schedule(scheduler)
    x_0 = random_digits(2)
    unet = OracleUNet().set_target(x_0[:1], scheduler.alphas_cumprod).eval()
    bound = variational_bound(unet, scheduler, x_0[:1], progress=False)
    # Means agree; KL(N(m, beta_tilde) || N(m, beta)) per pixel, for the paper's t = 2..T.
    beta, beta_tilde = hand.sigma_large[1:], hand.beta_tilde[1:]
    expected = 0.5 * (torch.log(beta / beta_tilde) + beta_tilde / beta - 1) / math.log(2)
    torch.testing.assert_close(bound.terms_bpd[0], expected, rtol=1e-4, atol=1e-9)
    # The decoder uses sigma_1^2 = beta_1 here.
    digit = x_0[:1].double()
    decoder = -bin_log_mass(digit, digit, hand.sigma_large[0].sqrt()).sum() / (784 * math.log(2))
    assert bound.decoder_bpd.item() == pytest.approx(decoder.item(), rel=1e-5)


class LinearDenoiser(ModelMixin, ConfigMixin):
    """eps_theta(x_t, t) = g_t x_t, the exact denoiser for data ~ N(0, data_var I): every p_theta step is linear."""

    @register_to_config
    def __init__(self, alphas_cumprod: list[float], data_var: float, sample_size: int = 28, in_channels: int = 1):
        super().__init__()
        abar = torch.tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("gain", (1 - abar).sqrt() / (abar * data_var + 1 - abar))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        gain = self.gain[torch.as_tensor(timestep).reshape(-1)].reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=(gain * sample.double()).to(sample.dtype))


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    """n 8-bit 28x28 images whose pixels are N(0, 0.25) rounded to the 8-bit grid of [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(n, 1, 28, 28, generator=gen) * 0.5 + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1


def linear_reverse_process(scheduler: DDPMMnistScheduler, model: LinearDenoiser) -> SimpleNamespace:
    """The linear model's p_theta(x_{t-1} | x_t) = N(a_t x_t, sigma_t^2) by hand ("fixed_large", no clipping)."""
    hand = hand_schedule(scheduler)
    abar, abar_prev, beta = hand.alpha_bar, hand.alpha_bar_prev, hand.beta
    coef1 = abar_prev.sqrt() * beta / (1 - abar)  # eq. 7
    coef2 = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
    h = (1 - (1 - abar).sqrt() * model.gain) / abar.sqrt()  # x_0 predicted as h_t x_t (eq. 15 inverted)
    return SimpleNamespace(**vars(hand), coef1=coef1, coef2=coef2, a=coef1 * h + coef2, var=hand.sigma_large)


def linear_model_nll_bpd(scheduler: DDPMMnistScheduler, model: LinearDenoiser, x_0: torch.Tensor) -> torch.Tensor:
    """The exact -log2 p_theta(x_0) / 784 of the linear model: its chain keeps every pixel of x_t ~ N(0, v_t)."""
    p = linear_reverse_process(scheduler, model)
    var = torch.tensor(1.0, dtype=torch.float64)  # x_T ~ N(0, 1)
    for t in range(T - 1, 0, -1):
        var = p.a[t] ** 2 * var + p.var[t]
    std = (p.a[0] ** 2 * var + p.var[0]).sqrt()  # the decoder: mean a_0 x_1, variance sigma_1^2
    return -bin_log_mass(x_0.double(), torch.zeros(()), std).flatten(1).sum(1) / (784 * math.log(2))


def linear_model_expected_bound(scheduler: DDPMMnistScheduler, model: LinearDenoiser, x_0: torch.Tensor):
    """E over x_t ~ q(x_t | x_0) of each term of eq. 5 for the linear model, in bits per dimension, per image."""
    p = linear_reverse_process(scheduler, model)
    x = x_0.double().flatten(1)
    bits = 784 * math.log(2)
    prior = 0.5 * (p.alpha_bar[-1] * x**2 - p.alpha_bar[-1] - torch.log(1 - p.alpha_bar[-1])).sum(1) / bits
    terms = []
    for t in range(1, T):
        # mu_tilde - mu_theta = coef1 x_0 + (coef2 - a) x_t with x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps.
        slope = p.coef2[t] - p.a[t]
        mean_sq = (p.coef1[t] + slope * p.alpha_bar[t].sqrt()) ** 2 * x**2 + slope**2 * (1 - p.alpha_bar[t])
        ratio = p.beta_tilde[t] / p.var[t]
        terms.append((0.5 * (ratio - 1 - ratio.log()) + mean_sq / (2 * p.var[t])).sum(1) / bits)
    # L_0: Gauss-Hermite quadrature over the noise of x_1, of the discretized likelihood tested above.
    nodes, weights = (torch.from_numpy(v) for v in hermegauss(64))
    x_1 = p.alpha_bar[0].sqrt() * x[..., None] + (1 - p.alpha_bar[0]).sqrt() * nodes
    log_mass = discretized_gaussian_log_likelihood(x[..., None], p.a[0] * x_1, p.var[0].log())
    decoder = -(log_mass * weights / math.sqrt(2 * math.pi)).sum(-1).sum(1) / bits
    return SimpleNamespace(prior=prior, terms=torch.stack(terms, 1), decoder=decoder)


def linear_model_and_bound(num_images: int) -> tuple:
    """The linear model on Gaussian data, its bound by `variational_bound`, and the closed forms."""
    scheduler = schedule(variance_type="fixed_large", clip_sample=False)
    x_0 = gaussian_data(num_images, seed=1)  # not seed 0: x_t's noise must be independent of the data
    model = LinearDenoiser(scheduler.alphas_cumprod.tolist(), 0.25).eval()
    bound = variational_bound(model, scheduler, x_0, generator=torch.Generator().manual_seed(0), progress=False)
    return scheduler, model, x_0, bound


def test_bound_of_a_linear_gaussian_model_matches_its_closed_form():
    scheduler, model, x_0, bound = linear_model_and_bound(32)
    expected = linear_model_expected_bound(scheduler, model, x_0)
    torch.testing.assert_close(bound.prior_bpd, expected.prior, rtol=1e-6, atol=0)
    # Each L_{t-1} is a one-sample estimate over x_t: compare means over the images.
    torch.testing.assert_close(bound.terms_bpd.mean(0), expected.terms.mean(0), rtol=0.03, atol=0)
    assert bound.decoder_bpd.mean().item() == pytest.approx(expected.decoder.mean().item(), rel=0.01)


def test_bound_is_above_the_exact_nll_of_a_linear_gaussian_model():
    scheduler, model, x_0, bound = linear_model_and_bound(32)
    nll = linear_model_nll_bpd(scheduler, model, x_0)
    expected = linear_model_expected_bound(scheduler, model, x_0)
    expected_total = expected.prior + expected.terms.sum(1) + expected.decoder
    assert (expected_total > nll).all()
    gap = bound.total_bpd - nll
    assert gap.mean() > 3 * gap.std() / math.sqrt(len(gap)), f"bound below the exact NLL: {gap.mean().item()}"


def test_sampled_timestep_estimate_is_unbiased_and_labelled():
    scheduler, model, x_0, exact = linear_model_and_bound(256)
    gen = torch.Generator().manual_seed(2)
    estimate = variational_bound(model, scheduler, x_0, num_timesteps=3, batch_size=128, generator=gen, progress=False)
    assert not estimate.exact and estimate.terms_bpd is None
    torch.testing.assert_close(estimate.prior_bpd, exact.prior_bpd)
    error = estimate.diffusion_bpd - exact.diffusion_bpd
    assert error.std() > 0.1, "timesteps are sampled"
    assert abs(error.mean()) < 4 * error.std() / math.sqrt(len(error))
    every_timestep = variational_bound(model, scheduler, x_0[:4], num_timesteps=T - 1, progress=False)
    assert every_timestep.exact and every_timestep.terms_bpd.shape == (4, T - 1)


def test_timestep_curve_is_each_strata_mean_term_at_its_middle_timestep():
    scheduler, model, x_0, exact = linear_model_and_bound(256)
    expected = linear_model_expected_bound(scheduler, model, x_0).terms.mean(0)  # closed form, paper's t = 2..T
    t, terms = exact.timestep_curve()
    assert t.tolist() == list(range(2, T + 1))
    torch.testing.assert_close(terms, expected.double(), rtol=0.03, atol=0)
    gen = torch.Generator().manual_seed(3)
    estimate = variational_bound(model, scheduler, x_0, num_timesteps=3, batch_size=128, generator=gen, progress=False)
    t, terms = estimate.timestep_curve()
    for (start, size), middle, term in zip(estimate.strata, t.tolist(), terms.tolist(), strict=True):
        columns = expected[start - 1 : start - 1 + size]  # scheduler timesteps start.. are columns start - 1..
        assert middle == start + 1 + (size - 1) / 2
        assert term == pytest.approx(columns.mean().item(), rel=0.15)


def test_bound_of_a_real_unet_on_preprocessed_digits(mnist_folder):
    scheduler = DDPMMnistScheduler(num_train_timesteps=8)
    examples = list(load_image_stream(str(mnist_folder), split="test").take(3))
    x_0 = ImagePreprocessor(32)(examples)
    unet = tiny_unet(sample_size=32, attention_resolutions=(16,))
    bound = variational_bound(unet, scheduler, x_0, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert bound.terms_bpd.shape == (3, 7) and (bound.terms_bpd >= 0).all()
    torch.testing.assert_close(bound.diffusion_bpd, bound.terms_bpd.sum(1))
    summary = bound.summary()
    assert summary["nll_bpd"] == pytest.approx(bound.total_bpd.mean().item())
    assert summary["num_images"] == 3 and summary["exact"]
    assert 0 < summary["prior_bpd"] and 0 < summary["decoder_bpd"] < summary["nll_bpd"]


def test_bad_input_is_rejected_before_any_work():
    scheduler = schedule()
    x_0 = random_digits(1)
    unet = OracleUNet().set_target(x_0, scheduler.alphas_cumprod).eval()
    with pytest.raises(TypeError, match="DDPMMnistScheduler.from_config"):
        variational_bound(unet, DDIMScheduler(), x_0)
    with pytest.raises(ValueError, match="8-bit images"):
        variational_bound(unet, scheduler, x_0 + 0.001)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        variational_bound(unet, scheduler, x_0[:, :, :27])
    with pytest.raises(ValueError, match="num_timesteps must be between 1 and T - 1 = 19"):
        variational_bound(unet, scheduler, x_0, num_timesteps=T)
    with pytest.raises(ValueError, match="image_size=27"):
        variational_bound(unet, scheduler, x_0, image_size=27)
    with pytest.raises(ValueError, match="unet.eval"):
        variational_bound(unet.train(), scheduler, x_0)
