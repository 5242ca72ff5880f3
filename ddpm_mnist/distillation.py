"""Trajectory distillation: a student that draws in 1 to 8 steps what its teacher draws in many, guidance included.

The teacher (a pipeline at its recommended sampler, classifier-free guidance and step count) is a deterministic map
from noise x_T and a label y to a digit x_0: UniPC and DDIM integrate the probability-flow ODE. The student learns that
map from every point of the teacher's path: given x_t on the path from x_T (with its timestep t and the label y), it
predicts the path's end x_0, as consistency distillation (Song et al. 2023) and solver-trajectory distillation (Zhou
et al. 2024) do, with the teacher's guided prediction as the only guidance (one U-Net call per step, as Meng et al.
2023 distil guidance at a fixed scale).

The student predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, "v_prediction"), not eps:
with the paper's linear betas sqrt(abar_T) is about 0.0064, and x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
would multiply an eps error about 156-fold at the first step. It samples with DDIM (eta = 0) on trailing timesteps,
whose first step starts at t = T - 1 from pure noise: `student_scheduler` is the scheduler its folder saves.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, SchedulerMixin

from .pipeline_ddpm_mnist import DDPMMnistPipeline

STUDENT_PREDICTION_TYPES = ("v_prediction", "sample")


def student_scheduler(teacher_scheduler: SchedulerMixin, prediction_type: str = "v_prediction") -> DDIMScheduler:
    """The student's sampler: deterministic DDIM on the teacher's noise schedule, trailing timesteps (the first at
    T - 1), x_0 clipped to [-1, 1], and the last step landing on x_0 itself (`set_alpha_to_one`)."""
    if prediction_type not in STUDENT_PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not a student's target; pass one of {STUDENT_PREDICTION_TYPES}."
        )
    return DDIMScheduler.from_config(
        teacher_scheduler.config, prediction_type=prediction_type, timestep_spacing="trailing", set_alpha_to_one=True,
        clip_sample=True, clip_sample_range=1.0,
    )  # fmt: skip


@torch.no_grad()
def teacher_trajectories(
    teacher: DDPMMnistPipeline,
    x_T: torch.Tensor,
    class_labels: torch.Tensor | None,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's paths from `x_T` (B, C, H, W): (x_t of every step (S, B, C, H, W), their timesteps (S,), x_0).

    The teacher samples with its own scheduler (set beforehand) on `num_inference_steps` steps; the null class in
    `class_labels` draws an unguided digit of any class. The first state is `x_T` itself, given the timestep T - 1
    whatever the teacher's first timestep: the student starts every draw there. x_0 is clipped to [-1, 1].
    """
    scheduler = teacher.scheduler
    scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    states = [x_T]

    def record(pipe: DDPMMnistPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        states.append(tensors["image"])
        return tensors

    x_0 = teacher.denoise(
        x_T * scheduler.init_noise_sigma, scheduler.timesteps, class_labels, guidance_scale,
        callback_on_step_end=record, progress=False,
    )  # fmt: skip
    timesteps = scheduler.timesteps.clone().long()
    timesteps[0] = scheduler.config.num_train_timesteps - 1
    return torch.stack(states[:-1]), timesteps, x_0.clamp(-1, 1)


def distillation_loss(
    student: torch.nn.Module,
    scheduler: SchedulerMixin,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None,
    x_0: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error, in x_0, between the student's prediction of the path's end from (x_t, t, y) and the
    teacher's x_0: the student's output is read through `scheduler.config.prediction_type` ("v_prediction": x_0 =
    sqrt(abar_t) x_t - sqrt(1 - abar_t) v; "sample": x_0 itself)."""
    output = student(x_t, timesteps, class_labels=class_labels).sample.float()
    if scheduler.config.prediction_type == "sample":
        predicted = output
    else:
        alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[timesteps].view(-1, 1, 1, 1)
        predicted = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    return torch.nn.functional.mse_loss(predicted, x_0)


def distillation_batch(
    teacher: DDPMMnistPipeline,
    batch_size: int,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    class_dropout_prob: float = 0.0,
    states_per_path: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A batch to distil on: (x_t, t, y, x_0), `states_per_path` states of each of `batch_size` new teacher paths.

    Noise, labels (a conditional teacher's: uniform digits, the null class with probability `class_dropout_prob`) and
    the states chosen come from torch's global generator, so that a run's checkpointed random state resumes it
    exactly. Every path gives its first state, pure noise at t = T - 1, where every draw of the student begins, and
    `states_per_path - 1` others, all different.
    """
    device, unet = teacher.device, teacher.unet
    x_T = torch.randn(batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    labels = None
    if teacher.is_class_conditional:
        null = unet.config.num_class_embeds
        labels = torch.randint(0, null, (batch_size,))
        labels = labels.masked_fill(torch.rand(batch_size) < class_dropout_prob, null).to(device)
    states, timesteps, x_0 = teacher_trajectories(teacher, x_T.to(device), labels, num_inference_steps, guidance_scale)
    later = torch.rand(batch_size, len(timesteps) - 1).argsort(dim=1)[:, : states_per_path - 1] + 1
    chosen = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), later], dim=1).to(device)  # (B, k)
    x_t = states[chosen, torch.arange(batch_size, device=device)[:, None]].flatten(0, 1)
    y = None if labels is None else labels.repeat_interleave(states_per_path)
    return x_t, timesteps.to(device)[chosen].flatten(), y, x_0.repeat_interleave(states_per_path, dim=0)
