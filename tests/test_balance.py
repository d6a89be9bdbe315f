"""Class imbalance: data.class_weights / data.sampler = balanced, and per-class counts in the run folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from cnnlab.data.loader import DeviceLoader, Normalizer, balance_sampling, balanced_class_weights
from cnnlab.data.stream import StreamingLoader

from conftest import fit_run


def test_balanced_class_weights_match_scikit_learn():
    labels = torch.tensor([0] * 90 + [1] * 10 + [2] * 25)
    ours = balanced_class_weights(labels, 3).numpy()
    ref = compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # each class then carries the same total weight
    totals = ours * np.bincount(labels.numpy())
    np.testing.assert_allclose(totals, totals[0], rtol=1e-6)
    # a class absent from training gets weight 0 instead of a division by zero
    assert balanced_class_weights(torch.tensor([0, 0, 2]), 3).tolist()[1] == 0.0


def _loader(labels: torch.Tensor, seed: int, cls=DeviceLoader, **kw):
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    g = torch.Generator().manual_seed(seed)
    return cls(images, labels, Normalizer([0.0], [1.0]), 16, shuffle=True, generator=g, **kw)


def test_balanced_sampler_draws_every_class_equally_often_and_repeatably():
    labels = torch.tensor([0] * 900 + [1] * 100)
    loader = _loader(labels, seed=3)
    balance_sampling(loader, 2)
    drawn = torch.cat([loader.new_order() for _ in range(20)])
    assert len(drawn) == 20 * len(labels)  # an epoch keeps its length (same number of steps)
    share = (labels[drawn] == 1).float().mean().item()
    # 20,000 draws at p = 0.5: the standard deviation of the share is 0.0035; 0.47–0.53 is ±8.5 σ
    assert 0.47 < share < 0.53, share
    assert len(set(drawn[labels[drawn] == 1].tolist())) == 100  # every minority image is drawn
    again = _loader(labels, seed=3)
    balance_sampling(again, 2)
    assert torch.equal(again.new_order(), drawn[:len(labels)])  # same seed, same draws
    # without it, each epoch is a permutation: every image exactly once
    plain = _loader(labels, seed=3)
    assert sorted(plain.new_order().tolist()) == list(range(len(labels)))


def test_streaming_loader_draws_the_same_balanced_batches():
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 20)
    a, b = _loader(labels, seed=5), _loader(labels, seed=5, cls=StreamingLoader, prefetch=False)
    for loader in (a, b):
        balance_sampling(loader, 3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.fixture(scope="module")
def imbalanced_folders(tmp_path_factory):
    """Real Animal-Shape silhouettes: a training folder with 30 cats per dog, and a balanced
    folder of other images to measure what each class's recall really is."""
    from cnnlab.data import load_source

    ds = load_source("animal-shapes", classes=["cat", "dog"], progress=False)
    root = tmp_path_factory.mktemp("imbalanced")
    by_class = {c: (ds.labels == i).nonzero().flatten().tolist() for i, c in enumerate(ds.classes)}
    plan = {"train": {"cat": by_class["cat"][:600], "dog": by_class["dog"][:20]},
            "balanced": {"cat": by_class["cat"][600:800], "dog": by_class["dog"][600:800]}}
    for part, classes in plan.items():
        for c, idx in classes.items():
            (root / part / c).mkdir(parents=True)
            for i in idx:
                Image.fromarray(ds.images[i, 0].numpy()).save(root / part / c / f"{i}.png")
    return root


def _dog_recall(overrides, folders, tmp_path):
    from cnnlab.api import evaluate

    run = fit_run({"data.source": f"folder:{folders / 'train'}", "data.val_fraction": 0.2,
                   "data.test_fraction": 0.0, "data.batch_size": 32, "train.epochs": 6, "train.seed": 0,
                   "model.name": "harahap-cnn", **overrides}, out=tmp_path / "-".join(overrides) or None)
    m = evaluate(run.path, data=f"folder:{folders / 'balanced'}")
    return run, m["per_class"]["dog"]["recall"], m["per_class"]["cat"]["recall"]


def test_class_weights_and_balanced_sampler_lift_the_rare_class(imbalanced_folders, tmp_path):
    plain, dog_plain, cat_plain = _dog_recall({}, imbalanced_folders, tmp_path / "plain")
    weighted, dog_w, cat_w = _dog_recall({"data.class_weights": "balanced"}, imbalanced_folders, tmp_path / "w")
    sampled, dog_s, cat_s = _dog_recall({"data.sampler": "balanced"}, imbalanced_folders, tmp_path / "s")
    # the counts are in metrics.json: 600 cats / 20 dogs minus the 20 % validation share
    assert plain.metrics["class_counts"]["train"] == [480, 16]
    assert plain.metrics["class_counts"]["val"] == [120, 4]
    assert plain.metrics["balancing"] == {"class_weights": None, "sampler": "shuffle"}
    w = weighted.metrics["balancing"]["class_weights"]
    assert w == pytest.approx([496 / (2 * 480), 496 / (2 * 16)])
    assert sampled.metrics["balancing"]["sampler"] == "balanced"
    # On 200 unseen cats and 200 unseen dogs (measured: plain 0.235 dog recall; weighted 0.685;
    # sampled 0.32): weighting recognises far more of the rare class, the sampler (which shows the
    # same 16 dogs ~15 times an epoch, so overfits them) somewhat more; both raise the balanced
    # accuracy without giving up the common class.
    print(f"dog recall on 200 unseen dogs: plain {dog_plain:.3f}, class weights {dog_w:.3f}, "
          f"balanced sampler {dog_s:.3f}")  # the README quotes these (pytest -s shows them)
    assert dog_w >= dog_plain + 0.25, (dog_plain, dog_w)
    assert dog_s > dog_plain, (dog_plain, dog_s)
    for dog, cat in ((dog_w, cat_w), (dog_s, cat_s)):
        assert (dog + cat) / 2 > (dog_plain + cat_plain) / 2 and cat > 0.8
