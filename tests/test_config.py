"""Config: safe YAML, dotted overrides, validation messages, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import cnnlab
from cnnlab.config import Config, ConfigError, config_from_dict, describe_keys, dump_config, load_config


def write(tmp_path, text: str, name: str = "exp.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --------------------------------------------------------------------------- YAML

def test_defaults_are_valid_and_documented():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "harahap-cnn" and cfg.optim.name == "adam"
    assert cfg.train.early_stopping is None
    keys = describe_keys()
    assert ("optim.lr", "0.001") == keys[[k for k, _, _ in keys].index("optim.lr")][:2]
    assert all(meaning for _, _, meaning in keys), "every key carries a one-line meaning"


def test_yaml_file_loads_and_name_defaults_to_stem(tmp_path):
    p = write(tmp_path, "data:\n  batch_size: 16\noptim:\n  name: sgd\n  lr: 0.05\n", "my-exp.yaml")
    cfg = load_config(p)
    assert cfg.data.batch_size == 16
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.05
    assert cfg.name == "my-exp"


def test_python_object_tag_is_rejected(tmp_path):
    marker = tmp_path / "PWNED"
    p = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="safe"):
        load_config(p)
    assert not marker.exists()


def test_python_tag_in_nested_section_is_rejected(tmp_path):
    p = write(tmp_path, "optim:\n  lr: !!python/object/apply:builtins.float ['0.1']\n")
    with pytest.raises(ConfigError):
        load_config(p)


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "mapping"),
    ("data: [unclosed\n", "YAML"),
])
def test_malformed_yaml(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.optim.lr == Config().optim.lr


# --------------------------------------------------------------------------- overrides

def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=0.01", "model.hidden=[64,32]", "data.augment=true",
                             "train.epochs=3", "data.image_size=null"])
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.model.hidden == [64, 32]
    assert cfg.data.augment is True
    assert cfg.train.epochs == 3
    assert cfg.data.image_size is None


@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("3E-4", 0.0003), ("5e-4", 0.0005), ("1.0e-3", 0.001),
                                        ("2.5e+1", 25.0), (".5", 0.5)])
def test_scientific_notation_is_a_number(tmp_path, text, value):
    """`lr: 1e-3` is how everyone writes a learning rate; PyYAML's YAML-1.1 resolver alone
    reads `1e-3` (no dot) as the *string* '1e-3'."""
    assert load_config(None, [f"regularization.l2={text}"]).regularization.l2 == pytest.approx(value)
    p = write(tmp_path, f"optim:\n  weight_decay: {text}\n")
    assert load_config(p).optim.weight_decay == pytest.approx(value)


def test_string_keys_accept_digit_only_values():
    """Folders named 0..9 (MNIST-style) and runs named 2024: on the command line `name=2024`
    cannot be quoted past the shell, and YAML reads it as an integer; a string key should
    take the text rather than fail with "expected a string; got 2024"."""
    assert load_config(None, ["name=2024"]).name == "2024"
    assert load_config(None, ["data.classes=[3, 5]"]).data.classes == ["3", "5"]


def test_integer_widens_to_float():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_overrides_as_dict_and_over_yaml(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.5\n  name: sgd\n")
    cfg = load_config(p, {"optim.lr": 0.02})
    assert cfg.optim.lr == 0.02 and cfg.optim.name == "sgd"


def test_early_stopping_null_then_nested_key():
    cfg = load_config(None, ["train.early_stopping=null"])
    assert cfg.train.early_stopping is None
    cfg = load_config(None, ["train.early_stopping=null", "train.early_stopping.patience=3"])
    es = cfg.train.early_stopping
    assert es is not None and es.patience == 3
    assert es.monitor == "val_loss" and es.min_delta == 0.0  # the rest from defaults


def test_early_stopping_nested_key_from_default_none():
    cfg = load_config(None, ["train.early_stopping.patience=4", "train.early_stopping.monitor=val_accuracy"])
    assert cfg.train.early_stopping.patience == 4
    assert cfg.train.early_stopping.monitor == "val_accuracy"


def test_early_stopping_yaml_null_overridden_by_key(tmp_path):
    p = write(tmp_path, "train:\n  early_stopping: null\n")
    cfg = load_config(p, ["train.early_stopping.patience=2"])
    assert cfg.train.early_stopping.patience == 2


def test_early_stopping_shorthand_survives_a_nested_key(tmp_path):
    """`early_stopping: 2` is documented shorthand for patience 2; setting another of its keys
    (here min_delta) must not silently reset the patience to the default 5."""
    assert load_config(None, ["train.early_stopping=2"]).train.early_stopping.patience == 2
    p = write(tmp_path, "train:\n  early_stopping: 2\n")
    es = load_config(p, ["train.early_stopping.min_delta=0.1"]).train.early_stopping
    assert (es.patience, es.min_delta) == (2, 0.1)
    es = load_config(None, ["train.early_stopping=2", "train.early_stopping.monitor=val_accuracy"]).train.early_stopping
    assert (es.patience, es.monitor) == (2, "val_accuracy")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])


# --------------------------------------------------------------------------- errors

def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=0.1"])
    msg = str(e.value)
    assert "optim.lrr" in msg
    for valid in ("name", "lr", "momentum", "weight_decay"):
        assert valid in msg
    assert "did you mean optim.lr" in msg


def test_unknown_top_level_section():
    with pytest.raises(ConfigError) as e:
        load_config({"optimm": {"lr": 0.1}})
    msg = str(e.value)
    assert "optimm" in msg and "did you mean optim" in msg
    for section in ("data", "model", "schedule", "regularization", "train"):
        assert section in msg


def test_unknown_nested_early_stopping_key():
    with pytest.raises(ConfigError, match=r"patience.*did you mean train\.early_stopping\.patience"):
        load_config(None, ["train.early_stopping.patiense=3"])


def test_unknown_key_in_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(write(tmp_path, "data:\n  batch_sise: 4\n"))


@pytest.mark.parametrize("override,match", [
    ("optim.lr=abc", r"optim\.lr.*number"),
    ("train.epochs=1.5", r"train\.epochs.*integer"),
    ("data.augment=1", r"data\.augment.*true/false"),
    ("train.seed=true", r"train\.seed.*integer"),
    ("model.hidden=abc", r"model\.hidden.*list"),
    ("model.hidden=[64, x]", r"model\.hidden\[1\].*integer"),
    ("optim=3", r"optim.*mapping"),
    ("data.batch_size=null", r"data\.batch_size: .*(null|None)"),
    ("optim.lr=.nan", r"optim\.lr.*finite"),
])
def test_wrong_types(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,match", [
    (["optim.lr=-0.1"], r"optim\.lr.*greater than 0"),
    (["optim.lr=0"], r"optim\.lr.*greater than 0"),
    (["model.dropout=1.0"], r"model\.dropout.*less than 1"),
    (["model.dropout=1.5"], r"model\.dropout"),
    (["model.dropout=-0.1"], r"model\.dropout.*at least 0"),
    (["data.batch_size=0"], r"data\.batch_size.*at least 1"),
    (["data.image_size=0"], r"data\.image_size.*at least 1"),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"], r"val_fraction \+ data\.test_fraction"),
    (["data.val_fraction=0.7", "data.test_fraction=0.4"], r"less than 1"),
    (["data.validation_split=1.0"], r"data\.validation_split"),
    (["train.epochs=0"], r"train\.epochs"),
    (["data.channels=2"], r"data\.channels.*choose one of: 1, 3"),
    (["optim.momentum=1"], r"optim\.momentum"),
    (["model.hidden=[0]"], r"model\.hidden"),
    (["model.hidden=[]"], r"model\.hidden"),
    (["data.source=animals"], r"data\.source.*folder:PATH"),
    (["train.device=gpu"], r"train\.device"),
    (["train.early_stopping.patience=0"], r"patience"),
    (["train.early_stopping.monitor=val_acc"], r"val_accuracy"),
])
def test_out_of_range_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_validation_split_overrides_fraction_sum_check():
    cfg = load_config(None, ["data.validation_split=0.2", "data.val_fraction=0.6", "data.test_fraction=0.6"])
    assert cfg.data.validation_split == 0.2


def test_unknown_optimizer_message_shape():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.name=adma"])
    assert str(e.value).startswith(
        "unknown optimizer 'adma' (optim.name); choose one of: sgd, adam, adamw, rmsprop")
    assert "adam" in str(e.value).split("choose one of")[1]


def test_unknown_schedule_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown schedule 'cosin' \(schedule\.name\); choose one of: "
                                          r"constant, step, exponential, cosine"):
        load_config(None, ["schedule.name=cosin"])


def test_unknown_model_name_lists_registered_models():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.name=harahap"])
    msg = str(e.value)
    assert "model.name" in msg and "'harahap'" in msg
    for name in cnnlab.list_models():
        assert name in msg
    assert "harahap-cnn" in msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- round trip

ROUND_TRIP_OVERRIDES = ["optim.lr=0.0123", "model.hidden=[64,32]", "train.early_stopping.patience=3",
                        "data.validation_split=0.25", "schedule.name=cyclic", "model.dropout=0.3",
                        "data.image_size=32", "data.channels=3", "model.init=he-normal", "name=rt"]


def test_round_trip_through_yaml_file(tmp_path):
    cfg = load_config(None, ROUND_TRIP_OVERRIDES)
    text = dump_config(cfg)
    again = load_config(write(tmp_path, text, "other-name.yaml"))
    assert again == cfg
    assert dump_config(again) == text


def test_round_trip_of_defaults_through_dict():
    cfg = load_config()
    again = load_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_dump_is_plain_safe_yaml():
    text = dump_config(load_config(None, ROUND_TRIP_OVERRIDES))
    assert "!!" not in text  # no python-specific tags
    tree = yaml.safe_load(text)
    assert tree["train"]["early_stopping"] == {"patience": 3, "monitor": "val_loss", "min_delta": 0.0}


def test_load_config_accepts_config_and_does_not_alias():
    cfg = load_config(None, ["model.hidden=[8]"])
    copy = load_config(cfg, ["optim.lr=0.5"])
    assert copy.optim.lr == 0.5 and cfg.optim.lr == 0.001
    copy.model.hidden.append(9)
    assert cfg.model.hidden == [8]


def test_config_from_dict_does_not_mutate_input():
    tree = {"optim": {"lr": 0.1}}
    config_from_dict(tree, ["optim.name=sgd", "train.early_stopping.patience=2"])
    assert tree == {"optim": {"lr": 0.1}}


def test_every_described_key_is_settable():
    """Each key `cnnlab config --keys` prints can be set back to its own default."""
    defaults = dataclasses.asdict(Config())
    for key, _, _ in describe_keys():
        node = defaults
        for part in key.split("."):
            node = node[part]
        load_config(None, {key: node})


def _is_train_config(path: Path) -> bool:
    """Study files for `cnnlab compare` (base / variants / grid) are not train configs."""
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return not ({"base", "variants", "grid", "seeds"} & set(tree))


RECIPES = [p for p in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
           if _is_train_config(p)]


@pytest.mark.skipif(not RECIPES, reason="no recipes/ folder")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    cfg = load_config(recipe)
    assert cfg.name
    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg
