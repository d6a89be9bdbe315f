"""Property-based tests: random configs and random bytes give clean, named errors — never a crash.

"Clean" means the loader raises only its own error type (ConfigError for configs,
WeightsError for model files) with a message, or succeeds; any other exception
(TypeError, KeyError, a segfault in a parser…) is a bug.
"""

from __future__ import annotations

import os
import pickle
import struct
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab.config import ConfigError, config_from_dict, load_config
from cnnlab.models.weights import WeightsError, read_state_dict

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = ["data.source", "data.image_size", "data.channels", "data.batch_size", "data.val_fraction",
        "data.test_fraction", "data.validation_split", "data.augment", "data.classes", "data.expand",
        "model.name", "model.dropout", "model.hidden", "model.init", "model.weights", "optim.name", "optim.lr",
        "optim.momentum", "schedule.name", "schedule.warmup_epochs", "train.epochs", "train.seed",
        "train.early_stopping", "train.early_stopping.patience", "train.precision", "train.device",
        "regularization.l2", "bogus", "data.bogus", "train"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["adam", "sgd", "cosine", "mlp", "folder:/nonexistent",
                                                            "1e-3", "inf", "nan", "[]", "{}"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def _clean(fn):
    try:
        fn()
    except ConfigError as e:
        assert str(e)  # a message a person can act on
    except RecursionError:  # pragma: no cover
        pytest.fail("recursion")


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_random_overrides_give_only_config_errors(overrides):
    _clean(lambda: config_from_dict({}, overrides))


@SETTINGS
@given(st.recursive(st.dictionaries(st.text(max_size=8), scalars, max_size=4),
                    lambda inner: st.dictionaries(st.sampled_from(["data", "model", "optim", "train", "x"]), inner,
                                                  max_size=3), max_leaves=10))
def test_random_config_trees_give_only_config_errors(tree):
    _clean(lambda: config_from_dict(tree))


@SETTINGS
@given(st.binary(max_size=400))
def test_random_yaml_bytes_give_only_config_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_bytes(data)
    _clean(lambda: load_config(path))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["!!python/object/apply:os.system ['touch /tmp/cnnlab-pwned']",
                        "data: !!python/object/new:os.system [echo hi]",
                        "!!python/name:os.system", "a: &x [*x]", "x: !!binary AAAA", "? [a]\n: 1"]))
def test_yaml_tags_that_construct_objects_are_rejected(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)
    assert not os.path.exists("/tmp/cnnlab-pwned")


def _safetensors_with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


weight_files = st.one_of(
    st.binary(max_size=300),
    st.builds(_safetensors_with_header, st.binary(max_size=200)),
    st.builds(lambda h: _safetensors_with_header(json.dumps(h).encode()),
              st.dictionaries(st.text(max_size=5), st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                                                                   st.one_of(st.text(max_size=4),
                                                                             st.lists(st.integers(-5, 10**12),
                                                                                      max_size=3))), max_size=3)),
    st.builds(lambda n: struct.pack("<Q", n) + b"{}", st.integers(0, 2**64 - 1)),  # absurd header sizes
)


@SETTINGS
@given(weight_files, st.sampled_from([".safetensors", ".pt", ".pth", ".ckpt"]))
def test_random_model_files_give_only_weights_errors(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("w") / f"model{suffix}"
    path.write_bytes(data)
    try:
        state = read_state_dict(path)
    except WeightsError as e:
        assert str(path) in str(e) or "empty" in str(e)
    else:
        assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cnnlab-evil-marker",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_that_runs_code_is_refused_at_every_protocol(tmp_path, protocol):
    marker = "/tmp/cnnlab-evil-marker"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": _Evil()}, protocol=protocol))
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(path)
    assert not os.path.exists(marker)


def test_truncated_and_oversized_header_safetensors_are_clean_errors(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    data = good.read_bytes()
    for name, blob in {"truncated": data[: len(data) // 2], "empty": b"",
                       "huge-header": struct.pack("<Q", 2**40) + data[8:], "not-safetensors": b"PK\x03\x04zip"}.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(WeightsError):
            read_state_dict(p)
