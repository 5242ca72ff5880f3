"""Tests for `ddpm_mnist.deprecation`: earlier flag and value spellings parse as the new ones, with one warning line."""

import argparse

import pytest

from ddpm_mnist.deprecation import DTYPE_RENAMES, MIXED_PRECISION_RENAMES, add_renamed_flag, renamed_values


def test_an_earlier_value_becomes_the_new_one_with_a_warning(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", type=renamed_values(DTYPE_RENAMES, "--dtype"), choices=["fp32", "bf16", "fp16"])
    mixed = renamed_values(MIXED_PRECISION_RENAMES, "--mixed_precision")
    parser.add_argument("--mixed_precision", type=mixed, choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(["--dtype", "bfloat16", "--mixed_precision", "no"])
    assert (args.dtype, args.mixed_precision) == ("bf16", "fp32")
    assert capsys.readouterr().err.splitlines() == [
        "warning: --dtype bfloat16 is deprecated; use --dtype bf16.",
        "warning: --mixed_precision no is deprecated; use --mixed_precision fp32.",
    ]
    assert parser.parse_args(["--dtype", "fp16"]).dtype == "fp16" and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float64"])  # neither spelling: still refused by choices
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_an_earlier_flag_fills_the_new_flags_destination_with_a_warning(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"], help="dtypes")
    add_renamed_flag(parser, "--precisions", "--dtypes")
    assert parser.parse_args([]).dtypes == ["fp32", "bf16"] and capsys.readouterr().err == ""
    assert parser.parse_args(["--precisions", "bf16"]).dtypes == ["bf16"]
    assert capsys.readouterr().err == "warning: --precisions is deprecated; use --dtypes.\n"
    assert "--precisions" not in parser.format_help() and "--dtypes" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--precisions", "fp64"])
