"""Models: every registered model (forward, backward, init, transfer), the papers' exact nets, weights files."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import cnnlab
from cnnlab.models import create_model, freeze_backbone, list_models, load_weights
from cnnlab.models.weights import WeightsError
from cnnlab.models.papers import Flatten

ALL_MODELS = list_models()

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def test_registry_lists_the_papers_models():
    assert {"harahap-cnn", "alkhairi-cnn", "mlp"} <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS) == cnnlab.list_models()
    assert cnnlab.list_models("*-cnn") == ["alkhairi-cnn", "harahap-cnn"]


def _weights(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]



# --------------------------------------------------------------------------- every model

@pytest.mark.parametrize("channels,size", [(1, 28), (3, 64)])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_and_backward(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size)
    assert isinstance(model.backbone, nn.Module) and isinstance(model.head, nn.Module)
    model.train()
    x = torch.randn(2, channels, size, size)
    y = torch.tensor([0, 6])
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        assert p.requires_grad, pname
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), pname
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_transfers_backbone_and_freezes(name, tmp_path):
    """Weights of a 5-class model load into a 7-class one: everything but the head's last layer."""
    torch.manual_seed(0)
    src = create_model(name, num_classes=5, in_channels=1, image_size=28)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_model(name, num_classes=7, in_channels=1, image_size=28, init="uniform-fan-in")
    report = load_weights(dst, str(path))
    assert report["skipped"], "the 5-class head cannot fit a 7-class model"
    assert all(s.startswith("head.") for s in report["skipped"]), report["skipped"]
    for k, v in dst.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, src.state_dict()[k]), k
    n_trainable = freeze_backbone(dst)
    head = {"head." + k for k, _ in dst.head.named_parameters()}
    trainable = {k for k, p in dst.named_parameters() if p.requires_grad}
    assert trainable == head
    assert n_trainable == sum(p.numel() for p in dst.head.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_uniform_fan_in_init_on_every_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_channels=1, image_size=28, init="uniform-fan-in")
    for m in _weights(model):
        w = m.weight.detach()
        bound = 1 / math.sqrt(w[0].numel())
        assert float(w.abs().max()) <= bound + 1e-7
        assert float(w.abs().max()) > 0.5 * bound
        if m.bias is not None:
            assert float(m.bias.detach().abs().max()) == 0.0


def test_unknown_model_lists_choices():
    with pytest.raises((KeyError, ValueError), match="harahap-cnn"):
        create_model("lenet", num_classes=3)


def test_num_classes_below_two():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", num_classes=1)


@pytest.mark.parametrize("name,option", [("resnet18", dict(batch_norm=True)), ("vgg16", dict(hidden=[64])),
                                         ("resnet18", dict(hidden=[64]))])
def test_option_the_model_does_not_take(name, option):
    with pytest.raises(ValueError) as e:
        create_model(name, num_classes=3, **option)
    msg = str(e.value)
    assert name in msg and next(iter(option)) in msg
    assert "options" in msg  # and names what it does accept


def test_unknown_init_scheme():
    with pytest.raises(ValueError, match="he-normal"):
        create_model("mlp", num_classes=3, init="glorot")


# --------------------------------------------------------------------------- the papers' nets

def test_harahap_cnn_exact_structure():
    m = create_model("harahap-cnn", num_classes=10, in_channels=1, image_size=28)
    b, h = list(m.backbone), list(m.head)
    assert [type(x) for x in b] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d]
    conv = b[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.stride) == \
        (1, 32, (5, 5), (2, 2), (1, 1))
    assert b[2].num_features == 32
    assert b[3].kernel_size == 2
    assert [type(x) for x in h] == [Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert isinstance(h[0], nn.Flatten)  # cnnlab's channels-last-friendly subclass
    assert (h[1].in_features, h[1].out_features) == (6272, 128) == (32 * 14 * 14, 128)
    assert h[3].p == 0.2
    assert (h[4].in_features, h[4].out_features) == (128, 10)
    assert sum(p.numel() for p in m.parameters()) == 832 + 64 + 6272 * 128 + 128 + 1290


def test_alkhairi_cnn_exact_structure():
    m = create_model("alkhairi-cnn", num_classes=5, in_channels=3, image_size=64)
    convs = [x for x in m.backbone if isinstance(x, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(3, 10, (3, 3), (0, 0)), (10, 20, (5, 5), (0, 0))]
    assert [type(x) for x in m.backbone] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU]
    lin = [x for x in m.head if isinstance(x, nn.Linear)]
    side = (64 - 2) // 2 - 4  # 62 → pool 31 → 27
    assert [(l.in_features, l.out_features) for l in lin] == [(20 * side * side, 128), (128, 5)]
    assert any(isinstance(x, nn.ReLU) for x in m.head)
    assert m.backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 20, 27, 27)


def test_alkhairi_rejects_too_small_images():
    with pytest.raises(ValueError, match="image_size"):
        create_model("alkhairi-cnn", num_classes=5, in_channels=1, image_size=10)


def test_mlp_is_a_plain_perceptron():
    m = create_model("mlp", num_classes=5, in_channels=3, image_size=8, hidden=[32, 16])
    assert not any(isinstance(x, nn.Conv2d) for x in m.modules())
    lin = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(192, 32), (32, 16), (16, 5)]


def test_batch_norm_dropout_and_hidden_options():
    m = create_model("harahap-cnn", num_classes=3, batch_norm=False, dropout=0.0, hidden=[64, 32])
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert not any(isinstance(x, nn.Dropout) for x in m.modules())
    lin = [x for x in m.head if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(6272, 64), (64, 32), (32, 3)]
    m = create_model("harahap-cnn", num_classes=3, dropout=0.5)
    assert [x.p for x in m.modules() if isinstance(x, nn.Dropout)] == [0.5]
    m = create_model("alkhairi-cnn", num_classes=3, in_channels=1, image_size=28, batch_norm=True)
    assert [x.num_features for x in m.modules() if isinstance(x, nn.BatchNorm2d)] == [10, 20]
    m = create_model("mlp", num_classes=3, batch_norm=True)
    assert any(isinstance(x, nn.BatchNorm1d) for x in m.modules())
    m = create_model("vgg16", num_classes=3, image_size=32, batch_norm=True)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    m = create_model("mlp", num_classes=3, image_size=8, dropout=0.5)
    x = torch.randn(4, 1, 8, 8)
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


# --------------------------------------------------------------------------- init schemes

def _fan_in(m):
    return m.weight[0].numel()


def test_init_schemes_on_harahap():
    torch.manual_seed(0)
    default = create_model("harahap-cnn", num_classes=10)
    big = default.head[1]  # Linear(6272, 128): 802,816 weights, precise statistics
    assert float(big.bias.abs().max()) > 0  # PyTorch's default leaves non-zero biases

    torch.manual_seed(0)
    m = create_model("harahap-cnn", num_classes=10, init="uniform-fan-in")
    for layer in _weights(m):
        bound = 1 / math.sqrt(_fan_in(layer))
        w = layer.weight
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.95 * bound  # fills the range
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.1 * bound
        assert float(layer.bias.abs().max()) == 0

    torch.manual_seed(0)
    m = create_model("harahap-cnn", num_classes=10, init="he-normal")
    for layer in _weights(m):
        expected = math.sqrt(2 / _fan_in(layer))
        tol = 0.02 if layer.weight.numel() > 10000 else 0.1
        assert abs(float(layer.weight.std()) / expected - 1) < tol
        assert abs(float(layer.weight.mean())) < 0.1 * expected
        assert float(layer.bias.abs().max()) == 0

    torch.manual_seed(0)
    m = create_model("harahap-cnn", num_classes=10, init="he-uniform")
    big = m.head[1]
    bound = math.sqrt(6 / _fan_in(big))
    assert float(big.weight.abs().max()) <= bound and float(big.weight.abs().max()) > 0.95 * bound

    torch.manual_seed(0)
    m = create_model("harahap-cnn", num_classes=10, init="xavier-uniform")
    big = m.head[1]
    bound = math.sqrt(6 / (6272 + 128))
    assert float(big.weight.abs().max()) <= bound and float(big.weight.abs().max()) > 0.95 * bound


def test_init_changes_the_weights_and_is_seeded():
    torch.manual_seed(0)
    a = create_model("alkhairi-cnn", num_classes=5, init="default")
    torch.manual_seed(0)
    b = create_model("alkhairi-cnn", num_classes=5, init="he-normal")
    torch.manual_seed(0)
    c = create_model("alkhairi-cnn", num_classes=5, init="he-normal")
    assert not torch.equal(a.backbone[0].weight, b.backbone[0].weight)
    for (k, v), (_, w) in zip(b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(v, w), k


# --------------------------------------------------------------------------- weights files

def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture
def trained_like():
    """A harahap-cnn whose weights and BN statistics differ from any fresh init."""
    torch.manual_seed(1)
    m = create_model("harahap-cnn", num_classes=4, in_channels=1, image_size=16)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
        m.backbone[2].running_mean.add_(0.5)
        m.backbone[2].running_var.mul_(3.0)
        m.backbone[2].num_batches_tracked.fill_(17)
    return m


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth"])
def test_weights_round_trip(trained_like, tmp_path, fmt):
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(_state(trained_like), str(path))
    else:
        torch.save(trained_like.state_dict(), path)
    fresh = create_model("harahap-cnn", num_classes=4, in_channels=1, image_size=16)
    report = load_weights(fresh, str(path))
    assert report["skipped"] == []
    assert set(report["loaded"]) == set(trained_like.state_dict())
    for k, v in trained_like.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(2, 1, 16, 16)
    fresh.eval(), trained_like.eval()
    assert torch.equal(fresh(x), trained_like(x))


def test_weights_from_a_checkpoint_dict(trained_like, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": trained_like.state_dict(), "epoch": 3}, path)
    fresh = create_model("harahap-cnn", num_classes=4, in_channels=1, image_size=16)
    load_weights(fresh, str(path))
    assert torch.equal(fresh.head[4].weight, trained_like.head[4].weight)


def test_weights_different_num_classes_skips_only_the_head(trained_like, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_state(trained_like), str(path))
    torch.manual_seed(5)
    other = create_model("harahap-cnn", num_classes=9, in_channels=1, image_size=16)
    head_before = other.head[4].weight.detach().clone()
    report = load_weights(other, str(path))
    assert sorted(s.split(" ")[0] for s in report["skipped"]) == ["head.4.bias", "head.4.weight"]
    assert torch.equal(other.head[4].weight, head_before)  # untouched
    assert torch.equal(other.head[1].weight, trained_like.head[1].weight)
    assert torch.equal(other.backbone[0].weight, trained_like.backbone[0].weight)


def test_weights_rgb_first_conv_adapted_to_grayscale(tmp_path):
    torch.manual_seed(2)
    rgb = create_model("harahap-cnn", num_classes=4, in_channels=3, image_size=16)
    path = tmp_path / "rgb.safetensors"
    save_file(_state(rgb), str(path))
    gray = create_model("harahap-cnn", num_classes=4, in_channels=1, image_size=16)
    report = load_weights(gray, str(path))
    assert report["skipped"] == []
    assert gray.backbone[0].weight.shape == (32, 1, 5, 5)
    assert torch.allclose(gray.backbone[0].weight, rgb.backbone[0].weight.sum(1, keepdim=True))
    # a gray image seen as RGB (three equal channels) gives the same first-layer output
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(gray.backbone[0](x), rgb.backbone[0](x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_weights_gray_first_conv_tiled_to_rgb(tmp_path):
    torch.manual_seed(3)
    gray = create_model("alkhairi-cnn", num_classes=5, in_channels=1, image_size=28)
    path = tmp_path / "g.pt"
    torch.save(gray.state_dict(), path)
    rgb = create_model("alkhairi-cnn", num_classes=5, in_channels=3, image_size=28)
    load_weights(rgb, str(path))
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(rgb.backbone[0](x.expand(-1, 3, -1, -1)), gray.backbone[0](x), atol=1e-5)


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["bare", "inside_state_dict"])
def test_pickle_that_runs_code_is_refused(tmp_path, payload):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    obj = _Exploit(marker) if payload == "bare" else {"backbone.0.weight": _Exploit(marker)}
    torch.save(obj, path)
    assert not marker.exists()
    model = create_model("harahap-cnn", num_classes=4, image_size=16)
    before = _state(model)
    with pytest.raises(WeightsError, match="refused"):
        load_weights(model, str(path))
    assert not marker.exists(), "loading weights executed code from the file"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("setup,match", [
    ("missing", "not found"),
    ("empty", "empty"),
    ("garbage_safetensors", "safetensors"),
    ("unknown_suffix", "unknown weights format"),
    ("no_match", "no tensor matches"),
    ("not_tensors", "state dict"),
])
def test_weights_errors(tmp_path, setup, match):
    model = create_model("mlp", num_classes=3, image_size=8)
    path = tmp_path / "w.safetensors"
    if setup == "empty":
        path.write_bytes(b"")
    elif setup == "garbage_safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    elif setup == "unknown_suffix":
        path = tmp_path / "w.h5"
        path.write_bytes(b"abc")
    elif setup == "no_match":
        save_file({"something.else": torch.zeros(3)}, str(path))
    elif setup == "not_tensors":
        path = tmp_path / "w.pt"
        torch.save({"lr": 0.1, "epoch": 3}, path)
    with pytest.raises(WeightsError, match=match):
        load_weights(model, str(path))


def test_generic_registry():
    from cnnlab.registry import Registry

    reg = Registry("widget")

    @reg.register("b-one")
    def b_one(x=1):
        """Makes a b.

        More text."""
        return ("b", x)

    reg.register("a-two", doc="an a")(lambda: "a")
    assert reg.list() == ["a-two", "b-one"] and reg.list("b*") == ["b-one"]
    assert reg.create("b-one", x=3) == ("b", 3)
    assert reg.describe("b-one") == "Makes a b." and reg.describe("a-two") == "an a"
    assert "a-two" in reg and "c" not in reg
    with pytest.raises(KeyError, match="unknown widget 'c'; choose one of: a-two, b-one"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a-two")(lambda: None)
