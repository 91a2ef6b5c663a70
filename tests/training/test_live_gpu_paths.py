"""What the live loop does for GPU hosts, checked on the CPU: compile routing, fewer host syncs, same results."""

from __future__ import annotations

import torch
from test_finetune import image_table, live_settings, make_run  # noqa: F401 - image_table is a fixture

from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.data.transforms import normalize_batch
from roadwork_cli.features.cache import read_split_table
from roadwork_cli.training import finetune
from roadwork_cli.training.live_step import LOSS_LOG_STEPS, LiveImages, _show_loss, eager


def _setup(run, **model):
    settings = live_settings(run, "doran", optimizer="fsam", ema_decay=0.9)
    if model:
        settings = settings.model_copy(update={"model": settings.model.model_copy(update=model)})
    images = LiveImages(read_split_table(run), {})
    return settings, images, finetune._setup(settings, torch.device("cpu"), len(images.ids("train")), None)


def test_compile_backbone_routes_training_calls_through_torch_compile_and_keeps_the_rest_eager(tmp_path, image_table):  # noqa: F811
    run = make_run(tmp_path / "run", image_table)
    settings, images, plain = _setup(run)
    compiled_settings, _, compiled = _setup(run, compile_backbone=True)
    backbone = compiled.model.backbone
    assert backbone._compiled_call_impl is not None and plain.model.backbone._compiled_call_impl is None
    # Nothing is compiled until a training step runs: the eager view shares every parameter and computes eagerly.
    view = eager(backbone)
    assert view._compiled_call_impl is None and backbone._compiled_call_impl is not None
    assert all(a is b for a, b in zip(view.parameters(), backbone.parameters(), strict=True))
    assert eager(plain.model.backbone) is plain.model.backbone
    # Checkpoints, EMA and the merged backbone see the eager module: same keys, same values (same seed).
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())
    assert compiled.ema is not None and compiled.ema.module.backbone._compiled_call_impl is None
    merged, merged_plain = finetune._merged_backbone(compiled.model), finetune._merged_backbone(plain.model)
    for (k, a), (_, b) in zip(merged.state_dict().items(), merged_plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # The setting changes rounding, not the training problem: a run resumes across it.
    table = read_split_table(run)
    assert finetune._signature(settings, plain, table, None) == finetune._signature(
        compiled_settings, compiled, table, None
    )


def test_the_running_loss_is_read_every_few_steps_on_accelerators_and_every_step_on_the_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert all(_show_loss(cpu, step, last=False) for step in range(1, 60))
    shown = [step for step in range(1, 3 * LOSS_LOG_STEPS + 1) if _show_loss(gpu, step, last=False)]
    assert shown == [LOSS_LOG_STEPS, 2 * LOSS_LOG_STEPS, 3 * LOSS_LOG_STEPS]
    assert _show_loss(gpu, 7, last=True)


def test_normalize_batch_builds_its_statistics_once_per_device_and_still_normalises():
    prep = Preprocessing(4, mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))
    pixels = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    first = normalize_batch(pixels, prep)
    expected = (pixels.permute(0, 3, 1, 2).float() - torch.tensor(prep.mean).view(1, 3, 1, 1) * 255.0) / (
        torch.tensor(prep.std).view(1, 3, 1, 1) * 255.0
    )
    assert torch.equal(first, expected)
    with torch.inference_mode():  # statistics made under inference mode serve later training batches too
        normalize_batch(pixels, Preprocessing(4, mean=(0.1, 0.2, 0.3)))
    again = normalize_batch(pixels, Preprocessing(4, mean=(0.1, 0.2, 0.3)))
    assert again.shape == (2, 3, 4, 4) and torch.equal(normalize_batch(pixels, prep), first)


def test_training_with_the_cuda_decoder_is_refused_without_cuda(tmp_path, image_table):  # noqa: F811
    import pytest

    from roadwork_cli.errors import UsageError
    from roadwork_cli.training.api import train

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    run = make_run(tmp_path / "run", image_table)
    settings = live_settings(run, "doran")
    settings = settings.model_copy(update={"data": settings.data.model_copy(update={"decoder": "cuda"})})
    with pytest.raises(UsageError, match="data.decoder cuda"):
        train(run, settings)
    assert not run.metrics.exists()


def test_scoring_follows_the_decoder_setting_and_training_draws_stay_on_pil(tmp_path, image_table):  # noqa: F811
    from roadwork_cli.training.live_step import scoring_recipe

    run = make_run(tmp_path / "run", image_table)
    _, _, setup = _setup(run)
    assert setup.recipe.decoder == "pil" and scoring_recipe(setup) == setup.recipe  # the default: nothing changes
    cuda = setup.settings.model_copy(update={"data": setup.settings.data.model_copy(update={"decoder": "cuda"})})
    setup.settings = cuda
    assert scoring_recipe(setup).decoder == "cuda" and setup.recipe.decoder == "pil"
