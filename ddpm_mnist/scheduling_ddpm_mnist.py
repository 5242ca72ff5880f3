"""The DDPM noise schedule and ancestral sampling (Algorithm 2) of Ho et al. (2020), as a diffusers scheduler.

"Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239. Equation numbers below refer
to that paper:

* forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)            (eq. 4)
* forward posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I)                  (eq. 6, 7)
* eps-parameterisation x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, inverted   (eq. 15)
* one step of ancestral sampling x_t -> x_{t-1}                                            (Algorithm 2)

`DDPMMnistScheduler` is a drop-in replacement for `diffusers.DDPMScheduler`: same config keys, and
`set_timesteps`, `step`, `add_noise` and `get_velocity` return the same numbers for the options it supports.
In addition it validates its inputs, exposes the paper's precomputed quantities under the paper's names,
and `step` accepts one timestep per sample.

This file imports only torch, diffusers and the standard library so that it can be copied into a Hub repo
and loaded with `trust_remote_code`.
"""

import operator
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class DDPMMnistSchedulerOutput(BaseOutput):
    """Output of `DDPMMnistScheduler.step`.

    Args:
        prev_sample: x_{t-1} (or x_{t'} for the previous inference timestep t'), the next model input.
        pred_original_sample: the model's (clipped) estimate of x_0 at this step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of: {', '.join(choices)}.")


def _posterior_coefficients(alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 7 for q(x_{t'} | x_t, x_0), elementwise, in the precision of the inputs.

    mu_tilde = coef1 x_0 + coef2 x_t with coef1 = sqrt(alpha_bar_{t'}) beta / (1 - alpha_bar_t) and
    coef2 = sqrt(alpha) (1 - alpha_bar_{t'}) / (1 - alpha_bar_t); beta_tilde = (1 - alpha_bar_{t'}) / (1 - alpha_bar_t)
    beta. Here alpha = alpha_bar_t / alpha_bar_{t'} and beta = 1 - alpha: the paper's alpha_t and beta_t when
    t' = t - 1, and the one-step beta of a respaced chain (t' < t - 1) otherwise. The operations are those of
    `diffusers.DDPMScheduler.step`, in its order, so that float32 inputs give its float32 numbers.
    """
    alpha = alpha_bar / alpha_bar_prev
    beta = 1 - alpha
    return {
        "posterior_mean_coef1": alpha_bar_prev**0.5 * beta / (1 - alpha_bar),
        "posterior_mean_coef2": alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar),
        "posterior_variance": (1 - alpha_bar_prev) / (1 - alpha_bar) * beta,
        "beta": beta,
    }


class DDPMMnistScheduler(SchedulerMixin, ConfigMixin):
    """Noise schedule and reverse-process step of DDPM (Ho et al. 2020).

    Args:
        num_train_timesteps: T, the number of forward-process steps.
        beta_start, beta_end: beta_1 and beta_T of the schedule (the paper uses 1e-4 and 0.02).
        beta_schedule: "linear" (the paper's), "scaled_linear" (linear in sqrt(beta)) or "squaredcos_cap_v2"
            (cosine schedule); ignored when `trained_betas` is given.
        trained_betas: explicit betas, one per timestep.
        variance_type: sigma_t^2 of the reverse process (Section 3.2): "fixed_small" = beta_tilde_t (eq. 7),
            "fixed_large" = beta_t.
        clip_sample: clip the predicted x_0 to [-clip_sample_range, clip_sample_range] in `step`.
        prediction_type: what the model predicts: "epsilon" (the noise, eq. 11), "sample" (x_0) or
            "v_prediction" (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, Salimans & Ho 2022).
        clip_sample_range: see `clip_sample`.
        timestep_spacing: how `set_timesteps(n)` picks n < T inference timesteps: "leading", "trailing" or
            "linspace" (Table 2 of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
            Flawed").
        steps_offset: added to the "leading" timesteps.

    Timestep t runs from 0 to T - 1 here (the paper's t = 1..T shifted by one), as in diffusers.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}.")
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}.")

        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float32).flatten()
            if betas.numel() != num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {betas.numel()} values, num_train_timesteps is {num_train_timesteps}."
                )
            if isinstance(trained_betas, torch.Tensor):  # keep the config JSON-serialisable
                self.register_to_config(trained_betas=betas.tolist())
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            n = num_train_timesteps
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = betas_for_alpha_bar(num_train_timesteps)  # the cosine schedule (Nichol & Dhariwal 2021, eq. 17)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("All betas must lie in the open interval (0, 1).")

        self.betas = betas  # beta_t, the forward-process variances (eq. 2)
        self.alphas = 1.0 - betas  # alpha_t = 1 - beta_t (Section 2, before eq. 4)
        # alpha_bar_t = prod_{s<=t} alpha_s (eq. 4); a float32 cumprod, bit-identical to diffusers'.
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

        # The rest is derived from alpha_bar in float64 and stored as float32. The one-step beta used in the
        # posterior is 1 - alpha_bar_t / alpha_bar_{t-1}, which equals beta_t up to float32 rounding of
        # alpha_bar and keeps eq. 7 consistent with the marginals of eq. 4 (diffusers' step does the same).
        abar = self.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior = _posterior_coefficients(abar, abar_prev)

        self.alphas_cumprod_prev = abar_prev.float()  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (eq. 7)
        self.sqrt_alphas_cumprod = abar.sqrt().float()  # the signal scale of q(x_t | x_0) (eq. 4)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt().float()  # the noise scale of q(x_t | x_0) (eq. 4)
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t, Var q(x_{t-1}|x_t, x_0) (eq. 7).
        self.posterior_variance = posterior["posterior_variance"].float()
        # log(beta_tilde_t), t=0 entry (beta_tilde_0 = 0) replaced by t=1 as in the paper's reference code.
        clipped = torch.cat([posterior["posterior_variance"][1:2], posterior["posterior_variance"][1:]])
        self.posterior_log_variance_clipped = clipped.log().float()
        # mu_tilde_t = coef1 x_0 + coef2 x_t (eq. 7): coef1 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
        self.posterior_mean_coef1 = posterior["posterior_mean_coef1"].float()
        # and coef2 = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (eq. 7).
        self.posterior_mean_coef2 = posterior["posterior_mean_coef2"].float()

        self.init_noise_sigma = 1.0  # x_T ~ N(0, I) (Algorithm 2, line 1)

        # Inference schedule: by default all T steps, t = T-1, ..., 0.
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        # _prev_table[t] = the timestep after t in self.timesteps, -1 after the last, -2 if t is not in it.
        self._prev_table = torch.arange(-1, num_train_timesteps - 1, dtype=torch.int64)
        # The posterior (eq. 7) of each step t -> t' of that chain, as `_posterior_coefficients` gives it.
        self._chain_posterior = self._chain_posterior_tables()
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}  # filled lazily by _tables()

        # diffusers' `from_config` skips the keys a config took by default, so `HeunDiscreteScheduler.from_config`
        # would fall back to its own (Stable Diffusion) betas. Mark every key as chosen, as a saved config is.
        self.register_to_config(_use_default_values=[])

    # ------------------------------------------------------------------------------------------------------
    # Inference schedule

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | torch.Tensor | None = None,
    ) -> None:
        """Choose the timesteps the reverse process (Algorithm 2) visits, in descending order.

        Pass either `num_inference_steps` (spaced per `config.timestep_spacing`, exactly as diffusers does,
        except that "trailing" never yields more than n steps) or explicit `timesteps` (strictly descending,
        each in [0, num_train_timesteps)). Sets `self.timesteps` (a LongTensor on `device`),
        `self.num_inference_steps` and `self.custom_timesteps`.
        """
        num_train = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass only one of num_inference_steps and timesteps, not both.")

        if timesteps is not None:
            ts = torch.as_tensor(timesteps).detach().cpu()
            if ts.ndim != 1 or ts.numel() == 0 or ts.is_floating_point() or ts.is_complex():
                raise ValueError("Custom timesteps must be a non-empty 1-D sequence of integers.")
            ts = ts.to(torch.int64)
            if not bool((ts[1:] < ts[:-1]).all()):
                raise ValueError(f"Custom timesteps must be strictly descending, got {ts.tolist()}.")
            if ts[-1] < 0 or ts[0] >= num_train:
                raise ValueError(f"Custom timesteps must lie in [0, {num_train}), got {ts.tolist()}.")
            custom = True
        else:
            if num_inference_steps is None:
                raise ValueError("Pass num_inference_steps or timesteps.")
            try:  # any integer type (int, numpy or 0-d torch integer), but not bool or float
                n = None if isinstance(num_inference_steps, bool) else operator.index(num_inference_steps)
            except TypeError:
                n = None
            if n is None or not 1 <= n <= num_train:
                raise ValueError(
                    f"num_inference_steps must be an integer in [1, {num_train}] (num_train_timesteps), "
                    f"got {num_inference_steps!r}."
                )
            ts = self._spaced_timesteps(n)
            if ts[-1] < 0 or ts[0] >= num_train:
                raise ValueError(
                    f"timestep_spacing={self.config.timestep_spacing!r} with "
                    f"steps_offset={self.config.steps_offset} gives timesteps outside [0, {num_train}): "
                    f"{ts.tolist()}."
                )
            custom = False

        self.timesteps = ts.to(device)
        self.num_inference_steps = ts.numel()
        self.custom_timesteps = custom
        prev = torch.full((num_train,), -2, dtype=torch.int64)
        prev[ts] = torch.cat([ts[1:], ts.new_full((1,), -1)])
        self._prev_table = prev
        self._chain_posterior = self._chain_posterior_tables()
        self._device_tables.clear()

    def _chain_posterior_tables(self) -> dict[str, torch.Tensor]:
        """Eq. 7 for each step t -> t' = `_prev_table[t]` of the chain that `step` walks, indexed by t.

        The same formulas as the paper's tables above, evaluated in float32 from the float32 alpha_bar, as
        `diffusers.DDPMScheduler.step` evaluates them at every step: that keeps `step` numerically equal to it,
        where the float64 tables differ by up to 1e-4 in coef1 at the first few t, in which 1 - alpha_bar_t /
        alpha_bar_{t-1} cancels in float32. Entries of timesteps outside the chain are never read.
        """
        prev = self._prev_table
        alpha_bar_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], torch.ones(()))
        return _posterior_coefficients(self.alphas_cumprod, alpha_bar_prev)

    def _spaced_timesteps(self, n: int) -> torch.Tensor:
        """n descending timesteps per `timestep_spacing`; reproduces diffusers' float64 numpy arithmetic."""
        num_train = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "leading":
            ratio = num_train // n
            return torch.arange(n - 1, -1, -1, dtype=torch.int64) * ratio + self.config.steps_offset
        if spacing == "trailing":
            # numpy's arange(T, 0, -T/n) computes T + i * ((T - T/n) - T); keep the first n values.
            delta = (num_train - num_train / n) - num_train
            values = float(num_train) + torch.arange(n, dtype=torch.float64) * delta
            return values.round().to(torch.int64) - 1
        # "linspace": numpy's linspace(0, T - 1, n) is i * ((T - 1) / (n - 1)) with the last value exact.
        values = torch.zeros(n, dtype=torch.float64)
        if n > 1:
            values = torch.arange(n, dtype=torch.float64) * ((num_train - 1) / (n - 1))
            values[-1] = num_train - 1
        return values.round().to(torch.int64).flip(0)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep t' that Algorithm 2 visits after t: t - 1 for the full chain, the next entry of
        `self.timesteps` after `set_timesteps`, and -1 after the last one. Returns an int for an int input,
        otherwise a LongTensor shaped like `timestep`."""
        t = torch.as_tensor(timestep)
        prev = self._checked_previous(t.reshape(-1).to(torch.int64))
        if isinstance(timestep, torch.Tensor):
            return prev.reshape(t.shape)
        return int(prev.reshape(()))

    def _checked_previous(self, t: torch.Tensor) -> torch.Tensor:
        """`previous_timestep` of a 1-D LongTensor, raising ValueError for timesteps outside the schedule."""
        prev, invalid = self._lookup_previous(t)
        if bool(invalid.any()):
            self._raise_not_in_schedule(t, invalid)
        return prev

    def _lookup_previous(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_train = self.config.num_train_timesteps
        prev = self._tables(t.device)["prev"][t.clamp(0, num_train - 1)]
        invalid = (t < 0) | (t >= num_train) | (prev < -1)
        return prev, invalid

    def _raise_not_in_schedule(self, t: torch.Tensor, invalid: torch.Tensor) -> None:
        if self.num_inference_steps:
            where = f"the {self.num_inference_steps} timesteps set by set_timesteps"
        else:
            where = f"[0, {self.config.num_train_timesteps})"
        raise ValueError(f"Timestep(s) {t[invalid].tolist()} are not in {where}.")

    # ------------------------------------------------------------------------------------------------------
    # Coefficient lookup

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Lookup tables on `device`, copied there once and cached (cleared by `set_timesteps`)."""
        device = torch.device(device)
        tables = self._device_tables.get(device)
        if tables is None:
            tables = {
                # alpha_bar shifted by one so that index t + 1 = 0 gives alpha_bar_{-1} = 1.
                "alpha_bar": torch.cat([torch.ones(1), self.alphas_cumprod]).to(device),
                "sqrt_alpha_bar": self.sqrt_alphas_cumprod.to(device),
                "sqrt_one_minus_alpha_bar": self.sqrt_one_minus_alphas_cumprod.to(device),
                "prev": self._prev_table.to(device),
                **{name: table.to(device) for name, table in self._chain_posterior.items()},
            }
            self._device_tables[device] = tables
        return tables

    def _gather(self, name: str, timesteps: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] (float32) on like's device, shaped (B, 1, ..., 1) to broadcast against `like`."""
        t = torch.as_tensor(timesteps, device=like.device).reshape(-1).to(torch.int64)
        if name == "alpha_bar":
            t = t + 1  # alpha_bar_t for t >= -1
        return self._tables(like.device)[name][t].reshape(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------------------------------------------
    # Forward process

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) (eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        `timesteps` is one timestep or one per sample (shape (B,)).
        """
        dtype = original_samples.dtype
        scale = self._gather("sqrt_alpha_bar", timesteps, original_samples).to(dtype)
        sigma = self._gather("sqrt_one_minus_alpha_bar", timesteps, original_samples).to(dtype)
        return scale * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022,
        Section 4), for x_t built from x_0 = `sample` and eps = `noise` as in eq. 4."""
        dtype = sample.dtype
        scale = self._gather("sqrt_alpha_bar", timesteps, sample).to(dtype)
        sigma = self._gather("sqrt_one_minus_alpha_bar", timesteps, sample).to(dtype)
        return scale * noise - sigma * sample

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled (Algorithm 2, line 4); returns `sample` unchanged."""
        return sample

    # ------------------------------------------------------------------------------------------------------
    # Reverse process

    def predict_x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, timesteps: int | torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 / eq. 15 for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        alpha_bar = self._gather("alpha_bar", timesteps, x_t)
        return (x_t - ((1 - alpha_bar) ** 0.5).to(x_t.dtype) * eps) / (alpha_bar**0.5).to(x_t.dtype)

    def predict_original_sample(
        self, model_output: torch.Tensor, timesteps: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """x_0 estimated from the model output per `prediction_type`, unclipped: eq. 15 inverted for
        "epsilon", the output itself for "sample", sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v for
        "v_prediction"."""
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return self.predict_x0_from_eps(sample, model_output, timesteps)
        if prediction_type == "sample":
            return model_output
        alpha_bar = self._gather("alpha_bar", timesteps, sample)
        dtype = sample.dtype
        return (alpha_bar**0.5).to(dtype) * sample - ((1 - alpha_bar) ** 0.5).to(dtype) * model_output

    def q_posterior_mean_variance(
        self, x_0: torch.Tensor, x_t: torch.Tensor, timesteps: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean mu_tilde and variance beta_tilde of q(x_{t'} | x_t, x_0) (eq. 6, 7), t' = `previous_timestep(t)`.

        On the full chain t' = t - 1, the paper's case (t' = -1 means alpha_bar_{t'} = 1); after `set_timesteps`,
        t' is the next inference timestep, and eq. 7 holds with beta_t replaced by 1 - alpha_bar_t / alpha_bar_{t'}.
        `timesteps` is one timestep or one per sample; the variance is returned shaped (B, 1, ..., 1).
        """
        t = torch.as_tensor(timesteps, device=x_t.device).reshape(-1).to(torch.int64)
        self._checked_previous(t)
        return self._posterior(x_0, x_t, t)

    def _posterior(self, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`q_posterior_mean_variance` for timesteps already checked: the chain's eq. 7 tables at t."""
        dtype = x_t.dtype
        coef1 = self._gather("posterior_mean_coef1", t, x_t).to(dtype)
        coef2 = self._gather("posterior_mean_coef2", t, x_t).to(dtype)
        return coef1 * x_0 + coef2 * x_t, self._gather("posterior_variance", t, x_t).to(dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DDPMMnistSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step of ancestral sampling (Algorithm 2, lines 3-4): x_t -> x_{t'}.

        x_0 is predicted from the model output (eq. 15 for "epsilon"), clipped if `clip_sample`, and
        x_{t'} = mu_tilde(x_t, x_0) + sigma_t z (eq. 7) with z ~ N(0, I) for t > 0 and no noise at t = 0.
        t' is `previous_timestep(t)`; with fewer inference steps the one-step beta is
        1 - alpha_bar_t / alpha_bar_{t'}, and sigma_t^2 is beta_tilde ("fixed_small") or that beta
        ("fixed_large").

        `timestep` is one timestep for the whole batch or a (B,) tensor, one per sample. `generator` may be a
        list with one generator per sample (noise is drawn with diffusers' `randn_tensor`, so results match
        `DDPMScheduler.step` given the same generator(s)).
        """
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).to(torch.int64)
        if t.numel() not in (1, sample.shape[0]):
            raise ValueError(
                f"timestep must be a scalar or hold one value per sample ({sample.shape[0]}), got {t.numel()} values."
            )
        _, invalid = self._lookup_previous(t)
        # One host sync for both checks.
        any_invalid, any_noise = torch.stack([invalid.any(), (t > 0).any()]).tolist()
        if any_invalid:
            self._raise_not_in_schedule(t, invalid)

        pred_original_sample = self.predict_original_sample(model_output, t, sample)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)

        prev_sample, posterior_variance = self._posterior(pred_original_sample, sample, t)

        if any_noise:
            if self.config.variance_type == "fixed_small":
                variance = posterior_variance  # sigma_t^2 = beta_tilde_t
            else:
                variance = self._gather("beta", t, sample).to(sample.dtype)  # sigma_t^2 = beta_t
            has_noise = (t > 0).reshape(-1, *([1] * (sample.ndim - 1)))
            sigma = torch.where(has_noise, variance**0.5, torch.zeros_like(variance))
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + sigma * noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMMnistSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
