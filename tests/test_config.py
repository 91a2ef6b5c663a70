"""Settings: precedence defaults < YAML < environment < flags, and errors that name the bad key."""

from pathlib import Path

import pytest

from roadwork_cli.config import Settings, load_settings, settings_from_env
from roadwork_cli.errors import UsageError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_defaults_work_offline():
    settings = load_settings(environ={})
    assert settings.model.backbone == "efficientnet_lite0"
    assert settings.calibration.fnr == 0.02 and settings.calibration.coverage == 0.8


def test_precedence_yaml_then_env_then_flags(tmp_path):
    config = write_yaml(tmp_path, "train:\n  epochs: 5\n  lr: 0.01\ncalibration:\n  delta: 0.2\n")
    env = {"ROADWORK_TRAIN__EPOCHS": "7", "ROADWORK_CALIBRATION__FNR": "0.05"}
    settings = load_settings(config, {"train": {"epochs": 9, "lr": None}}, environ=env)
    assert settings.train.epochs == 9  # flag beats env beats yaml
    assert settings.train.lr == 0.01  # yaml survives an absent (None) flag
    assert settings.calibration.fnr == 0.05  # env beats default
    assert settings.calibration.delta == 0.2  # yaml beats default

    only_env = load_settings(config, {}, environ=env)
    assert only_env.train.epochs == 7


def test_env_nesting_lists_and_case():
    tree = settings_from_env({"roadwork_model__peft__target_modules": '["qkv", "fc1"]', "OTHER": "x"})
    assert tree == {"model": {"peft": {"target_modules": ["qkv", "fc1"]}}}
    settings = load_settings(environ={"ROADWORK_DATA__SOURCES": "a/,b.csv"})
    assert settings.data.sources == ["a/", "b.csv"]


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("train:\n  epocs: 3\n", "train.epocs"),
        ("train:\n  epochs: -1\n", "train.epochs"),
        ("calibration:\n  fnr: 2\n", "calibration.fnr"),
        ("data:\n  fractions: [0.5, 0.5, 0.5, 0.5]\n", "data.fractions"),
        ("bogus_section: {}\n", "bogus_section"),
    ],
)
def test_bad_key_or_value_names_the_key(tmp_path, yaml_text, named):
    with pytest.raises(UsageError) as info:
        load_settings(write_yaml(tmp_path, yaml_text), environ={})
    assert named in str(info.value)
    assert info.value.exit_code == 2


def test_bad_env_value_names_the_key():
    with pytest.raises(UsageError, match="train.epochs"):
        load_settings(environ={"ROADWORK_TRAIN__EPOCHS": "many"})


def test_non_mapping_yaml_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="mapping"):
        load_settings(write_yaml(tmp_path, "- just\n- a list\n"), environ={})


def test_example_pro_settings_load_and_round_trip(tmp_path):
    settings = load_settings(EXAMPLES / "stage1_pro.yaml", environ={})
    assert settings.model.backbone == "dinov3_vits16"
    assert settings.model.peft.method == "doran"
    dumped = write_yaml(tmp_path, settings.to_yaml())
    assert load_settings(dumped, environ={}) == settings


def test_every_field_is_described():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Settings.__mro__[1]):
                walk(annotation, f"{prefix}{name}.")

    walk(Settings)


def test_flags_not_given_never_reach_validation():
    # A section that only flags mention, all of them absent (None), must leave the defaults intact.
    settings = load_settings(None, {"features": {"batch_size": None, "workers": None}}, environ={})
    assert settings.features.batch_size == Settings().features.batch_size


@pytest.mark.parametrize(
    ("yaml_text", "hint"),
    [
        ("train:\n  epocs: 3\n", "did you mean 'train.epochs'?"),
        ("calibration:\n  deltta: 0.1\n", "did you mean 'calibration.delta'?"),
        ("trian:\n  epochs: 3\n", "did you mean 'train'?"),
        ("train:\n  zzz: 3\n", "valid keys here: mode, epochs"),
    ],
)
def test_unknown_keys_get_a_did_you_mean(tmp_path, yaml_text, hint):
    with pytest.raises(UsageError) as info:
        load_settings(write_yaml(tmp_path, yaml_text), environ={})
    assert hint in str(info.value)
    assert "environment variable" not in str(info.value)


def test_errors_from_the_environment_name_the_variable():
    with pytest.raises(UsageError) as info:
        load_settings(environ={"ROADWORK_TRAIN__EPOCS": "3"})
    assert "train.epocs: unknown key; did you mean 'train.epochs'?" in str(info.value)
    assert "environment variable ROADWORK_TRAIN__EPOCS" in str(info.value)
    with pytest.raises(UsageError, match="environment variable roadwork_calibration__fnr"):
        load_settings(environ={"roadwork_calibration__fnr": "2"})
    # A flag that overrides the variable takes the blame away from it.
    with pytest.raises(UsageError) as info:
        load_settings(None, {"train": {"epochs": -1}}, environ={"ROADWORK_TRAIN__EPOCHS": "3"})
    assert "train.epochs" in str(info.value) and "environment" not in str(info.value)


def test_a_one_value_list_in_the_environment_is_accepted():
    assert load_settings(environ={"ROADWORK_DATA__SOURCES": "x.csv"}).data.sources == ["x.csv"]
    assert load_settings(environ={"ROADWORK_DATA__SOURCES": '["a b.csv"]'}).data.sources == ["a b.csv"]
    assert load_settings(environ={"ROADWORK_DATA__FRACTIONS": "0.5,0.2,0.2,0.1"}).data.fractions == (0.5, 0.2, 0.2, 0.1)
    assert load_settings(environ={"ROADWORK_MODEL__PEFT__TARGET_MODULES": "qkv"}).model.peft.target_modules == ["qkv"]
    # Scalars still parse as JSON first.
    assert load_settings(environ={"ROADWORK_TRAIN__EPOCHS": "4"}).train.epochs == 4


@pytest.mark.parametrize(
    ("section", "name", "module", "lister", "extra"),
    [
        ("calibration", "scaling", "roadwork_cli.calibration.scaling", "list_scalers", ()),
        ("calibration", "rule", "roadwork_cli.calibration.rules", "list_rules", ()),
        ("calibration", "method", "roadwork_cli.calibration.targets", "list_methods", ()),
        ("data", "augment", "roadwork_cli.data.transforms", "list_augmentations", ()),
        ("model.peft", "method", "roadwork_cli.model.peft", "list_adapter_methods", ("none",)),
    ],
)
def test_literal_choices_equal_the_registries_that_implement_them(section, name, module, lister, extra):
    import importlib
    from typing import get_args

    implemented = set(getattr(importlib.import_module(module), lister)()) | set(extra)
    model = Settings
    for part in section.split("."):
        model = model.model_fields[part].annotation
    assert set(get_args(model.model_fields[name].annotation)) == implemented
