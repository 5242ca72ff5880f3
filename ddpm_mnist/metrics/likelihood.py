"""The variational bound of DDPM (Ho et al. 2020, eq. 5) on 8-bit images, as an NLL bound in bits per dimension.

    L = L_T + sum_{t=2}^T L_{t-1} + L_0  >=  -log p_theta(x_0)                                       (eq. 5)

* prior:     L_T = KL(q(x_T | x_0) || N(0, I)), q(x_T | x_0) from eq. 4;
* diffusion: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) with x_t ~ q(x_t | x_0), the posterior of
  eq. 6-7 against the reverse step N(mu_theta(x_t, t), sigma_t^2 I);
* decoder:   L_0 = -log p_theta(x_0 | x_1), the discretized Gaussian of eq. 13: N(mu_theta(x_1, 1), sigma_1^2)
  integrated over each pixel's 8-bit bin of width 2/255, the two edge bins open-ended.

Every coefficient is the scheduler's, and mu_theta is the one `scheduler.step` samples with: x_0 predicted from the
model output per `prediction_type`, clipped if `clip_sample`, then put into the posterior mean of eq. 7.

Choices made here:

* Timesteps: the scheduler's t = 0..T-1 are the paper's t = 1..T, so `terms_bpd[:, i]` is L_{t-1} for the paper's
  t = i + 2 (scheduler timestep i + 1), and the decoder reads x_1 at scheduler timestep 0.
* sigma_t^2 is beta_t ("fixed_large") or beta_tilde_t ("fixed_small"), as in `step`. The decoder's sigma_1^2 is
  beta_1 for "fixed_large" (the paper's Section 3.2). For "fixed_small" beta_tilde_1 = 0 would make the decoder a
  point mass, so it is beta_tilde_2, the scheduler's `posterior_log_variance_clipped[0]`, as in the paper's reference
  code (which uses beta_tilde_2 for "fixed_large" too, "to get a better decoder log likelihood"; we keep beta_1).
* Expectations over x_t: each L_{t-1} is evaluated at one draw of x_t ~ q(x_t | x_0) per image, as the reference
  code's `calc_bpd_loop` does. "Exact" means all T terms are evaluated; each term is then an unbiased one-sample
  estimate, and the sum of T of them has a small variance (zero for a perfect denoiser). With `num_timesteps=K`
  fewer than T - 1, the diffusion sum is an unbiased estimate from K timesteps per image: one drawn uniformly from
  each of K contiguous strata of 2..T, weighted by the stratum's size. It is labelled `exact=False`; its
  per-timestep breakdown (`timestep_curve`) is then one mean per stratum.
* Dimensions: bits per dimension = nats / (D ln 2), D the digit's pixels (784 for a 28x28 digit). A model whose
  `sample_size` is larger sees digits padded with the background value -1; its latents x_1..x_T span the padding,
  so L_T and each L_{t-1} are summed over the whole model input, while L_0 is summed over the digit's pixels only,
  which sums the decoder over every value of the padding pixels. That is the bound on -log p_theta(digit), the
  model's probability of the digit with any padding; for a 28x28 model it is exactly eq. 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..data import IMAGE_SIZE
from ..scheduling_ddpm_mnist import DDPMMnistScheduler

BIN_HALF_WIDTH = 1 / 255  # 8-bit data scaled to [-1, 1]: bins of width 2/255 around each value (Section 3.3)


def gaussian_kl(
    mean_1: torch.Tensor, log_var_1: torch.Tensor, mean_2: torch.Tensor, log_var_2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean_1, exp(log_var_1)) || N(mean_2, exp(log_var_2))) per dimension, in nats (the terms of eq. 5)."""
    return 0.5 * (
        log_var_2 - log_var_1 + torch.exp(log_var_1 - log_var_2) - 1 + (mean_1 - mean_2) ** 2 * torch.exp(-log_var_2)
    )


def discretized_gaussian_log_likelihood(x_0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log p(x_0) per pixel, in nats, of N(mean, exp(log_var)) integrated over x_0's 8-bit bin (eq. 13).

    `x_0` holds 8-bit values scaled to [-1, 1]; the bins of -1 and 1 extend to -inf and +inf. The bin mass
    Phi(upper) - Phi(lower) is computed in log space, mirrored to the lower tail when both edges lie above the mean,
    so it stays accurate far into the tails (no clamping at 1e-12 as in the reference code).
    """
    inv_std = torch.exp(-0.5 * log_var)
    upper = (x_0 - mean + BIN_HALF_WIDTH) * inv_std
    lower = (x_0 - mean - BIN_HALF_WIDTH) * inv_std
    mirrored = lower > 0  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): the same mass, but from two small CDF values
    high, low = torch.where(mirrored, -lower, upper), torch.where(mirrored, -upper, lower)
    log_high = torch.special.log_ndtr(high)
    log_bin = log_high + torch.log(-torch.expm1(torch.special.log_ndtr(low) - log_high))
    log_left_edge = torch.special.log_ndtr(upper)  # x_0 = -1: the bin (-inf, -1 + 1/255]
    log_right_edge = torch.special.log_ndtr(-lower)  # x_0 = 1: the bin [1 - 1/255, inf)
    return torch.where(x_0 < -0.999, log_left_edge, torch.where(x_0 > 0.999, log_right_edge, log_bin))


@dataclass
class VariationalBound:
    """The bound (eq. 5) of each image and its terms, in bits per digit dimension; `total_bpd` is their sum."""

    prior_bpd: torch.Tensor
    """(N,) L_T."""
    diffusion_bpd: torch.Tensor
    """(N,) sum_{t=2}^T L_{t-1}: exact, or an unbiased estimate from sampled timesteps when `exact` is False."""
    decoder_bpd: torch.Tensor
    """(N,) L_0."""
    stratum_terms_bpd: torch.Tensor
    """(N, K) the diffusion terms by stratum, each row summing to `diffusion_bpd`: one sampled L_{t-1} per image and
    stratum, times the stratum's size (for the exact bound every stratum is one timestep: L_{t-1} itself)."""
    strata: list[tuple[int, int]]
    """(first scheduler timestep, number of timesteps) of each stratum, in order; together they cover 1..T-1."""

    @property
    def exact(self) -> bool:
        """True if all T terms were evaluated, False for the sampled-timestep estimate of the diffusion terms."""
        return all(size == 1 for _, size in self.strata)

    @property
    def terms_bpd(self) -> torch.Tensor | None:
        """(N, T - 1) L_{t-1} for the paper's t = 2..T (column i is t = i + 2); None for an estimate."""
        return self.stratum_terms_bpd if self.exact else None

    def timestep_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L_{t-1} against the paper's t, averaged over the images: (t, mean term in bits/dim), one point per stratum.

        For the exact bound, every t = 2..T; for an estimate, each stratum's middle t and its mean term per timestep
        (an unbiased estimate of the mean of L_{t-1} over the stratum's timesteps).
        """
        first, sizes = torch.tensor(self.strata, dtype=torch.float64).T
        paper_t = first + 1 + (sizes - 1) / 2  # scheduler timestep s is the paper's t = s + 1
        return paper_t, self.stratum_terms_bpd.double().mean(0) / sizes

    @property
    def total_bpd(self) -> torch.Tensor:
        """(N,) the bound: an upper bound on each image's negative log-likelihood, in bits per dimension."""
        return self.prior_bpd + self.diffusion_bpd + self.decoder_bpd

    def summary(self) -> dict[str, float | int | bool]:
        """Means over the images of the bound and its terms, and the standard error of the bound's mean."""
        total = self.total_bpd
        stderr = total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")
        return {
            "nll_bpd": total.mean().item(), "nll_bpd_stderr": stderr, "prior_bpd": self.prior_bpd.mean().item(),
            "diffusion_bpd": self.diffusion_bpd.mean().item(), "decoder_bpd": self.decoder_bpd.mean().item(),
            "exact": self.exact, "num_images": len(total),
        }  # fmt: skip


@torch.no_grad()
def variational_bound(
    unet: ModelMixin,
    scheduler: DDPMMnistScheduler,
    x_0: torch.Tensor,
    *,
    image_size: int = IMAGE_SIZE,
    num_timesteps: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> VariationalBound:
    """The bound of eq. 5 for each image of `x_0`, in bits per dimension (see the module docstring for the choices).

    Args:
        unet: the noise-prediction network eps_theta(x_t, t) (or x_0/v per `prediction_type`), in eval mode.
        scheduler: the `DDPMMnistScheduler` it was trained with.
        x_0: (N, C, S, S) 8-bit images scaled to [-1, 1], as `ImagePreprocessor(S)` makes them (S = `sample_size`).
        image_size: the side of the digit at the centre of each image; the bound is per digit pixel.
        num_timesteps: None for the exact sum over all T terms; K in 1..T-1 for an unbiased estimate of the
            diffusion terms from K timesteps per image (K = T - 1 evaluates every term, and is exact).
        batch_size: images per network call.
        generator: the source of the x_t noise and the sampled timesteps (a CPU generator).
        progress: show a progress bar over the network calls.
    """
    if not isinstance(scheduler, DDPMMnistScheduler):
        raise TypeError(
            f"the bound needs the DDPM schedule, got a {type(scheduler).__name__}; pass "
            "DDPMMnistScheduler.from_config(scheduler.config)."
        )
    if unet.training:
        raise ValueError("the UNet is in training mode (dropout on); call unet.eval() first.")
    channels, size = unet.config.in_channels, unet.config.sample_size
    if x_0.ndim != 4 or tuple(x_0.shape[1:]) != (channels, size, size) or len(x_0) == 0:
        raise ValueError(
            f"x_0 must be a non-empty (N, {channels}, {size}, {size}) batch for this UNet, got {tuple(x_0.shape)}."
        )
    levels = (x_0.float() + 1) * 127.5
    if levels.min() < -1e-3 or levels.max() > 255 + 1e-3 or (levels - levels.round()).abs().max() > 1e-3:
        raise ValueError("x_0 must hold 8-bit images scaled to [-1, 1] (k / 127.5 - 1), as ImagePreprocessor makes.")
    if not 1 <= image_size <= size or (size - image_size) % 2:
        raise ValueError(f"image_size={image_size} must fit centred in the UNet's sample_size={size}.")
    num_terms = scheduler.config.num_train_timesteps - 1  # T - 1
    if num_timesteps is not None and not 1 <= num_timesteps <= num_terms:
        raise ValueError(
            f"num_timesteps must be between 1 and T - 1 = {num_terms}, or None for the exact bound; "
            f"got {num_timesteps}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    num_strata = num_terms if num_timesteps is None else num_timesteps
    # Stratum j covers scheduler timesteps edges[j] .. edges[j + 1] - 1 (all of them: 1 .. T - 1).
    edges = [1 + j * num_terms // num_strata for j in range(num_strata + 1)]
    strata = [(start, end - start) for start, end in zip(edges[:-1], edges[1:], strict=True)]
    nats_per_bit_dim = x_0.shape[1] * image_size**2 * math.log(2)
    border = (x_0.shape[-1] - image_size) // 2

    batches = x_0.split(batch_size)
    with tqdm(total=len(batches) * (num_strata + 1), desc="variational bound", disable=not progress) as bar:
        parts = [_bound_terms(unet, scheduler, batch, strata, border, generator, bar) for batch in batches]
    prior, decoder, terms = (torch.cat(part) / nats_per_bit_dim for part in zip(*parts, strict=True))
    return VariationalBound(prior, terms.sum(1), decoder, terms, strata)


def _bound_terms(
    unet: ModelMixin, scheduler: DDPMMnistScheduler, x_0: torch.Tensor, strata: list[tuple[int, int]], border: int,
    generator: torch.Generator | None, bar: tqdm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """L_T (B,), L_0 (B,) and the stratum-weighted L_{t-1} (B, K) of one batch, in nats, summed over pixels."""
    device = unet.device
    x_0 = x_0.to(device, torch.float32)
    x_0_64 = x_0.double()
    # log sigma_t^2 for t = 0..T-1; at t = 0 the decoder's sigma_1^2 (module docstring).
    posterior_log_var = scheduler.posterior_log_variance_clipped.double().to(device)
    fixed_large = scheduler.config.variance_type == "fixed_large"
    model_log_var = scheduler.betas.double().log().to(device) if fixed_large else posterior_log_var

    # L_T: q(x_T | x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I) against N(0, I) (eq. 4).
    prior_mean = scheduler.sqrt_alphas_cumprod[-1].double().item() * x_0_64
    prior_log_var = torch.full_like(x_0_64, 2 * math.log(scheduler.sqrt_one_minus_alphas_cumprod[-1].item()))
    prior = gaussian_kl(prior_mean, prior_log_var, torch.zeros_like(x_0_64), torch.zeros_like(x_0_64)).flatten(1)

    # L_{t-1}, one timestep per stratum and image, weighted by the stratum's size.
    terms = []
    for start, size in strata:
        if size == 1:  # the exact sum: one timestep shared by the batch
            t = torch.tensor(start, device=device)
        else:
            u = torch.rand(len(x_0), generator=generator, device=generator.device if generator else "cpu")
            t = (start + (u * size).long()).to(device)
        x_t = scheduler.add_noise(x_0, randn_tensor(x_0.shape, generator=generator, device=device), t)
        posterior_mean, _ = scheduler.q_posterior_mean_variance(x_0_64, x_t.double(), t)
        q_log_var, p_log_var = (log_var[t].reshape(-1, 1, 1, 1) for log_var in (posterior_log_var, model_log_var))
        kl = gaussian_kl(posterior_mean, q_log_var, _model_mean(unet, scheduler, x_t, t), p_log_var)
        terms.append(size * kl.flatten(1).sum(1))
        bar.update()

    # L_0 on the digit's pixels, from x_1 at scheduler timestep 0.
    t = torch.tensor(0, device=device)
    x_1 = scheduler.add_noise(x_0, randn_tensor(x_0.shape, generator=generator, device=device), t)
    log_likelihood = discretized_gaussian_log_likelihood(x_0_64, _model_mean(unet, scheduler, x_1, t), model_log_var[0])
    digit = log_likelihood[..., border : x_0.shape[-2] - border, border : x_0.shape[-1] - border]
    bar.update()
    return prior.sum(1).cpu(), -digit.flatten(1).sum(1).cpu(), torch.stack(terms, 1).cpu()


def _model_mean(unet: ModelMixin, scheduler: DDPMMnistScheduler, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mu_theta(x_t, t) in float64: predicted x_0, clipped as `step` clips it, in the posterior mean of eq. 7."""
    model_output = unet(x_t.to(unet.dtype), t).sample.to(x_t.dtype)
    x_0_pred = scheduler.predict_original_sample(model_output, t, x_t)
    if scheduler.config.clip_sample:
        x_0_pred = x_0_pred.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    mean, _ = scheduler.q_posterior_mean_variance(x_0_pred.double(), x_t.double(), t)
    return mean
