"""The noise-prediction U-Net of "Denoising Diffusion Probabilistic Models" (Ho et al. 2020).

This mirrors the architecture of appendix B of the paper and of the authors' TensorFlow code
(``diffusion_tf/models/unet.py``): a PixelCNN++-style U-Net built from wide-ResNet blocks with
GroupNorm, a sinusoidal timestep embedding fed to every residual block, single-head self-attention
at selected resolutions, and a skip connection from every encoder activation to the decoder.

The file is self-contained (only ``torch``, ``diffusers`` and the standard library) so it can be
copied verbatim into a Hub repository and loaded with ``trust_remote_code=True``. It knows nothing
about noise schedules: it maps ``(x_t, t) -> eps_theta(x_t, t)`` and nothing more.

Initialisation follows the paper's code: Xavier-uniform weights, zero biases, and zero weights on the
last conv of every residual branch, the attention output projection and the output conv. A freshly
built model therefore predicts exactly zero noise until its first optimiser step.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

# Named configurations, each written as its changes to the paper's CIFAR10 model. Parameter counts and forward FLOPs
# per image were measured on this file (torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-accumulate).
# The paper's CIFAR10 model (Ho et al. 2020, appendix B): 35,746,307 parameters ("35.7M"), identical to the original
# TF code; 12.44 GFLOP forward per image.
_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    layers_per_block=2,
    attention_resolutions=(16,),
    dropout=0.1,
    norm_num_groups=32,
)
# GPU recipe: 28x28 digits zero-padded to 32x32, the CIFAR10 layout at half width.
# 8,949,761 parameters, 3.194 GFLOP forward per image.
_MNIST = dict(_CIFAR10, in_channels=1, out_channels=1, base_channels=64)
# CPU-trainable, native 28x28 (levels 28/14/7). 1,623,169 parameters, 0.625 GFLOP forward per image.
_MNIST_SMALL = dict(_MNIST, sample_size=28, base_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(14,))
# For unit tests only: 176,849 parameters, 0.118 GFLOP forward per image; a forward+backward on a batch of 8 takes
# ~0.1 s on one CPU core.
_TINY = dict(_MNIST_SMALL, base_channels=16, channel_mult=(1, 2), layers_per_block=1, dropout=0.0, norm_num_groups=8)
PRESETS: MappingProxyType[str, dict[str, Any]] = MappingProxyType(
    {"cifar10": _CIFAR10, "mnist": _MNIST, "mnist-small": _MNIST_SMALL, "tiny": _TINY}
)


@dataclass
class DDPMMnistUNetOutput(BaseOutput):
    """Output of `DDPMMnistUNet`: ``sample`` is the predicted noise eps_theta(x_t, t), shaped as the input."""

    sample: torch.Tensor


class DDPMMnistUNet(ModelMixin, ConfigMixin):
    """The DDPM noise-prediction U-Net (Ho et al. 2020, appendix B; ``diffusion_tf/models/unet.py``)."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        layers_per_block: int = 2,
        attention_resolutions: tuple[int, ...] = (14,),
        dropout: float = 0.1,
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
    ) -> None:
        """Build the U-Net of the paper: embedding, down path, middle, up path, output head.

        `num_class_embeds` (diffusers' `UNet2DModel` name) makes the model class-conditional: a learned embedding of
        `num_class_embeds + 1` rows is added to the timestep embedding, the last row being the "null" class that
        classifier-free guidance (Ho & Salimans 2022) predicts without a label. None builds the unconditional model.
        """
        super().__init__()
        channel_mult = tuple(channel_mult)  # config.json round trips store lists
        attention_resolutions = tuple(attention_resolutions)
        _validate_config(self.config)
        if num_class_embeds is not None and num_class_embeds < 1:
            raise ValueError(f"num_class_embeds={num_class_embeds} must be a positive integer, or None for no classes.")
        temb_channels = 4 * base_channels
        block_kwargs = dict(temb_channels=temb_channels, dropout=dropout, groups=norm_num_groups)

        # 1. Timestep embedding: sinusoidal features -> Dense, SiLU, Dense.
        self.time_embedding = TimestepEmbedding(base_channels, temb_channels)
        # 1b. Optional class embedding, added to it; row `num_class_embeds` is the null class.
        self.class_embedding = None
        if num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds + 1, temb_channels)

        # 2. Input convolution.
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)

        # 3. Down path. `skip_channels` tracks every activation the encoder stores for the decoder.
        skip_channels = [base_channels]
        ch, res = base_channels, sample_size
        self.down_levels = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            resnets, attns = [], []
            for _ in range(layers_per_block):
                resnets.append(ResnetBlock(ch, out_ch, **block_kwargs))
                attns.append(_attn_or_identity(out_ch, norm_num_groups, res in attention_resolutions))
                ch = out_ch
                skip_channels.append(ch)
            downsample = None
            if level != len(channel_mult) - 1:
                downsample = Downsample(ch)
                skip_channels.append(ch)
                res //= 2
            self.down_levels.append(DownLevel(resnets, attns, downsample))

        # 4. Middle: Resnet, Attn, Resnet at the lowest resolution.
        self.mid = MidBlock(ch, **block_kwargs)

        # 5. Up path: one more ResnetBlock per level than on the way down, each eating one skip.
        self.up_levels = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            resnets, attns = [], []
            for _ in range(layers_per_block + 1):
                resnets.append(ResnetBlock(ch + skip_channels.pop(), out_ch, **block_kwargs))
                attns.append(_attn_or_identity(out_ch, norm_num_groups, res in attention_resolutions))
                ch = out_ch
            upsample = None
            if level != 0:
                upsample = Upsample(ch)
                res *= 2
            self.up_levels.append(UpLevel(resnets, attns, upsample))

        # 6. Output head: GroupNorm, SiLU, 3x3 conv (zero-initialised, as in the paper's code).
        self.norm_out = nn.GroupNorm(norm_num_groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, kernel_size=3, padding=1)

        self.apply(_paper_init)
        for module in self.modules():
            if isinstance(module, (ResnetBlock, AttnBlock)):
                module.zero_init_last()
        nn.init.zeros_(self.conv_out.weight)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DDPMMnistUNet:
        """Build a randomly initialised model from a named entry of `PRESETS`, optionally overriding keys."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        """Names accepted by `from_preset`."""
        return tuple(PRESETS)

    @property
    def null_class_label(self) -> int | None:
        """The class id that stands for "no label" (classifier-free guidance), or None for an unconditional model."""
        return self.config.num_class_embeds

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDPMMnistUNetOutput | tuple[torch.Tensor]:
        """Predict the noise eps_theta(x_t, t[, y]) for a batch of noisy images x_t at diffusion step(s) t.

        `class_labels` (B,) are class ids in [0, num_class_embeds], the last one being the null class; a
        class-conditional model called without them predicts with the null class for every image.
        """
        self._check_sample(sample)
        timesteps = _broadcast_timesteps(timestep, sample.shape[0], sample.device)

        # 1. Timestep embedding, plus the class embedding of a conditional model.
        temb = self.time_embedding(timesteps)  # float32 timesteps; cast after the sinusoid
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(self._class_ids(class_labels, sample.shape[0], sample.device))
        elif class_labels is not None:
            raise ValueError(
                "class_labels were given to an unconditional model (num_class_embeds is None); call it without "
                "class_labels, or train a model with num_class_embeds."
            )

        # 2.-3. Input conv and down path; keep every activation for the skips.
        skips = [self.conv_in(sample)]
        for level in self.down_levels:
            skips.extend(level(skips[-1], temb))

        # 4. Middle.
        h = self.mid(skips[-1], temb)

        # 5. Up path (each level pops its skips off the end of the list).
        for level in self.up_levels:
            h = level(h, temb, skips)

        # 6. Output head.
        out = self.conv_out(F.silu(self.norm_out(h)))

        if not return_dict:
            return (out,)
        return DDPMMnistUNetOutput(sample=out)

    def _class_ids(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) class ids on `device`: the null class where no labels are given; a ValueError for bad ones."""
        if class_labels is None:
            return torch.full((batch,), self.null_class_label, dtype=torch.long, device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(
                f"class_labels must be ({batch},) integer class ids, one per sample, got shape {tuple(labels.shape)} "
                f"of {labels.dtype}."
            )
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= self.null_class_label:
            raise ValueError(
                f"class_labels must lie in [0, {self.null_class_label}] ({self.null_class_label} is the null class), "
                f"got {labels.min().item()}..{labels.max().item()}."
            )
        return labels.long()

    def _check_sample(self, sample: torch.Tensor) -> None:
        """Raise a ValueError if `sample` is not a (B, in_channels, sample_size, sample_size) batch."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if sample.ndim != 4 or tuple(sample.shape[1:]) != expected:
            raise ValueError(
                f"Expected sample of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) to match the "
                f"config (in_channels, sample_size), got {tuple(sample.shape)}; resize/pad the input or "
                "build the model with matching in_channels/sample_size."
            )


# ----------------------------------------------------------------------------------------------
# Small building blocks.


class TimestepEmbedding(nn.Module):
    """Transformer sinusoidal position encoding of t followed by the paper's two-layer MLP."""

    def __init__(self, base_channels: int, temb_channels: int) -> None:
        super().__init__()
        self.base_channels = base_channels
        self.linear_1 = nn.Linear(base_channels, temb_channels)
        self.linear_2 = nn.Linear(temb_channels, temb_channels)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Embed a (B,) tensor of (possibly fractional) timesteps into (B, temb_channels)."""
        # sin/cos order and frequency spacing exactly as diffusion_tf/nn.py:get_timestep_embedding.
        emb = get_timestep_embedding(timesteps, self.base_channels, flip_sin_to_cos=False, downscale_freq_shift=1).to(
            self.linear_1.weight.dtype
        )
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """The paper's residual block: (GN, SiLU, conv3x3) + Dense(SiLU(temb)), (GN, SiLU, dropout, conv3x3)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, groups: int):
        """Two 3x3 convs with a per-channel timestep bias in between; 1x1 conv skip if channels change."""
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def zero_init_last(self) -> None:
        """Zero the residual branch's last conv (``init_scale=0.`` in the paper's code)."""
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Return skip(x) + residual(x, temb)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """The paper's self-attention block: GN, single-head attention over the H*W positions, residual add; q, k, v and
    the output projection are per-position linear maps (the paper's ``nin`` layers)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def zero_init_last(self) -> None:
        """Zero the output projection (``init_scale=0.`` in the paper's code)."""
        nn.init.zeros_(self.to_out.weight)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """Return x + proj_out(softmax(q k^T / sqrt(C)) v); `temb` is unused, as in the paper."""
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        h = self.to_out(h).transpose(1, 2).reshape(b, c, height, width)  # a view with channels_last strides
        # x first: the sum takes x's contiguous layout. Adding in the other order (as diffusers' attention block does)
        # turns every later activation channels_last, where PyTorch's CPU GroupNorm is 3x (fp32) to 15x (bf16)
        # slower; that is what makes diffusers' UNet2DModel gain little from bf16 autocast (benchmarks/README.md).
        return x + h


class Downsample(nn.Module):
    """The paper's downsampling: a 3x3 conv with stride 2 (halves H and W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """The paper's upsampling: nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """One encoder resolution of the paper's U-Net: ResnetBlock(+AttnBlock) pairs, then a Downsample."""

    def __init__(self, resnets: list[ResnetBlock], attns: list[nn.Module], downsample: Downsample | None):
        """Wrap the level's blocks; `attns[i]` is an AttnBlock or Identity following `resnets[i]`."""
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attns = nn.ModuleList(attns)
        self.downsample = downsample

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> list[torch.Tensor]:
        """Return every intermediate activation (all become skips); the last one feeds the next level."""
        outputs = []
        for resnet, attn in zip(self.resnets, self.attns, strict=True):
            h = attn(resnet(h, temb))
            outputs.append(h)
        if self.downsample is not None:
            outputs.append(self.downsample(h))
        return outputs


class MidBlock(nn.Module):
    """The paper's middle of the U-Net: ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, temb_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.resnet_1 = ResnetBlock(channels, channels, temb_channels, dropout, groups)
        self.attn = AttnBlock(channels, groups)
        self.resnet_2 = ResnetBlock(channels, channels, temb_channels, dropout, groups)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.resnet_2(self.attn(self.resnet_1(x, temb)), temb)


class UpLevel(nn.Module):
    """One decoder resolution of the paper's U-Net: ResnetBlock(concat(h, skip))(+AttnBlock), Upsample."""

    def __init__(self, resnets: list[ResnetBlock], attns: list[nn.Module], upsample: Upsample | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attns = nn.ModuleList(attns)
        self.upsample = upsample

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Consume one skip per ResnetBlock from the end of `skips` (mutated in place)."""
        for resnet, attn in zip(self.resnets, self.attns, strict=True):
            h = attn(resnet(torch.cat([h, skips.pop()], dim=1), temb))
        if self.upsample is not None:
            h = self.upsample(h)
        return h


# ----------------------------------------------------------------------------------------------
# Helpers.


def _attn_or_identity(channels: int, groups: int, use_attention: bool) -> nn.Module:
    """An AttnBlock at attention resolutions, otherwise a no-op."""
    return AttnBlock(channels, groups) if use_attention else nn.Identity()


def _paper_init(module: nn.Module) -> None:
    """Paper's initialiser: variance scaling (fan_avg, uniform, scale 1) = Xavier-uniform, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _broadcast_timesteps(timestep: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
    """Turn an int/float, 0-d, (1,) or (B,) timestep into a float32 (B,) tensor on `device`."""
    t = torch.as_tensor(timestep, device=device).float()
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(
            f"timestep must be a scalar, a 0-d tensor, a (1,) tensor or a (B,)=({batch},) tensor, "
            f"got shape {tuple(t.shape)}; pass one timestep per sample."
        )
    return t.expand(batch)


def _validate_config(config: Any) -> None:
    """Raise a one-line ValueError naming the problem and the fix for an inconsistent config."""
    sample_size, base_channels, norm_num_groups = config.sample_size, config.base_channels, config.norm_num_groups
    channel_mult, attention_resolutions = tuple(config.channel_mult), tuple(config.attention_resolutions)
    if len(channel_mult) == 0 or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult={channel_mult} must be a non-empty tuple of positive integers.")
    sizes = ("sample_size", "in_channels", "out_channels", "base_channels", "layers_per_block", "norm_num_groups")
    if min(config[name] for name in sizes) < 1:
        raise ValueError(
            "sample_size, in_channels, out_channels, base_channels, layers_per_block and norm_num_groups "
            "must all be positive integers."
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout={config.dropout} must be in [0, 1).")
    factor = 2 ** (len(channel_mult) - 1)
    if sample_size % factor != 0:
        raise ValueError(
            f"sample_size={sample_size} is not divisible by 2**(len(channel_mult)-1)={factor}; "
            f"use a sample_size that is a multiple of {factor} (e.g. pad the images) or fewer levels."
        )
    for ch in sorted({base_channels * m for m in channel_mult}):
        if ch % norm_num_groups != 0:
            raise ValueError(
                f"channel count {ch} (base_channels * channel_mult) is not divisible by "
                f"norm_num_groups={norm_num_groups}; choose base_channels/norm_num_groups so that it is."
            )
    resolutions = [sample_size // 2**i for i in range(len(channel_mult))]
    bad = [r for r in attention_resolutions if r not in resolutions]
    if bad:
        raise ValueError(
            f"attention_resolutions {bad} are not level resolutions of this model; "
            f"pick from {resolutions} (sample_size halved per level)."
        )
