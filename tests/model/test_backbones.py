"""Backbone registry: names, tiny models, fingerprints, local timm/transformers loading, offline errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.errors import UsageError
from roadwork_cli.model import backbones
from roadwork_cli.model.backbones import create_backbone, list_backbones, load_state_dict_file


def test_registry_lists_every_documented_name():
    names = list_backbones()
    for name in (
        "dinov3_vits16",
        "dinov3_vitsp16",
        "dinov3_vitb16",
        "dinov3_vitl16",
        "dinov3_convnext_tiny",
        "efficientnet_lite0",
        "tiny_vit",
        "tiny_dinov3",
    ):
        assert name in names
    assert names == sorted(names)
    assert all(isinstance(text, str) and text for text in list_backbones(with_descriptions=True).values())


def test_register_backbone_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        backbones.register_backbone("tiny_vit")(lambda weights, image_size: None)


def test_unknown_name_is_a_usage_error_listing_choices():
    with pytest.raises(UsageError, match="efficientnet_lite0"):
        create_backbone("no_such_backbone")


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_dinov3"])
def test_tiny_backbones_forward_and_describe_themselves(name):
    backbone = create_backbone(name)
    size = backbone.preprocessing.size
    features = backbone(torch.randn(3, 3, size, size))
    assert features.shape == (3, backbone.feature_dim) == (3, 32)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.model.training  # frozen: train() must not switch dropout/BN on
    spec = json.loads(json.dumps(backbone.spec))
    assert spec["name"] == name and spec["feature_dim"] == 32 and spec["fingerprint"] == backbone.fingerprint
    # Deterministic init: the same name gives the same weights, hence the same fingerprint.
    assert create_backbone(spec["name"], spec["weights"], spec["image_size"]).fingerprint == backbone.fingerprint


def test_fingerprint_separates_backbones_and_preprocessing():
    vit, dino = create_backbone("tiny_vit"), create_backbone("tiny_dinov3")
    vit_small = create_backbone("tiny_vit", image_size=32)
    assert len({vit.fingerprint, dino.fingerprint, vit_small.fingerprint}) == 3
    assert vit_small.preprocessing.size == 32
    assert vit_small(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_preprocessing_round_trips_through_json():
    pre = Preprocessing(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=0.9)
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    """Mapped by order with every shape checked; real photos land on sensible ImageNet classes."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from roadwork_cli.data.transforms import eval_transform

    backbone = create_backbone("efficientnet_lite0")
    assert backbone.feature_dim == 1280
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.size == 224
    package = load_state_dict_file(backbones.efficientnet_lite0_weights_file())
    transform = eval_transform(backbone.preprocessing)
    batch = torch.stack([transform(Image.fromarray(load_sample_image(n))) for n in ("china.jpg", "flower.jpg")])
    with torch.inference_mode():
        logits = backbone(batch) @ package["_fc.weight"].T + package["_fc.bias"]  # (2, 1000)
    top5 = logits.topk(5).indices.tolist()
    # china.jpg is a temple: bell cote 442, boathouse 449, church 497, monastery 663, palace 698.
    assert {442, 449, 497, 663, 698} & set(top5[0])
    assert 985 in top5[1]  # flower.jpg: daisy


def test_efficientnet_lite0_mapping_fails_loudly_on_a_shape_mismatch():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    state = load_state_dict_file(backbones.efficientnet_lite0_weights_file())
    state["_blocks.0._depthwise_conv.weight"] = torch.zeros(32, 1, 5, 5)
    with pytest.raises(UsageError, match="do not map onto timm by order"):
        backbones.map_efficientnet_lite0_state(state, model)
    state.pop("_blocks.0._depthwise_conv.weight")
    with pytest.raises(UsageError, match="tensors"):
        backbones.map_efficientnet_lite0_state(state, model)


def test_timm_backbone_from_a_local_weights_file(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    path = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = create_backbone("timm:test_vit", weights=path)
    x = torch.randn(2, 3, backbone.preprocessing.size, backbone.preprocessing.size)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), source(x))
    assert backbone.spec["weights"] == str(path)
    # A torch state dict works too and gives the same fingerprint (same tensors).
    pt_path = tmp_path / "test_vit.pt"
    torch.save(source.state_dict(), pt_path)
    assert create_backbone("timm:test_vit", weights=pt_path).fingerprint == backbone.fingerprint
    assert create_backbone("timm:test_vit", pretrained=False).fingerprint != backbone.fingerprint


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.norm1.weight": torch.ones(7)}, str(path))
    with pytest.raises(UsageError, match="do not fit"):
        create_backbone("timm:test_vit", weights=path)
    with pytest.raises(UsageError, match="does not exist"):
        create_backbone("tiny_vit", weights=tmp_path / "missing.safetensors")


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(1), "payload": object()}, path)
    with pytest.raises(UsageError, match="Cannot read"):
        load_state_dict_file(path)


def test_offline_hub_miss_names_the_file_and_the_weights_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "_hub_cached_file", lambda repo: None)
    with pytest.raises(UsageError) as info:
        create_backbone("dinov3_vits16")
    message = str(info.value)
    assert "timm/vit_small_patch16_dinov3.lvd1689m" in message and "--weights" in message
    assert "\n" not in message


def test_offline_hf_repo_miss_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="--weights"):
        create_backbone("hf:some-org/not-in-the-cache")


def test_hf_backbone_from_a_local_directory(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    model = ViTModel(config).eval()
    model.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path
    )
    backbone = create_backbone(f"hf:{tmp_path}")
    assert backbone.feature_dim == 32
    assert backbone.preprocessing.size == 32 and backbone.preprocessing.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), model(pixel_values=x).pooler_output)


def test_hf_missing_local_directory_contents_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="Cannot load"):
        create_backbone(f"hf:{tmp_path}")


def test_dinov3_entry_loads_a_local_weights_file_with_cls_pooling(tmp_path):
    """The pro path offline: timm's DINOv3 ViT-S/16 architecture + `--weights FILE` (here random weights)."""
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, global_pool="token")
    path = tmp_path / "dinov3_vits16.safetensors"
    save_file({k: v.contiguous() for k, v in source.eval().state_dict().items()}, str(path))
    backbone = create_backbone("dinov3_vits16", weights=path, image_size=64)
    assert backbone.feature_dim == 384 and backbone.pooling == "token"
    assert backbone.spec["weights"] == str(path) and backbone.preprocessing.size == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), source(x))


def test_unknown_timm_model_is_a_usage_error():
    with pytest.raises(UsageError, match="timm has no model"):
        create_backbone("timm:not_a_model_at_all")
