"""Settings: precedence defaults < YAML < environment < flags, and errors that name the bad key."""

import importlib
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from roadwork_cli.config import (
    MODE_SCOPES,
    Settings,
    ignored_settings,
    load_settings,
    mode_notes,
    settings_from_env,
)
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


def _literal_settings(model: type[BaseModel] = Settings, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every ``Literal`` setting below ``model`` (also inside ``X | None``): dotted name -> its choices."""
    found: dict[str, tuple[str, ...]] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= _literal_settings(annotation, f"{prefix}{name}.")
            continue
        for candidate in (annotation, *get_args(annotation)):
            if get_origin(candidate) is Literal:
                found[f"{prefix}{name}"] = get_args(candidate)
    return found


LITERALS = _literal_settings()

# Literal settings whose choices a registry implements: choices and registered names must be the same set.
REGISTRIES = {
    "data.augment": ("roadwork_cli.data.transforms", "AUGMENTATIONS"),
    "model.peft.method": ("roadwork_cli.model.peft", "ADAPTERS"),
    "train.optimizer": ("roadwork_cli.training.sam", "OPTIMIZERS"),
    "calibration.scaling": ("roadwork_cli.calibration.scaling", "SCALERS"),
    "calibration.rule": ("roadwork_cli.calibration.rules", "RULES"),
    "calibration.method": ("roadwork_cli.calibration.targets", "METHODS"),
}


def _value_at(settings: BaseModel, key: str):
    for part in key.split("."):
        settings = getattr(settings, part)
    return settings


def _nested(key: str, value) -> dict:
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def test_the_literal_settings_are_found():
    import roadwork_cli.config

    # One per ``Literal[`` in the source: the walk over the sections misses none.
    assert len(LITERALS) == Path(roadwork_cli.config.__file__).read_text().count("Literal[")
    assert set(REGISTRIES) <= set(LITERALS)
    assert LITERALS["train.mode"] == ("train_cached", "train", "train_crc")


@pytest.mark.parametrize("key", sorted(LITERALS))
def test_every_literal_choice_is_accepted_and_anything_else_refused_by_name(key):
    for choice in LITERALS[key]:
        assert str(_value_at(load_settings(None, _nested(key, choice), environ={}), key)) == choice
    with pytest.raises(UsageError, match=rf"{key}: Input should be .*\(got 'no_such_choice'\)"):
        load_settings(None, _nested(key, "no_such_choice"), environ={})


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_literal_choices_equal_the_registries_that_implement_them(key):
    module, attribute = REGISTRIES[key]
    implemented = getattr(importlib.import_module(module), attribute).names()
    assert set(LITERALS[key]) == set(implemented)


# ------------------------------------------------------------------------------------- settings a mode ignores


def test_mode_scopes_name_real_settings():
    defaults = Settings()
    for scope in MODE_SCOPES:
        assert set(scope.modes) <= set(LITERALS["train.mode"])
        for key in scope.keys:
            _value_at(defaults, key)  # raises on a typo


def test_peft_in_a_cached_mode_gets_one_note_naming_each_setting():
    assert mode_notes(load_settings(None, {}, environ={})) == []
    settings = load_settings(None, {"model": {"peft": {"method": "dora", "rank": 4}}}, environ={})
    [note] = mode_notes(settings)
    assert note.startswith("model.peft.method, model.peft.rank apply to --mode train only; train_cached ")
    crc = load_settings(None, {"train": {"mode": "train_crc", "optimizer": "sam"}}, environ={})
    assert mode_notes(crc) == [
        "train.optimizer applies to --mode train only; train_crc fits the head alone on cached features of the "
        "frozen backbone, with AdamW at train.lr."
    ]


def test_live_mode_reads_the_adapters_but_not_the_conformal_term():
    live = {"mode": "train", "optimizer": "fsam", "crc_temperature": 0.1, "loss": {"conformal": 2.0}}
    settings = load_settings(None, {"train": live, "model": {"peft": {"method": "lora"}}}, environ={})
    assert ignored_settings(settings) == {MODE_SCOPES[1]: ["train.crc_temperature", "train.loss.conformal"]}
    [note] = mode_notes(settings)
    assert "--mode train_crc only; train has no conformal-training term" in note
