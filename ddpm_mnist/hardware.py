"""What the machine offers: a readable name for a device, and whether it does bf16 arithmetic natively.

Used by training (the automatic `--mixed_precision`), by the benchmarks (which say where they ran) and by the model
card's hardware line. bf16 pays only where the hardware has bf16 instructions: a CUDA GPU of compute capability 8.0
or newer, or a CPU with AMX-BF16 or AVX512-BF16, where oneDNN runs bf16 matmuls and convolutions several times faster
than fp32. Elsewhere (an AVX2-only CPU) bf16 is emulated and slower, so the automatic choice stays fp32 there.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

# CPU feature flags (as /proc/cpuinfo spells them) that mean native bf16 arithmetic, and the ones worth printing.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


@cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags (Linux's /proc/cpuinfo; elsewhere the platform's name, no flags)."""
    fields: dict[str, str] = {}  # the first CPU's
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", platform.processor() or platform.machine())
    return model, frozenset(fields.get("flags", "").split())


def has_native_bf16(device: torch.device | str, cpu_flags: frozenset[str] | None = None) -> bool:
    """Whether `device` computes in bf16 natively: CUDA with bf16 support, or a CPU with AMX-BF16 / AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        flags = cpu_info()[1] if cpu_flags is None else cpu_flags
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    return False


def auto_mixed_precision(device: torch.device | str, cpu_flags: frozenset[str] | None = None) -> str:
    """The mixed precision to train with on `device` when the user chose none: "bf16" where native, else "no"."""
    return "bf16" if has_native_bf16(device, cpu_flags) else "no"


def describe_device(device: torch.device | str) -> str:
    """A human name for a device: the GPU's name, or the CPU's model with its threads and relevant ISA flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = cpu_info()
    isa = ", ".join(flag for flag in REPORTED_CPU_FLAGS if flag in flags) or "no flags known"
    return f"CPU {model} ({torch.get_num_threads()} threads; {isa})"


def idle_cores_warning(threads_per_process: int, num_processes: int, physical_cores: int) -> str | None:
    """A one-line warning when CPU training leaves physical cores idle, with the launch that uses them; else None.

    `accelerate launch --cpu train.py` without `--num_processes` runs one process on one thread (accelerate 1.x sets
    its per-process threads from the physical cores only when the number of processes is given), which on a 2-core
    machine halves the speed.
    """
    share = physical_cores // max(num_processes, 1)
    if threads_per_process >= share:
        return None
    return (
        f"training uses {threads_per_process} CPU thread(s) in each of {num_processes} process(es) while the machine "
        f"has {physical_cores} cores: unless that is meant, launch with `accelerate launch --cpu --num_processes "
        f"{num_processes} ...` (without --num_cpu_threads_per_process) or set OMP_NUM_THREADS={share} to use them all."
    )
