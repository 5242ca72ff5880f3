"""The schedulers ddpm-mnist samples with, by the name every entry point takes: the one registry of them.

`--scheduler` of the CLI, `training/train.py` and `training/release.py`, the app's menu, the card's code and the
editing pipelines' check all read `SCHEDULERS`; adding a scheduler is one entry here. Each is built with
`SCHEDULERS[name].from_config(pipe.scheduler.config)`, on the pipeline's noise schedule, so that every scheduler runs
the schedule the network was trained on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, SchedulerMixin, UniPCMultistepScheduler

from .scheduling_ddpm_mnist import DDPMMnistScheduler


class SchedulerEntry(NamedTuple):
    """A scheduler of the registry: its class, the name cards and tables give it, and whether it steps from (x_t, t)
    alone, as RePaint's jumps back up the chain and interpolation's partial chain need (a multistep scheduler keeps
    a history of model outputs)."""

    scheduler_class: type[SchedulerMixin]
    title: str
    one_step: bool

    def from_config(self, config: Any) -> SchedulerMixin:
        """The scheduler on `config`'s noise schedule (a scheduler's config, such as `pipe.scheduler.config`)."""
        return self.scheduler_class.from_config(config)


SCHEDULERS = {
    "ddpm": SchedulerEntry(DDPMMnistScheduler, "DDPM", one_step=True),
    "ddim": SchedulerEntry(DDIMScheduler, "DDIM", one_step=True),
    "dpm++": SchedulerEntry(DPMSolverMultistepScheduler, "DPM-Solver++", one_step=False),
    "unipc": SchedulerEntry(UniPCMultistepScheduler, "UniPC", one_step=False),
}
FAST_SCHEDULER_STEPS = 50  # the default num_inference_steps of every scheduler but ddpm, which runs all T steps
