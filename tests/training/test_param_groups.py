"""Parameter groups: head / adapter learning rates, layer-wise decay (timm and generic matchers), no decay on 1-D."""

from __future__ import annotations

import pytest
import torch

from roadwork_cli.config import PeftSettings, TrainSettings
from roadwork_cli.model.backbones import create_backbone
from roadwork_cli.model.head import SelectiveHead
from roadwork_cli.model.peft import apply_adapters
from roadwork_cli.training.param_groups import create_finetune_optimizer, create_param_groups
from roadwork_cli.training.sam import FSAM


def _lr_and_decay_by_name(groups, *modules) -> dict[str, tuple[float, float]]:
    ids = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    found = {}
    for prefix, module in modules:
        for name, parameter in module.named_parameters():
            if id(parameter) in ids:
                found[f"{prefix}{name}"] = ids[id(parameter)]
    return found


def _adapted(name: str, method: str = "dora"):
    return apply_adapters(create_backbone(name), PeftSettings(method=method, rank=4))


def test_layer_decay_on_a_timm_vit_and_separate_head_rate():
    backbone, head = _adapted("tiny_vit"), SelectiveHead(32, hidden=8)
    settings = TrainSettings(lr=1e-4, head_lr=1e-2, adapter_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    groups = create_param_groups(head, backbone, settings)
    found = _lr_and_decay_by_name(groups, ("head.", head), ("", backbone.model))
    # Every trainable parameter exactly once, nothing frozen.
    trainable = [p for p in list(head.parameters()) + list(backbone.parameters()) if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(found)
    # timm's ViT matcher: stem 0, blocks.0 -> 1, blocks.1 (+ final norm) -> 2, the head on top (3).
    assert found["blocks.0.attn.qkv.lora_A.default.weight"] == (pytest.approx(1e-3 * 0.25), 0.05)
    assert found["blocks.1.mlp.fc2.lora_B.default.weight"] == (pytest.approx(1e-3 * 0.5), 0.05)
    assert found["blocks.1.attn.qkv.lora_magnitude_vector.default.weight"] == (pytest.approx(1e-3 * 0.5), 0.0)
    head_rates = {v for k, v in found.items() if k.startswith("head.")}
    assert {lr for lr, _ in head_rates} == {1e-2} and {wd for _, wd in head_rates} == {0.0, 0.05}
    assert all(wd == 0.0 for k, (_, wd) in found.items() if "bias" in k)


def test_defaults_use_train_lr_without_layer_decay():
    backbone, head = _adapted("tiny_dinov3", "doran"), SelectiveHead(32, hidden=8)
    groups = create_param_groups(head, backbone, TrainSettings(lr=3e-4))
    assert {g["lr"] for g in groups} == {3e-4}
    found = _lr_and_decay_by_name(groups, ("", backbone.model))
    assert found["blocks.0.attn.qkv.theta"][1] == 0.0 and found["blocks.0.attn.qkv.magnitude"][1] == 0.0
    assert found["blocks.0.attn.qkv.seed_a"][1] == 0.05
    assert create_param_groups(head, None, TrainSettings(lr=3e-4, head_lr=1e-3))[0]["lr"] == 1e-3


def test_generic_matcher_orders_transformers_layers(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16
    )
    DINOv3ViTModel(config).save_pretrained(tmp_path)
    backbone = apply_adapters(create_backbone(f"hf:{tmp_path}"), PeftSettings(method="lora", rank=2))
    groups = create_param_groups(SelectiveHead(32, hidden=0), backbone, TrainSettings(lr=1.0, layer_decay=0.5))
    found = _lr_and_decay_by_name(groups, ("", backbone.model))
    # embeddings 0, model.layer.{0,1,2} -> 1..3 (the final norm joins layer 2), the head on top (4).
    rates = [found[f"model.layer.{i}.attention.q_proj.lora_A.default.weight"][0] for i in range(3)]
    assert rates == pytest.approx([0.5**3, 0.5**2, 0.5])


def test_finetune_optimizer_steps_and_wraps_fsam():
    backbone, head = _adapted("tiny_vit", "lora"), SelectiveHead(32, hidden=8)
    optimizer = create_finetune_optimizer(head, backbone, TrainSettings(optimizer="fsam", layer_decay=0.8))
    assert isinstance(optimizer, FSAM)
    x = torch.randn(4, 3, 64, 64)
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    def closure():
        loss = head(backbone(x)).cls.pow(2).mean()
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)
    after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_schedule_keeps_each_group_at_its_own_share_of_the_peak():
    """Warm-up, then cosine down to 1 % of each group's own rate: layer decay holds to the last step."""
    from roadwork_cli.training.optim import create_scheduler

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    peaks = [1e-3, 1e-3 * 0.65**13, 5e-3]  # e.g. the base rate, a deep layer under layer decay, a head rate
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, peaks, strict=True)])
    scheduler = create_scheduler(optimizer, TrainSettings(epochs=4, warmup_epochs=1.0, lr=1e-3), steps_per_epoch=5)
    rates = []
    for _ in range(20):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    rates.append([group["lr"] for group in optimizer.param_groups])
    for k, peak in enumerate(peaks):
        assert rates[0][k] == pytest.approx(peak / 6)  # warm-up over 5 steps starts at 1/6
        assert max(r[k] for r in rates) == pytest.approx(peak)
        assert rates[-1][k] == pytest.approx(0.01 * peak)
    assert all(r[1] / r[0] == pytest.approx(peaks[1] / peaks[0]) for r in rates)
