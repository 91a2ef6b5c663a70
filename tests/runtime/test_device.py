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


def test_a_gpu_this_machine_lacks_is_a_usage_error_naming_the_device(monkeypatch):
    from roadwork_cli.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UsageError, match=f"--device {name} asks for a CUDA GPU") as caught:
            resolve_device(name)
        assert caught.value.exit_code == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UsageError, match="names GPU 2, but this machine has 2"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(UsageError, match="not a device"):
        resolve_device("gpu")


def test_auto_never_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
