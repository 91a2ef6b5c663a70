"""Fixtures shared across the test folders."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hf_dinov3_dir(tmp_path_factory) -> Path:
    """A tiny transformers DINOv3 ViT saved locally (random weights), loaded as ``hf:<dir>``."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    path = tmp_path_factory.mktemp("hf_dinov3")
    config = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    DINOv3ViTModel(config).eval().save_pretrained(path)
    return path
