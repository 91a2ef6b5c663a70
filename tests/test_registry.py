"""The one registry every pluggable family uses: duplicates refused, unknown names one error with a suggestion."""

import importlib

import pytest
import torch
from torch import nn

from roadwork_cli.config import PeftSettings, TrainSettings
from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.errors import UnknownNameError, UsageError
from roadwork_cli.registry import Registry


def test_duplicates_are_refused_and_names_sorted():
    reg: Registry[int] = Registry("widget")
    reg.add("b", 2, "two")
    reg.add("a", 1, "one")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    assert reg.names() == ["a", "b"] and reg.describe() == {"a": "one", "b": "two"}
    assert "a" in reg and "c" not in reg and len(reg) == 2


def test_unknown_name_suggests_the_closest_and_exits_2():
    reg: Registry[int] = Registry("widget", hint="Or 'x:<anything>'.")
    reg.add("gate", 1)
    reg.add("band", 2)
    with pytest.raises(UnknownNameError, match=r"did you mean 'gate'\?.*choose one of: band, gate\. Or 'x:<anything>'"):
        reg.get("gat")
    with pytest.raises(UsageError) as info:
        reg.get("zzz")
    assert info.value.exit_code == 2 and "did you mean" not in str(info.value)


def test_the_decorator_registers_and_describes_from_the_docstring():
    reg: Registry = Registry("builder")

    @reg.register("thing")
    def build():
        """Builds a thing.

        More text.
        """

    assert reg.get("thing") is build and reg.describe() == {"thing": "Builds a thing."}


# --------------------------------------------------------------------------------- every registry of the package

# (module, registry, a registered name, a misspelling of it and how the package's own create_* meets it)
FAMILIES = {
    "backbones": ("roadwork_cli.model.backbones", "BACKBONES", "tiny_vit", "tiny_vt"),
    "adapters": ("roadwork_cli.model.peft", "ADAPTERS", "lora", "lorra"),
    "sources": ("roadwork_cli.data.sources", "SOURCES", "parquet", "parket"),
    "augmentations": ("roadwork_cli.data.transforms", "AUGMENTATIONS", "natix", "natx"),
    "optimizers": ("roadwork_cli.training.sam", "OPTIMIZERS", "fsam", "fsma"),
}


def _create(family: str, name: str):
    """Build ``name`` through the family's public entry point (not the registry object)."""
    if family == "backbones":
        from roadwork_cli.model.backbones import create_backbone

        return create_backbone(name)
    if family == "adapters":
        from roadwork_cli.model.peft import create_adapter

        return create_adapter(name, nn.Linear(2, 2), [], PeftSettings())
    if family == "sources":
        from roadwork_cli.data import sources

        return sources.SOURCES.get(name)  # create_source picks the kind from the spec itself (detect_kind)
    if family == "augmentations":
        from roadwork_cli.data.transforms import create_augmentation

        return create_augmentation(name, Preprocessing(size=32))
    from roadwork_cli.training.sam import wrap_optimizer

    base = torch.optim.AdamW(nn.Linear(2, 1).parameters())
    return wrap_optimizer(base, TrainSettings.model_construct(optimizer=name))  # past the settings' own check


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_registry_refuses_a_duplicate_and_keeps_the_first(family):
    module, attribute, name, _ = FAMILIES[family]
    registry = getattr(importlib.import_module(module), attribute)
    assert isinstance(registry, Registry) and name in registry
    first = registry.get(name)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(name)(lambda *args, **kwargs: None)
    assert registry.get(name) is first


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_registry_answers_an_unknown_name_with_one_error_and_a_suggestion(family):
    _, _, name, misspelt = FAMILIES[family]
    with pytest.raises(UnknownNameError, match=rf"Unknown .*{misspelt!r} \(did you mean {name!r}\?\); choose one of"):
        _create(family, misspelt)


@pytest.mark.parametrize(
    ("module", "decorator", "name"),
    [
        ("roadwork_cli.model.backbones", "register_backbone", "tiny_vit"),
        ("roadwork_cli.model.peft", "register_adapter", "dora"),
        ("roadwork_cli.data.sources", "register_source", "csv"),
    ],
)
def test_the_public_register_decorators_refuse_duplicates(module, decorator, name):
    with pytest.raises(ValueError, match="already registered"):
        getattr(importlib.import_module(module), decorator)(name)(lambda *args, **kwargs: None)


def test_the_backbone_error_names_the_prefixes_too():
    from roadwork_cli.model.backbones import create_backbone

    with pytest.raises(UnknownNameError, match=r"efficientnet_lite0.*Or 'timm:<model name>' or 'hf:<repo id"):
        create_backbone("no_such_backbone")
