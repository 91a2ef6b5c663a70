"""Device and precision resolution, and reduced-precision features kept apart from fp32 ones."""

import pytest
import torch

from roadwork_cli.runtime.device import autocast, compute_dtype, precision_tag, resolve_device


def test_auto_is_fp32_on_cpu_and_explicit_precisions_are_honoured():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert compute_dtype(cpu, "auto") is None
    assert compute_dtype(cpu, "fp32") is None
    assert compute_dtype(cpu, "bf16") is torch.bfloat16
    assert precision_tag(compute_dtype(cpu, "fp16")) == "fp16"
    with pytest.raises(ValueError, match="precision"):
        compute_dtype(cpu, "int8")


def test_autocast_runs_matmuls_in_the_requested_dtype():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert layer(x).dtype == torch.float32
