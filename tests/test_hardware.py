"""The automatic precision: bf16 exactly where the hardware computes it natively, fp32 elsewhere."""

import pytest
import torch

from ddpm_mnist.hardware import (
    BF16_CPU_FLAGS,
    auto_mixed_precision,
    describe_device,
    has_native_bf16,
    idle_cores_warning,
)

# CPU flag sets as /proc/cpuinfo spells them (trimmed): the machines this project has run on, and older ones.
AVX2_ONLY = frozenset("fpu sse sse2 avx avx2 fma f16c".split())
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16"}  # AMD Zen 4/5, Intel Cooper Lake
AMX = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}  # Intel Sapphire Rapids and later
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni"}  # Intel Skylake/Cascade Lake


@pytest.mark.parametrize(
    "flags, expected",
    [(AVX2_ONLY, "no"), (AVX512_NO_BF16, "no"), (AVX512_BF16, "bf16"), (AMX, "bf16"), (frozenset(), "no")],
    ids=["avx2-only", "avx512-without-bf16", "avx512-bf16", "amx", "unknown"],
)
def test_the_automatic_choice_on_a_cpu_follows_its_bf16_instructions(flags, expected):
    assert auto_mixed_precision("cpu", cpu_flags=flags) == expected
    assert has_native_bf16(torch.device("cpu"), cpu_flags=flags) == (expected == "bf16")


def test_the_bf16_flags_are_the_ones_linux_reports():
    assert set(BF16_CPU_FLAGS) == {"amx_bf16", "avx512_bf16"}


def test_the_device_description_names_the_cpu_and_its_threads():
    description = describe_device("cpu")
    assert description.startswith("CPU ") and f"({torch.get_num_threads()} threads; " in description


@pytest.mark.parametrize(
    "threads, processes, cores, launch",
    [(1, 1, 2, "--num_processes 1"), (1, 2, 4, "--num_processes 2"), (2, 1, 8, "--num_processes 1")],
)
def test_training_that_leaves_cores_idle_is_told_how_to_launch(threads, processes, cores, launch):
    warning = idle_cores_warning(threads, processes, cores)
    assert warning is not None and launch in warning and f"OMP_NUM_THREADS={cores // processes}" in warning
    assert "\n" not in warning


@pytest.mark.parametrize("threads, processes, cores", [(2, 1, 2), (1, 2, 2), (8, 1, 4), (1, 3, 2)])
def test_training_that_uses_every_core_gets_no_warning(threads, processes, cores):
    assert idle_cores_warning(threads, processes, cores) is None
