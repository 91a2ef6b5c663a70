"""``data.decoder: cuda``: GPU JPEG batches equal the PIL path within the stated tolerance, with a fingerprint of
their own, and refused (exit 2) where there is no CUDA.

The decoder-independent half (header reading, draft reduction, EXIF orientation, resize, crop, fallbacks) runs on
every machine with torchvision's CPU libjpeg decoder in nvjpeg's place; the nvjpeg half needs a CUDA GPU.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from roadwork_cli.data.decode import (
    CUDA_DECODE_TOLERANCE,
    DecodeRecipe,
    GpuDecodeLoader,
    ImageDataset,
    check_decoder,
    create_loader,
    jpeg_orientation,
    recipe_record,
)
from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.errors import UsageError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg decoding needs a CUDA GPU")


def scene(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, noise and sharp-edged blocks: the hard case for two different decoders and resize filters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.float32)
    pixels += rng.normal(0, 20, pixels.shape)
    for _ in range(20):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, max(11, width // 8))
        pixels[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def jpeg(image: Image.Image, orientation: int = 1, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# (width, height, EXIF orientation): no draft, 1/2..1/8 drafts, a phone photo, odd sizes, every rotation/flip.
SHAPES = [(640, 480, 1), (1200, 900, 1), (4032, 3024, 6), (900, 1200, 6), (1000, 700, 3), (800, 600, 8)]
SHAPES += [(700, 500, o) for o in (2, 4, 5, 7)]


@pytest.fixture(scope="module")
def inputs() -> list[bytes]:
    items = [jpeg(scene(w, h, k), o) for k, (w, h, o) in enumerate(SHAPES)]
    items.append(jpeg(scene(300, 200, 99).convert("L")))  # greyscale JPEG: nvjpeg's RGB mode expands it
    items.append(png(scene(300, 200, 98)))  # not a JPEG: the PIL path
    items.append(jpeg(scene(300, 200, 97))[:400])  # truncated: rejected with a reason
    return items


def assert_close_to_pil(dataset: ImageDataset, batches, device: torch.device) -> None:
    reference = [dataset[i] for i in range(len(dataset))]
    seen: set[int] = set()
    for indices, pixels, failed in GpuDecodeLoader(dataset, batches, workers=2, device=device):
        assert pixels is not None and pixels.device.type == device.type and pixels.dtype == torch.uint8
        for k, i in enumerate(indices):
            expected = reference[i][1]
            assert expected is not None, f"input {i} decoded on the GPU path but not on the PIL path"
            diff = (pixels[k].cpu().int() - expected.int()).abs().float()
            mean, p99 = float(diff.mean()), float(diff.flatten().quantile(0.99))
            assert mean <= CUDA_DECODE_TOLERANCE["mean_abs"], (i, mean)
            assert p99 <= CUDA_DECODE_TOLERANCE["p99_abs"], (i, p99)
        for i, reason in failed:
            assert reference[i][1] is None and reason == reference[i][2]
        seen |= set(indices) | {i for i, _ in failed}
    assert seen == set(range(len(dataset)))


@pytest.mark.parametrize("draft", [True, False])
@pytest.mark.parametrize(
    "preprocessing",
    [Preprocessing(224), Preprocessing(224, interpolation="bilinear", crop_pct=1.0), Preprocessing(64)],
    ids=["vit-bicubic", "bilinear-nocrop", "small"],
)
def test_gpu_path_with_the_cpu_jpeg_decoder_matches_pil_within_tolerance(inputs, preprocessing, draft):
    recipe = DecodeRecipe(preprocessing, jpeg_draft=draft, decoder="cuda")
    dataset = ImageDataset(inputs, recipe)
    assert_close_to_pil(dataset, [range(0, 7), range(7, len(inputs))], torch.device("cpu"))


def test_without_draft_the_gpu_path_is_within_three_grey_levels(inputs):
    """The resize + crop arithmetic is PIL's: only the filters' rounding differs (measured: mean <= 0.11, max 3)."""
    recipe = DecodeRecipe(Preprocessing(224), jpeg_draft=False, decoder="cuda")
    dataset = ImageDataset(inputs[:4], recipe)
    indices, pixels, _ = next(iter(GpuDecodeLoader(dataset, [range(4)], workers=1, device=torch.device("cpu"))))
    for k, i in enumerate(indices):
        diff = (pixels[k].int() - dataset[i][1].int()).abs()
        assert int(diff.max()) <= 3 and float(diff.float().mean()) <= 0.25


def test_augmented_items_and_other_formats_take_the_pil_path(inputs):
    from roadwork_cli.config import load_settings
    from roadwork_cli.data.transforms import augmentation_from_settings

    prep = Preprocessing(64)
    augment = augmentation_from_settings(load_settings(None, {}, environ={}).data, prep, output="uint8")
    recipe = DecodeRecipe(prep, decoder="cuda")
    seeds = [None, 7, None]
    dataset = ImageDataset([inputs[0], inputs[1], inputs[-2]], recipe, seeds=seeds, augment=augment)
    loader = GpuDecodeLoader(dataset, [[0, 1, 2]], workers=1, device=torch.device("cpu"))
    assert [loader._read(i) is None for i in range(3)] == [False, True, True]
    indices, pixels, failed = next(iter(loader))
    assert indices == [0, 1, 2] and not failed
    assert torch.equal(pixels[1], dataset[1][1])  # the seeded draw: exactly the PIL path's pixels
    assert torch.equal(pixels[2], dataset[2][1])


def test_jpeg_orientation_reads_the_header_and_refuses_what_nvjpeg_should_not_decode(inputs):
    recipe = DecodeRecipe(Preprocessing(64))
    assert [jpeg_orientation(inputs[k], recipe) for k in range(len(SHAPES))] == [o for _, _, o in SHAPES]
    assert jpeg_orientation(inputs[-2], recipe) is None  # PNG
    assert jpeg_orientation(inputs[-1], recipe) is None  # truncated: PIL rejects it, whatever nvjpeg would do
    assert jpeg_orientation(jpeg(scene(64, 64, 0).convert("CMYK")), recipe) is None
    small = DecodeRecipe(Preprocessing(64), max_pixels=640 * 480 - 1)
    assert jpeg_orientation(inputs[0], small) is None  # over the pixel limit: the PIL path rejects it


def test_the_decoder_changes_the_recorded_recipe_and_the_cache_fingerprint(monkeypatch):
    from roadwork_cli.features.cache import decoder_suffix

    pil, cuda = DecodeRecipe(Preprocessing(224)), DecodeRecipe(Preprocessing(224), decoder="cuda")
    assert "decoder" not in recipe_record(pil, "fp32")["decode"]  # records of the PIL path are unchanged
    assert recipe_record(cuda, "fp32")["decode"]["decoder"] == "cuda"
    assert decoder_suffix("pil", "cpu") == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decoder_suffix("cuda", "cuda") == "-cudadecode"
    with pytest.raises(UsageError, match="runtime.device cuda"):
        decoder_suffix("cuda", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_decoder_without_cuda_is_a_usage_error():
    with pytest.raises(UsageError, match="torch sees none"):
        check_decoder("cuda")
    dataset = ImageDataset([b""], DecodeRecipe(Preprocessing(64), decoder="cuda"))
    with pytest.raises(UsageError):
        create_loader(dataset, batch_size=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cache_features_with_the_cuda_decoder_exits_2_without_cuda(tmp_path):
    from split_helpers import write_splits

    from roadwork_cli.cli.app import app

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(scene(80, 60, 0)))
    image_id = "a" * 64
    run = tmp_path / "run"
    run.mkdir()
    sample = {"path": str(path), "label": 1, "source": "test", "group": image_id}
    write_splits(
        run / "splits.json", {"train": [image_id], "val_select": [], "val_calib": [], "test": []}, {image_id: sample}
    )
    args = ["cache-features", "--run", str(run), "--backbone", "tiny_vit", "--workers", "0"]
    result = CliRunner().invoke(app, args, env={"ROADWORK_DATA__DECODER": "cuda"})
    assert result.exit_code == 2, result.output
    assert "data.decoder cuda" in result.output
    assert not (run / "features" / "current.json").exists()


@needs_cuda
@pytest.mark.parametrize("draft", [True, False])
def test_nvjpeg_batches_match_pil_within_tolerance(inputs, draft):
    recipe = DecodeRecipe(Preprocessing(224), jpeg_draft=draft, decoder="cuda")
    dataset = ImageDataset(inputs, recipe)
    loader = create_loader(dataset, batch_size=5, workers=2)
    assert isinstance(loader, GpuDecodeLoader)
    assert_close_to_pil(dataset, loader.batches, torch.device("cuda"))


def test_a_model_calibrated_on_gpu_decoded_pixels_decodes_with_pil_on_the_cpu_and_says_so():
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.stage1 import Stage1Model

    backbone = create_backbone("tiny_vit")
    head = SelectiveHead(backbone.feature_dim, hidden=8)
    recorded = {"recipe": {"decode": {"jpeg_draft": True, "decoder": "cuda"}}}
    with pytest.warns(UserWarning, match="JPEG decoder: calibration used 'cuda'"):
        model = Stage1Model(backbone, head, None, info=recorded, device="cpu")
    assert model.recipe.decoder == "pil" and "decoder" not in model.recipe_record()["decode"]
    plain = Stage1Model(backbone, head, None, info={"recipe": {"decode": {"jpeg_draft": True}}}, device="cpu")
    assert plain.recipe.decoder == "pil"


@needs_cuda
def test_a_cuda_model_follows_the_recorded_gpu_decoder():
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.stage1 import Stage1Model

    backbone = create_backbone("tiny_vit")
    recorded = {"recipe": {"decode": {"jpeg_draft": True, "decoder": "cuda"}}}
    model = Stage1Model(backbone, SelectiveHead(backbone.feature_dim, hidden=8), None, info=recorded, device="cuda")
    assert model.recipe.decoder == "cuda" and isinstance(model.loader([b""]), GpuDecodeLoader)


def test_files_are_read_by_the_loader_and_a_missing_one_is_one_failure(inputs, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(inputs[0])
    recipe = DecodeRecipe(Preprocessing(64), decoder="cuda")
    dataset = ImageDataset([str(path), inputs[0], str(tmp_path / "missing.jpg")], recipe)
    loader = GpuDecodeLoader(dataset, [[0, 1, 2]], workers=1, device=torch.device("cpu"))
    assert loader._read(0) == loader._read(1) == (inputs[0], 1)
    indices, pixels, failed = next(iter(loader))
    assert indices == [0, 1] and torch.equal(pixels[0], pixels[1])
    assert failed == [(2, dataset[2][2])] and "not found" in failed[0][1]
