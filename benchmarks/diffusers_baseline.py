"""The diffusers baseline at equal architecture, shared by `throughput.py` and `time_to_quality.py`.

`diffusers_twin` builds `diffusers.UNet2DModel` to the architecture of a `DDPMMnistUNet`; `DiffusersLoop` is the
training loop of diffusers' `examples/unconditional_image_generation/train_unconditional.py` with that script's
defaults (AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8; cosine schedule with 500 warm-up steps;
EMAModel with max decay 0.9999, inv_gamma 1.0, power 3/4; DDPMScheduler with T = 1000 and the linear schedule), on
its data path (`diffusers_loader`). It is a library module for the benchmark entry points, never run itself.
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from datasets import load_dataset
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from ddpm_mnist import DDPMMnistUNet

TRAIN_BATCH_SIZE = 16  # its --train_batch_size, per device
NUM_EPOCHS = 100  # its --num_epochs: the cosine schedule decays over NUM_EPOCHS passes over the data
NUM_TRAIN_TIMESTEPS = 1000


def diffusers_twin(unet: DDPMMnistUNet) -> UNet2DModel:
    """`UNet2DModel` configured to the architecture of `unet`: same levels, channels, blocks and attention; checked
    to hold the same number of parameters (within 1%)."""
    c = unet.config
    attention = [c.sample_size // 2**i in c.attention_resolutions for i in range(len(c.channel_mult))]  # level by level
    same = ("sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups", "dropout")
    twin = UNet2DModel(
        **{key: c[key] for key in same},
        block_out_channels=tuple(c.base_channels * m for m in c.channel_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=None,  # one head, as in the paper
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (unet, twin))
    if abs(n_theirs / n_ours - 1) > 0.01:
        raise RuntimeError(f"the diffusers twin differs from our UNet: {n_ours} vs {n_theirs} parameters")
    return twin


def diffusers_loader(data: str, batch_size: int, seed: int) -> DataLoader:
    """train_unconditional.py's data: the map-style dataset, a per-example transform, a shuffling DataLoader.

    Its torchvision `Compose([Resize, CenterCrop, ToTensor, Normalize([0.5], [0.5])])` is a no-op resize and crop at
    28x28, then uint8 -> [0, 1] -> [-1, 1]; done here with numpy, per example as there, on greyscale digits (the
    script converts to RGB, which would give the UNet three input channels instead of the paper's one).
    """
    dataset = load_dataset(data, split="train")

    def transform_images(examples: dict) -> dict:
        pixels = (np.asarray(image.convert("L"), dtype=np.float32)[None] / 255 for image in examples["image"])
        return {"input": [(torch.from_numpy(image) - 0.5) / 0.5 for image in pixels]}

    dataset.set_transform(transform_images)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


class DiffusersLoop:
    """train_unconditional.py's training loop on `model`, one optimizer step per `step()` call.

    Each step is the script's: noise and timesteps, `add_noise` (the forward process q(x_t | x_0), eq. 4 of the
    DDPM paper), forward and the MSE of L_simple (eq. 14) under `accelerator.accumulate`, backward, gradient clipping
    at 1.0, AdamW, the warm-up/cosine schedule, the EMA step, and the logged loss (`.item()`) every step. The cosine
    schedule decays over NUM_EPOCHS passes over the data, as in the script. `mixed_precision` is "fp32" (the script's
    "no") or "bf16". Call `close()` at the end: it ends the trackers and resets accelerate's state, so that a next
    loop may ask for another mixed precision.
    """

    def __init__(
        self,
        model: UNet2DModel,
        data: str,
        batch_size: int,
        mixed_precision: str,
        project_dir: str | Path,
        *,
        seed: int = 0,
    ) -> None:
        precision = "no" if mixed_precision == "fp32" else mixed_precision
        self.accelerator = Accelerator(mixed_precision=precision, log_with="tensorboard", project_dir=project_dir)
        self.accelerator.init_trackers("train_unconditional")
        # train_unconditional.py's defaults (its argparse): the EMA, the optimizer and the learning-rate schedule.
        self.ema_model = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        loader = diffusers_loader(data, batch_size, seed=seed)
        num_training_steps = NUM_EPOCHS * len(loader)
        lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=num_training_steps)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(model, optimizer, lr_scheduler)
        self.ema_model.to(self.accelerator.device)
        self.weight_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
        self.batches = (batch["input"] for _ in itertools.count() for batch in loader)  # epoch after epoch
        self.global_step = 0
        self.train_seconds = 0.0  # the wall time of every step so far

    def step(self) -> float:
        """One optimizer step and its EMA step; the step's loss."""
        start = time.perf_counter()
        accelerator, model = self.accelerator, self.model
        clean_images = next(self.batches).to(accelerator.device, self.weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=self.weight_dtype, device=clean_images.device)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (clean_images.shape[0],), device=clean_images.device).long()
        noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        if accelerator.sync_gradients:
            self.ema_model.step(model.parameters())
        self.global_step += 1
        value = loss.detach().item()
        logs = {"loss": value, "lr": self.lr_scheduler.get_last_lr()[0], "step": self.global_step}
        accelerator.log({**logs, "ema_decay": self.ema_model.cur_decay_value}, step=self.global_step)
        self.train_seconds += time.perf_counter() - start
        return value

    def ema_unet(self) -> UNet2DModel:
        """A copy of the model holding the EMA weights, in eval mode (the script's pipeline at a save)."""
        unet = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        self.ema_model.copy_to(unet.parameters())
        return unet.eval()

    def close(self) -> None:
        """End the trackers and reset accelerate's state."""
        self.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
