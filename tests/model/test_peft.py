"""Adapters: target resolution, LoRA/DoRA through peft, DoRAN vs DoRA in its limit, merging, frozen BatchNorm."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from roadwork_cli.config import PeftSettings
from roadwork_cli.errors import UsageError
from roadwork_cli.model.backbones import create_backbone
from roadwork_cli.model.peft import (
    DoranGenerator,
    DoranLinear,
    apply_adapters,
    create_adapter,
    list_adapter_methods,
    merge_adapters,
    resolve_target_modules,
)


def _backbone(name: str, hf_dir=None):
    if name == "hf":
        return create_backbone(f"hf:{hf_dir}")
    if name == "efficientnet_lite0":
        return create_backbone(name, image_size=64)  # a conv net takes any size; 64 px keeps the test fast
    backbone = create_backbone(name)
    if name == "tiny_dinov3":
        # Random-init layer scale (1e-5) hides every change inside the blocks; trained DINOv3 scales are O(0.1-1).
        with torch.no_grad():
            for parameter_name, parameter in backbone.model.named_parameters():
                if ".gamma_" in parameter_name:
                    parameter.fill_(1.0)
    return backbone


def _images(backbone, n: int = 4, seed: int = 0) -> torch.Tensor:
    size = backbone.preprocessing.size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _perturb_adapters(module: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its initialisation (LoRA's B starts at zero, hiding bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def test_registry_lists_the_methods():
    assert list_adapter_methods() == ["dora", "doran", "lora", "none"]
    with pytest.raises(UsageError, match="Unknown adapter method"):
        create_adapter("ia3", nn.Linear(2, 2), [], PeftSettings())


# ----------------------------------------------------------------------------------------------------------- targets


def test_default_targets_per_family(hf_dinov3_dir):
    vit = resolve_target_modules(create_backbone("tiny_vit"), None)
    assert vit == [f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert resolve_target_modules(create_backbone("tiny_dinov3"), None) == vit
    hf = resolve_target_modules(create_backbone(f"hf:{hf_dinov3_dir}"), None)
    assert sorted(hf) == sorted(
        f"model.layer.{i}.{m}"
        for i in (0, 1)
        for m in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
        + ("mlp.up_proj", "mlp.down_proj")
    )


def test_efficientnet_default_targets_are_exactly_its_pointwise_convolutions():
    network = create_backbone("efficientnet_lite0", image_size=32).model
    targets = resolve_target_modules(network, None)
    pointwise = [
        name
        for name, module in network.named_modules()
        if type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1
    ]
    assert targets == pointwise and "conv_head" in targets and len(targets) == 32  # 1 + 2 x 15 blocks + head


def test_suffixes_never_reach_layers_outside_blocks():
    network = create_backbone("tiny_vit").model
    assert resolve_target_modules(network, ["proj"]) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert resolve_target_modules(network, ["patch_embed.proj"]) == ["patch_embed.proj"]


def test_unknown_target_modules_are_a_usage_error_listing_candidates():
    backbone = create_backbone("tiny_vit")
    with pytest.raises(UsageError, match=r"'q_proj' matches no Linear or Conv2d.*Candidates: .*fc1.*qkv") as info:
        apply_adapters(backbone, PeftSettings(method="lora", target_modules=["qkv", "q_proj"]))
    assert "patch_embed.proj" in str(info.value)
    assert not any(p.requires_grad for p in backbone.parameters())  # nothing was injected
    with pytest.raises(UsageError, match=r"target_modules is empty.*qkv"):
        apply_adapters(backbone, PeftSettings(method="dora", target_modules=[]))


def test_no_default_targets_for_an_unknown_family():
    with pytest.raises(UsageError, match=r"no default set of adapter target layers.*target_modules.*'?0"):
        apply_adapters(nn.Sequential(nn.Linear(3, 3)), PeftSettings(method="lora"))


# -------------------------------------------------------------------------------------------------------------- DoRAN


@pytest.mark.parametrize("name", ["tiny_vit", "hf"])
def test_doran_without_stabiliser_and_generator_equals_peft_dora(name, hf_dinov3_dir):
    """Same A, B and m: DoRAN with softplus(theta) -> 0 and fixed factors computes what peft's DoRA computes."""
    dora = apply_adapters(_backbone(name, hf_dinov3_dir), PeftSettings(method="dora", rank=4, dropout=0.0))
    doran = apply_adapters(
        _backbone(name, hf_dinov3_dir),
        PeftSettings(method="doran", rank=4, dropout=0.0, doran_stabilizer=False, doran_generator_hidden=0),
    )
    _perturb_adapters(dora.model, scale=0.2)
    copied = 0
    with torch.no_grad():
        for module_name, layer in doran.model.named_modules():
            if isinstance(layer, DoranLinear):
                assert layer.theta is None and layer.factors()[0] is layer.seed_a
                reference = dora.model.get_submodule(module_name)
                layer.seed_a.copy_(reference.lora_A["default"].weight)
                layer.seed_b.copy_(reference.lora_B["default"].weight)
                layer.magnitude.copy_(reference.lora_magnitude_vector["default"].weight)
                copied += 1
    assert copied == 8 if name == "tiny_vit" else copied == 12
    x = _images(dora, n=3)
    dora.eval()
    doran.eval()
    with torch.no_grad():
        expected, got = dora(x), doran(x)
    difference = (got - expected).abs().max().item()
    print(f"max |DoRAN - DoRA| on {name}: {difference:.3e}")
    assert difference <= 1e-5
    # The comparison is not vacuous: the perturbed adapters move the features well away from the base model's.
    with torch.no_grad():
        base = _backbone(name, hf_dinov3_dir)(x)
    assert (expected - base).abs().max().item() > 1e-2


def _layer_pair(dropout: float = 0.0, seed: int = 0) -> tuple[nn.Module, DoranLinear]:
    """One linear layer adapted by peft's DoRA and by DoRAN in its limit, on the same W0, A, B and m (B, m moved)."""
    torch.manual_seed(seed)
    base = nn.Linear(12, 10)
    dora = nn.Sequential(copy.deepcopy(base))
    create_adapter("dora", dora, ["0"], PeftSettings(method="dora", rank=4, dropout=dropout))
    doran = nn.Sequential(copy.deepcopy(base))
    limit = PeftSettings(method="doran", rank=4, dropout=dropout, doran_stabilizer=False, doran_generator_hidden=0)
    create_adapter("doran", doran, ["0"], limit)
    _perturb_adapters(dora, scale=0.3, seed=seed + 1)  # B away from zero, m away from ||W0||: every path carries signal
    reference, layer = dora[0], doran[0]
    with torch.no_grad():
        layer.seed_a.copy_(reference.lora_A["default"].weight)
        layer.seed_b.copy_(reference.lora_B["default"].weight)
        layer.magnitude.copy_(reference.lora_magnitude_vector["default"].weight)
    return reference, layer


def test_doran_gradient_is_doras_plus_the_norm_path_that_dora_detaches():
    """In the limit the forward passes agree; the gradients differ by exactly the term of the non-detached norm.

    peft's DoRA treats ``||V||`` (V = W0 + s BA) as a constant. DoRAN keeps it in the graph (the stabiliser's point),
    which adds, per output row i, ``-c_i V_i / ||V_i||`` to the gradient with respect to V, with
    ``c_i = m_i / ||V_i||^2 * sum_batch g_i (V_i . x)`` (g the upstream gradient). The magnitude's gradient is the same.
    A DoRAN that detached its norm would match DoRA's factor gradients and fail here.
    """
    reference, layer = _layer_pair()
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(32, 10, generator=torch.Generator().manual_seed(6))
    reference.train(), layer.train()
    (reference(x) * upstream).sum().backward()
    (layer(x) * upstream).sum().backward()
    a, b, m = (t.detach() for t in (layer.seed_a, layer.seed_b, layer.magnitude))
    s = layer.scaling
    v = layer.base_layer.weight.detach() + s * b @ a
    norm = v.norm(dim=1)
    c = m / norm**2 * (upstream * (x @ v.T)).sum(dim=0)
    norm_path = -(c / norm)[:, None] * v  # d loss / d V through ||V|| only
    expected_b = reference.lora_B["default"].weight.grad + s * norm_path @ a.T
    expected_a = reference.lora_A["default"].weight.grad + s * b.T @ norm_path
    torch.testing.assert_close(layer.magnitude.grad, reference.lora_magnitude_vector["default"].weight.grad)
    torch.testing.assert_close(layer.seed_b.grad, expected_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.seed_a.grad, expected_a, rtol=1e-4, atol=1e-5)
    # Not vacuous: the norm path is a large part of the factor gradients, so a detached norm could not pass.
    assert (s * norm_path @ a.T).norm() > 0.1 * layer.seed_b.grad.norm()
    assert (s * b.T @ norm_path).norm() > 0.1 * layer.seed_a.grad.norm()


@pytest.mark.parametrize("method", ["doran", "dora"])
def test_train_mode_dropout_averages_to_the_eval_output(method):
    """Dropout on the adapter input is unbiased: over many draws the train-mode output's mean is the eval output.

    Per output element, the mean of n draws is within 5 standard errors of the eval output (normal approximation; for
    40 elements the chance that any is further by chance is below 1e-5).
    """
    reference, layer = _layer_pair(dropout=0.3, seed=2)
    module = layer if method == "doran" else reference
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(7))
    module.eval()
    with torch.no_grad():
        expected = module(x)
    module.train()
    torch.manual_seed(8)
    n = 4000
    with torch.no_grad():
        draws = torch.stack([module(x) for _ in range(n)])
    mean, standard_error = draws.mean(dim=0), draws.std(dim=0) / n**0.5
    assert standard_error.min() > 0  # the draws do differ: dropout is on
    z = ((mean - expected) / standard_error).abs()
    assert z.max().item() < 5.0, z.max().item()


def test_doran_starts_as_the_base_layer_and_trains_every_part():
    base = create_backbone("tiny_vit")
    x = _images(base)
    with torch.no_grad():
        reference = base(x)
    adapted = apply_adapters(create_backbone("tiny_vit"), PeftSettings(method="doran", rank=4))
    adapted.eval()
    with torch.no_grad():
        assert (adapted(x) - reference).abs().max().item() <= 1e-5
    # One generator per block, shared by that block's projections (qkv, proj, fc1, fc2).
    for index in (0, 1):
        block = adapted.model.blocks[index]
        generator = block.doran_generator
        assert isinstance(generator, DoranGenerator)
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(layer, DoranLinear) and layer._generator[0] is generator
    assert adapted.model.blocks[0].doran_generator is not adapted.model.blocks[1].doran_generator
    # A deep copy (the EMA model) keeps the sharing: its layers use its own generator, not the original's.
    twin = copy.deepcopy(adapted)
    assert twin.model.blocks[0].attn.qkv._generator[0] is twin.model.blocks[0].doran_generator
    assert twin.model.blocks[0].doran_generator is not adapted.model.blocks[0].doran_generator
    _perturb_adapters(adapted.model)
    adapted.train()
    adapted(x).pow(2).mean().backward()
    trainable = {n: p for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), [
        n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0
    ]
    assert any(".theta" in n for n in trainable) and any("doran_generator.a_out" in n for n in trainable)


def test_doran_falls_back_to_dora_with_one_warning_naming_the_layers():
    backbone = create_backbone("tiny_vit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_adapters(backbone, PeftSettings(method="doran", rank=4, target_modules=["qkv", "patch_embed.proj"]))
    ours = [w for w in caught if "DoRAN" in str(w.message)]
    assert len(ours) == 1 and "patch_embed.proj" in str(ours[0].message) and "qkv" not in str(ours[0].message)
    assert isinstance(backbone.model.blocks[0].attn.qkv, DoranLinear)
    assert hasattr(backbone.model.patch_embed.proj, "lora_magnitude_vector")  # peft's DoRA on the Conv2d


# ------------------------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize(
    ("name", "method"),
    [("tiny_vit", "lora"), ("tiny_vit", "dora"), ("tiny_vit", "doran"), ("hf", "doran"), ("tiny_dinov3", "doran")],
)
def test_merge_gives_plain_weights_with_the_same_outputs(name, method, hf_dinov3_dir):
    backbone = _backbone(name, hf_dinov3_dir)
    base_keys, base_fingerprint = set(backbone.model.state_dict()), backbone.fingerprint
    apply_adapters(backbone, PeftSettings(method=method, rank=4))
    _perturb_adapters(backbone.model)
    backbone.eval()
    x = _images(backbone)
    with torch.no_grad():
        adapted = backbone(x)
    merged = merge_adapters(backbone)
    with torch.no_grad():
        difference = (merged(x) - adapted).abs().max().item()
    assert difference <= 1e-5
    state = merged.model.state_dict()
    assert set(state) == base_keys
    save_safetensors({k: v.contiguous() for k, v in state.items()})  # no shared tensors, nothing but plain weights
    assert not any(p.requires_grad for p in merged.parameters()) and merged.frozen
    assert merged.fingerprint != base_fingerprint
    assert not any(isinstance(m, DoranLinear | DoranGenerator) for m in merged.modules())


# --------------------------------------------------------------------------------------------- training behaviour


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("tiny_vit", "lora"),
        ("tiny_vit", "doran"),
        ("tiny_dinov3", "dora"),
        ("tiny_dinov3", "doran"),
        ("hf", "doran"),
        ("hf", "lora"),
        ("efficientnet_lite0", "dora"),
    ],
)
def test_adapters_lower_a_loss_in_a_few_steps(name, method, hf_dinov3_dir):
    """Only the adapters train (features regressed onto fixed random targets); BatchNorm statistics never move."""
    backbone = apply_adapters(_backbone(name, hf_dinov3_dir), PeftSettings(method=method, rank=4, dropout=0.1))
    frozen_before = {k: v.clone() for k, v in backbone.model.state_dict().items() if "running_" in k}
    x = _images(backbone, n=8)
    targets = torch.randn(8, backbone.feature_dim, generator=torch.Generator().manual_seed(2))
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(backbone.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(backbone(x), targets)

    backbone.train()
    losses = []
    for _ in range(5 if name == "efficientnet_lite0" else 8):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert backbone.model.training  # adapters' dropout follows train()
    norms = [m for m in backbone.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(not m.training for m in norms)
    for key, before in frozen_before.items():
        torch.testing.assert_close(backbone.model.state_dict()[key], before, rtol=0, atol=0)
    backbone.eval()
    with torch.no_grad():
        final = loss().item()
    assert final < 0.9 * losses[0], (losses, final)


def test_method_none_leaves_the_backbone_frozen():
    backbone = create_backbone("tiny_vit")
    assert apply_adapters(backbone, PeftSettings(method="none")) is backbone
    assert backbone.frozen and not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("method", ["lora", "doran"])
def test_eva_fused_qkv_with_biases_uses_the_adapter(method):
    """timm's Eva with q/v biases bypasses qkv's forward unless it is switched to its bias-separate mode."""
    import timm

    torch.manual_seed(0)
    network = timm.create_model(
        "vit_small_patch16_dinov3",
        pretrained=False,
        num_classes=0,
        qkv_bias=True,
        embed_dim=32,
        depth=1,
        num_heads=2,
        img_size=32,
        init_values=None,
    ).eval()
    with torch.no_grad():
        network.blocks[0].attn.q_bias.normal_()
        network.blocks[0].attn.v_bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = network(x)
    apply_adapters(network, PeftSettings(method=method, rank=2, target_modules=["qkv"]))
    network.eval()
    with torch.no_grad():
        # The same function before training (the biases are still added; mm + add rounds unlike addmm).
        assert (network(x) - base).abs().max().item() <= 1e-4
    calls = []
    network.blocks[0].attn.qkv.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    with torch.no_grad():
        network(x)
    assert len(calls) == 1  # the adapted layer's own forward runs (F.linear on its weight would skip the adapter)
