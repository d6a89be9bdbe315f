"""Data: sources, folder decoding and bad files, safe unpickling, splits, augmentation, normalisation."""

from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cnnlab
from cnnlab.experiment import split_fractions
from cnnlab.config import load_config
from cnnlab.data import DataError, augment_batch, load_source, prepare, stratified_split
from cnnlab.data.augment import affine_grid
from cnnlab.data.loader import expand_offline
from cnnlab.data.stream import fit_normalizer
from cnnlab.data.sources import ANIMAL5_CLASSES, ANIMAL_CLASSES, read_animal_pickle

from conftest import class_pattern, make_image_folder, write_image

ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


@pytest.fixture(scope="module")
def animals():
    return load_source("animal-shapes")


# --------------------------------------------------------------------------- built-in sources

def test_animal_shapes(animals):
    assert len(animals) == 10000
    assert animals.images.shape == (10000, 1, 28, 28)
    assert animals.images.dtype == torch.uint8 and animals.labels.dtype == torch.int64
    assert animals.classes == ANIMALS == ANIMAL_CLASSES
    assert torch.bincount(animals.labels).tolist() == [1000] * 10
    assert animals.counts() == dict.fromkeys(ANIMALS, 1000)
    assert int(animals.images.max()) == 255 and int(animals.images.min()) == 0
    # real silhouettes, not blank or noise: images differ, and classes differ on average
    assert animals.images.float().std() > 30
    means = torch.stack([animals.images[animals.labels == c].float().mean(0) for c in range(10)])
    assert (means[0] - means[1]).abs().mean() > 5


def test_animal_shapes_loads_again_from_cache(animals, cnnlab_cache):
    assert any(p.name.startswith("animal-shapes") for p in cnnlab_cache.iterdir()), \
        "the decoded set is cached under $CNNLAB_CACHE"
    again = load_source("animal-shapes")
    assert torch.equal(again.images, animals.images) and torch.equal(again.labels, animals.labels)


def test_animal_shapes_5(animals):
    ds = load_source("animal-shapes-5")
    assert ds.classes == ["cat", "cow", "elephant", "horse", "sheep"] == ANIMAL5_CLASSES
    assert len(ds) == 5000 and ds.images.shape == (5000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 5
    for new, name in enumerate(ds.classes):  # the same images as the 10-class set, relabelled
        old = ANIMALS.index(name)
        assert torch.equal(ds.images[ds.labels == new], animals.images[animals.labels == old])


def test_resize_and_channels(animals):
    ds = load_source("animal-shapes-5", image_size=64, channels=3)
    assert ds.images.shape == (5000, 3, 64, 64) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 1], ds.images[:, 2])
    # resizing keeps the picture: mean intensity close to the 28 px original's
    src = animals.images[animals.labels == ANIMALS.index("cat")].float()
    dst = ds.images[ds.labels == 0, :1].float()
    assert abs(src.mean() - dst.mean()) < 2.0
    small = torch.nn.functional.interpolate(dst[:50], size=28, mode="area")
    assert (small - src[:50]).abs().mean() < 20


def test_max_per_class_is_seeded_and_stratified():
    a = load_source("animal-shapes", max_per_class=7, seed=1)
    b = load_source("animal-shapes", max_per_class=7, seed=1)
    c = load_source("animal-shapes", max_per_class=7, seed=2)
    assert torch.bincount(a.labels).tolist() == [7] * 10
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_classes_selection_keeps_order():
    ds = load_source("animal-shapes", classes=["zebra", "cat"], max_per_class=5)
    assert ds.classes == ["zebra", "cat"]
    assert torch.bincount(ds.labels).tolist() == [5, 5]
    with pytest.raises(DataError, match="unicorn"):
        load_source("animal-shapes", classes=["cat", "unicorn"])


def test_random_source_is_seeded():
    a = load_source("random", random_samples=50, random_classes=3, image_size=12, channels=3, seed=4)
    b = load_source("random", random_samples=50, random_classes=3, image_size=12, channels=3, seed=4)
    c = load_source("random", random_samples=50, random_classes=3, image_size=12, channels=3, seed=5)
    assert a.images.shape == (50, 3, 12, 12) and a.images.dtype == torch.uint8
    assert a.classes == ["class0", "class1", "class2"]
    assert set(a.labels.tolist()) <= {0, 1, 2}
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.float().std() > 50  # uniform noise over 0..255


def test_unknown_source():
    with pytest.raises(DataError, match="choose one of"):
        load_source("imagenet-22k")


def test_list_datasets():
    names = cnnlab.list_datasets()
    assert {"animal-shapes", "animal-shapes-5", "random"} <= set(names)
    assert any(n.startswith("folder") for n in names)


# --------------------------------------------------------------------------- safe unpickling

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "MARKER"
    bad = tmp_path / "evil.gz"
    with gzip.open(bad, "wb") as f:
        pickle.dump(_RunsCode(marker), f, protocol=4)
    with pytest.raises((pickle.UnpicklingError, DataError), match="system"):
        read_animal_pickle(bad)
    assert not marker.exists()


def test_unpickler_refuses_non_array_builtins(tmp_path):
    p = tmp_path / "obj.gz"
    with gzip.open(p, "wb") as f:
        pickle.dump({"a": __import__("collections").OrderedDict()}, f, protocol=4)
    with pytest.raises((pickle.UnpicklingError, DataError)):
        read_animal_pickle(p)


def test_unpickler_reads_a_numpy_array(tmp_path):
    p = tmp_path / "ok.gz"
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    with gzip.open(p, "wb") as f:
        pickle.dump(arr, f, protocol=4)
    out = read_animal_pickle(p)
    assert isinstance(out, np.ndarray) and np.array_equal(out, arr)


# --------------------------------------------------------------------------- folders

def _folder(source_path, **kw):
    kw.setdefault("progress", False)
    return load_source(f"folder:{source_path}", **kw)


def test_folder_class_layout(image_folder):
    root = image_folder({"cat": 6, "dog": 4, "eel": 5}, size=20)
    ds = _folder(root, image_size=16, channels=1)
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.images.shape == (15, 1, 16, 16) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels).tolist() == [6, 4, 5]
    assert ds.paths[0] == os.path.join("cat", "cat_000.png")
    assert ds.predefined is None and ds.bad_files == []
    for i, p in enumerate(ds.paths):  # each label matches its folder
        assert p.split(os.sep)[0] == ds.classes[int(ds.labels[i])]


def test_folder_pixels_are_decoded_faithfully(tmp_path):
    a = class_pattern(1, 16)
    b = class_pattern(3, 16)
    write_image(tmp_path / "d" / "x" / "a.png", a)
    write_image(tmp_path / "d" / "y" / "b.png", b)
    ds = _folder(tmp_path / "d", image_size=16, channels=1)
    assert np.array_equal(ds.images[0, 0].numpy(), a)
    assert np.array_equal(ds.images[1, 0].numpy(), b)
    rgb = _folder(tmp_path / "d", image_size=16, channels=3)
    assert rgb.images.shape == (2, 3, 16, 16)
    assert np.array_equal(rgb.images[0, 2].numpy(), a)


def test_folder_defaults_to_64px_rgb(image_folder):
    ds = _folder(image_folder({"a": 2, "b": 2}, size=10))
    assert ds.images.shape == (4, 3, 64, 64)


def _mixed_folder(root):
    """Every mode and format a user's folder may hold, plus bad files and clutter."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent → composited over black
    Image.fromarray(rgba, "RGBA").save(root / "cat" / "transparent.png")
    Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(root / "cat" / "palette.gif")
    Image.fromarray(np.full((50, 20), 200, np.uint8), "L").save(root / "cat" / "gray.jpg", quality=95)
    Image.fromarray(np.full((17, 33, 3), 100, np.uint8), "RGB").save(root / "dog" / "flat.bmp")
    Image.fromarray(rgb, "RGB").save(root / "dog" / "photo.webp")
    Image.fromarray(np.full((8, 8, 2), 255, np.uint8), "LA").save(root / "dog" / "la.png")
    jpeg = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(jpeg, "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "cat" / "notes.png").write_text("this is not a picture", encoding="utf-8")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "dog" / "readme.txt").write_text("ignored: not an image extension", encoding="utf-8")
    (root / ".hidden").mkdir()
    Image.fromarray(rgb, "RGB").save(root / ".hidden" / "x.png")
    return root


def test_folder_mixed_modes_and_bad_files(tmp_path):
    root = _mixed_folder(tmp_path / "mixed")
    ds = _folder(root, image_size=12, channels=3)
    assert ds.classes == ["cat", "dog"]  # .hidden is no class
    good = {os.path.join("cat", n) for n in ("transparent.png", "palette.gif", "gray.jpg")} | \
        {os.path.join("dog", n) for n in ("flat.bmp", "photo.webp", "la.png")}
    assert set(ds.paths) == good
    assert ds.images.shape == (6, 3, 12, 12)
    bad = dict(ds.bad_files)
    assert set(bad) == {os.path.join("dog", "truncated.jpg"), os.path.join("dog", "empty.png"),
                        os.path.join("cat", "notes.png")}
    assert all(reason for reason in bad.values())
    assert "empty" in bad[os.path.join("dog", "empty.png")]
    img = {p: ds.images[i] for i, p in enumerate(ds.paths)}
    assert int(img[os.path.join("cat", "transparent.png")].max()) == 0  # transparency over black
    assert (img[os.path.join("cat", "gray.jpg")].int() - 200).abs().max() <= 3
    assert (img[os.path.join("dog", "flat.bmp")].int() == 100).all()
    assert (img[os.path.join("dog", "la.png")].int() == 255).all()
    assert img[os.path.join("cat", "palette.gif")].float().std() > 8  # noise survives, not a flat fill


def test_exif_orientation_and_16_bit(tmp_path):
    left_white = np.zeros((10, 20), np.uint8)
    left_white[:, :5] = 255
    img = Image.fromarray(left_white)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    (tmp_path / "d" / "a").mkdir(parents=True)
    img.save(tmp_path / "d" / "a" / "rotated.jpg", exif=exif.tobytes(), quality=100)
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(tmp_path / "d" / "a" / "deep.png")
    write_image(tmp_path / "d" / "b" / "x.png", np.zeros((4, 4), np.uint8))
    ds = _folder(tmp_path / "d", image_size=20, channels=1)
    rot = ds.images[ds.paths.index(os.path.join("a", "rotated.jpg")), 0].float()
    assert rot[:4].mean() > 240 and rot[6:].mean() < 15  # upright: the white band is now on top
    deep = ds.images[ds.paths.index(os.path.join("a", "deep.png")), 0].int()
    assert (deep - round(40000 / 65535 * 255)).abs().max() <= 1  # 16 bit scaled, not clipped


def test_folder_bad_file_fail_names_the_file(tmp_path):
    root = _mixed_folder(tmp_path / "mixed")
    with pytest.raises(DataError) as e:
        _folder(root, image_size=12, channels=3, on_bad_file="fail")
    assert any(n in str(e.value) for n in ("truncated.jpg", "empty.png", "notes.png"))


def test_folder_fail_after_a_cached_skip_still_fails(tmp_path):
    root = _mixed_folder(tmp_path / "mixed")
    _folder(root, image_size=12, channels=3)  # writes the decode cache
    with pytest.raises(DataError, match=r"(truncated\.jpg|empty\.png|notes\.png)"):
        _folder(root, image_size=12, channels=3, on_bad_file="fail")


def test_folder_cache_sees_changed_files(tmp_path):
    root = make_image_folder(tmp_path / "c", {"a": 3, "b": 3}, size=8)
    first = _folder(root, image_size=8, channels=1)
    write_image(root / "a" / "new.png", np.full((8, 8), 77, np.uint8))
    second = _folder(root, image_size=8, channels=1)
    assert len(second) == len(first) + 1
    idx = second.paths.index(os.path.join("a", "new.png"))
    assert (second.images[idx] == 77).all()


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        _folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="class"):
        _folder(tmp_path / "flat")


def test_folder_train_val_test_layout(tmp_path):
    root = tmp_path / "split"
    for part, n in (("train", 6), ("val", 2), ("test", 3)):
        make_image_folder(root / part, {"ant": n, "bee": n}, size=8, seed=len(part))
    ds = _folder(root, image_size=8, channels=1)
    assert ds.classes == ["ant", "bee"]
    assert len(ds) == 22
    assert ds.predefined is not None
    for part, n in (("train", 12), ("val", 4), ("test", 6)):
        idx = ds.predefined[part]
        assert len(idx) == n
        assert all(ds.paths[i].startswith(part + os.sep) for i in idx)
    split = stratified_split(ds.labels, 0.15, 0.15, seed=0, predefined=ds.predefined)
    assert split.train == sorted(ds.predefined["train"])
    assert split.val == sorted(ds.predefined["val"])
    assert split.test == sorted(ds.predefined["test"])


def test_max_per_class_keeps_each_class_in_each_of_a_folders_parts(tmp_path):
    """A folder's own train/ and test/ (60 and 20 images of each class, as flowers12's 3:1): at most 6 per class
    drawn in proportion from each part (5 and 1: the small part keeps one of every class; drawn from the pooled
    images, a quarter of the classes lost their test images), seeded, and the split keeps the folder's parts."""
    root = tmp_path / "split"
    names = [f"c{i}" for i in range(8)]
    make_image_folder(root / "train", {n: 6 for n in names}, size=4)
    make_image_folder(root / "test", {n: 2 for n in names}, size=4, seed=1)
    from cnnlab.data.dataset import shares

    assert shares(6, [20, 60]) == [1, 5] and shares(2, [20, 60]) == [1, 1] and shares(1, [20, 60]) == [0, 1]
    assert shares(10, [1, 1, 10]) == [1, 1, 8] and shares(5, [3, 2]) == [3, 2]
    full = _folder(root, image_size=4, channels=1)
    for per_class, want in ((3, {"train": 2, "test": 1}), (2, {"train": 1, "test": 1}), (8, {"train": 6, "test": 2})):
        ds = load_source(f"folder:{root}", image_size=4, channels=1, max_per_class=per_class, seed=3, progress=False)
        for part, n in want.items():
            assert torch.bincount(ds.labels[ds.predefined[part]], minlength=8).tolist() == [n] * 8, (per_class, part)
        again = load_source(f"folder:{root}", image_size=4, channels=1, max_per_class=per_class, seed=3,
                            progress=False)
        assert again.paths == ds.paths and set(ds.paths) <= set(full.paths)
        split = stratified_split(ds.labels, 0.0, 0.2, seed=0, predefined=ds.predefined)
        assert split.test == sorted(ds.predefined["test"])


def test_folder_train_test_layout_carves_validation_from_train(tmp_path):
    root = tmp_path / "split"
    make_image_folder(root / "train", {"ant": 10, "bee": 10}, size=8)
    make_image_folder(root / "test", {"ant": 3, "bee": 3}, size=8, seed=1)
    ds = _folder(root, image_size=8, channels=1)
    split = stratified_split(ds.labels, 0.2, 0.3, seed=0, predefined=ds.predefined)
    assert split.test == sorted(ds.predefined["test"])  # the folder's own test part, untouched
    assert set(split.val) <= set(ds.predefined["train"])
    assert torch.bincount(ds.labels[split.val]).tolist() == [2, 2]
    assert set(split.train) | set(split.val) == set(ds.predefined["train"])
    assert not set(split.train) & set(split.val)


# --------------------------------------------------------------------------- splits

def _check_partition(split, n):
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == n
    assert set().union(*parts) == set(range(n))
    assert len(split.train) == len(parts[0])  # no duplicates


def test_split_is_stratified_disjoint_and_covering(animals):
    s = stratified_split(animals.labels, 0.15, 0.2, seed=0)
    _check_partition(s, 10000)
    for part, frac in (("val", 0.15), ("test", 0.2)):
        counts = torch.bincount(animals.labels[getattr(s, part)], minlength=10)
        assert (counts - 1000 * frac).abs().max() <= 1, (part, counts)
    assert s.method == "stratified" and s.seed == 0


def test_split_stratified_with_unbalanced_classes():
    labels = torch.tensor([0] * 103 + [1] * 11 + [2] * 57)[torch.randperm(171, generator=torch.Generator().manual_seed(0))]
    s = stratified_split(labels, 0.2, 0.1, seed=3)
    _check_partition(s, 171)
    for c, n in ((0, 103), (1, 11), (2, 57)):
        assert abs(int((labels[s.val] == c).sum()) - n * 0.2) <= 1
        assert abs(int((labels[s.test] == c).sum()) - n * 0.1) <= 1


def test_split_is_seeded(animals):
    a = stratified_split(animals.labels, 0.2, 0.1, seed=5)
    b = stratified_split(animals.labels, 0.2, 0.1, seed=5)
    c = stratified_split(animals.labels, 0.2, 0.1, seed=6)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.val != c.val and a.test != c.test


def test_split_is_never_the_tail(animals):
    """Keras' validation_split takes the last N % unshuffled: on class-sorted data, one class."""
    assert animals.labels[-2000:].unique().tolist() == [8, 9]  # the data is sorted by class
    s = stratified_split(animals.labels, 0.2, 0.0, seed=0)
    assert s.val != list(range(8000, 10000))
    assert animals.labels[s.val].unique().tolist() == list(range(10))
    assert s.test == []


def test_keras_validation_split_has_no_test_part(animals):
    cfg = load_config(None, ["data.validation_split=0.2"])
    val_f, test_f = split_fractions(cfg)
    assert (val_f, test_f) == (0.2, 0.0)
    s = stratified_split(animals.labels, val_f, test_f, seed=0)
    assert s.test == [] and len(s.val) == 2000 and len(s.train) == 8000


def test_split_keeps_something_to_train_on():
    labels = torch.tensor([0, 0, 1, 1, 1])
    s = stratified_split(labels, 0.5, 0.4, seed=0)
    _check_partition(s, 5)
    assert set(labels[s.train].tolist()) == {0, 1}


def test_split_json_lists_files(image_folder):
    ds = _folder(image_folder({"a": 5, "b": 5}, size=8), image_size=8, channels=1)
    s = stratified_split(ds.labels, 0.2, 0.2, seed=0)
    j = s.to_json(ds.paths, ds.labels, ds.classes)
    assert j["counts"]["test"] == [1, 1] and j["counts"]["val"] == [1, 1]
    assert j["test_files"] == [ds.paths[i] for i in s.test]


# --------------------------------------------------------------------------- augmentation

def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_shape_dtype_and_determinism():
    x = torch.rand(16, 3, 20, 20)
    kw = dict(rotation=15, hflip=0.5, scale=0.1, translate=0.1)
    y = augment_batch(x, _g(1), **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, augment_batch(x, _g(1), **kw))
    assert not torch.equal(y, augment_batch(x, _g(2), **kw))
    assert not torch.equal(y, x)


def test_augment_identity_when_all_off():
    x = torch.rand(8, 1, 10, 10)
    assert torch.equal(augment_batch(x, _g(), rotation=0, hflip=0, scale=0, translate=0), x)


def test_hflip_one_is_an_exact_flip():
    x = torch.rand(8, 2, 9, 13)
    y = augment_batch(x, _g(), rotation=0, hflip=1.0, scale=0, translate=0)
    assert torch.equal(y, x.flip(3))


def test_hflip_half_flips_about_half():
    x = torch.rand(2000, 1, 6, 6)
    y = augment_batch(x, _g(3), hflip=0.5)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert bool((flipped ^ same).all())  # each image is either flipped or untouched
    assert 900 <= int(flipped.sum()) <= 1100


def test_rotation_keeps_mean_intensity(animals):
    x = animals.images[::50].float() / 255  # 200 silhouettes
    y = augment_batch(x, _g(), rotation=30)
    assert not torch.allclose(x, y)
    per_image = (y.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs()
    assert per_image.mean() < 0.03
    assert abs(float(y.mean() - x.mean())) < 0.01


def test_translate_and_scale_change_images_but_not_range():
    x = torch.rand(32, 1, 16, 16)
    y = augment_batch(x, _g(), translate=0.2, scale=0.2)
    assert not torch.allclose(x, y)
    assert float(y.min()) >= -1e-6 and float(y.max()) <= 1 + 1e-6  # bilinear, border padding


@pytest.mark.parametrize("b, h, w", [(128, 28, 28), (3, 17, 40), (1, 1, 5), (5, 64, 9)])
def test_affine_grid_is_torchs(b, h, w):
    """cnnlab's grid (one matrix product) gives torch's F.affine_grid(align_corners=False), non-square and odd
    sizes included, and the warp sampled from it is torch's warp."""
    theta = torch.randn(b, 2, 3, generator=_g(b), dtype=torch.float64)
    ours = affine_grid(theta, [b, 3, h, w])
    assert ours.shape == (b, h, w, 2)
    torch.testing.assert_close(ours, F.affine_grid(theta, [b, 3, h, w], align_corners=False), rtol=0, atol=1e-12)
    x = torch.rand(b, 3, h, w, generator=_g(7))
    grid32, theirs = affine_grid(theta.float(), [b, 3, h, w]), F.affine_grid(theta.float(), [b, 3, h, w], align_corners=False)
    torch.testing.assert_close(F.grid_sample(x, grid32, align_corners=False),
                               F.grid_sample(x, theirs, align_corners=False), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- offline expansion

def test_expand_offline_appends_copies():
    ds = load_source("random", random_samples=40, random_classes=2, image_size=8, seed=0)
    train = [1, 4, 9, 20, 33]
    images, labels, copy_of = expand_offline(ds.images, ds.labels, train, 2, seed=0,
                                             aug_kwargs=dict(rotation=10, hflip=0.5, scale=0.1, translate=0.1))
    assert images.shape == (40 + 10, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images[:40], ds.images)
    assert sorted(copy_of) == sorted(train * 2)
    assert torch.equal(labels[40:], ds.labels[copy_of])
    assert not torch.equal(images[40:], ds.images[copy_of])


def test_expand_offline_copies_are_the_augmented_originals():
    ds = load_source("random", random_samples=20, random_classes=2, image_size=8, seed=0)
    train = [0, 5, 7]
    off = dict(rotation=0, hflip=0, scale=0, translate=0)
    images, _, copy_of = expand_offline(ds.images, ds.labels, train, 3, seed=0, aug_kwargs=off)
    assert torch.equal(images[20:], ds.images[copy_of])
    flip = dict(off, hflip=1.0)
    images, _, copy_of = expand_offline(ds.images, ds.labels, train, 1, seed=0, aug_kwargs=flip)
    assert torch.equal(images[20:], ds.images[copy_of].flip(3))


def test_expand_zero_is_a_no_op():
    ds = load_source("random", random_samples=10, image_size=8, seed=0)
    images, labels, copy_of = expand_offline(ds.images, ds.labels, [0, 1], 0, seed=0, aug_kwargs={})
    assert images is ds.images and copy_of == []


def test_prepare_with_expansion_records_copy_of():
    ds = load_source("random", random_samples=60, random_classes=3, image_size=8, seed=0)
    split = stratified_split(ds.labels, 0.2, 0.2, seed=0)
    n_train = len(split.train)
    data = prepare(ds, split, batch_size=16, eval_batch_size=64, device=torch.device("cpu"), seed=0,
                   expand=2, expand_seed=1)
    assert data.train.num_samples == 3 * n_train
    assert sorted(split.expanded_from) == sorted(split.train * 2)
    j = split.to_json(None, torch.cat([ds.labels, ds.labels[split.expanded_from]]), ds.classes)
    assert j["expanded"]["copies_per_image"] == 2
    assert j["expanded"]["copy_of"] == split.expanded_from
    assert set(j["expanded"]["copy_of"]) <= set(split.train)  # only training images are copied


# --------------------------------------------------------------------------- normalisation

def test_normalizer_uses_training_statistics_only():
    ds = load_source("random", random_samples=300, random_classes=3, image_size=8, channels=3, seed=0)
    split = stratified_split(ds.labels, 0.2, 0.2, seed=0)
    # make validation / test images very different: statistics must not move
    ds.images[split.val + split.test] = 255
    data = prepare(ds, split, batch_size=32, eval_batch_size=1000, device=torch.device("cpu"), seed=0)
    train_px = ds.images[split.train].double() / 255
    expected_mean = train_px.transpose(0, 1).reshape(3, -1).mean(1)
    assert np.allclose(data.normalizer.mean, expected_mean.numpy(), atol=1e-9)
    xs = torch.cat([x for x, _ in data.train])
    assert xs.shape == (len(split.train), 3, 8, 8) and xs.dtype == torch.float32
    per_channel = xs.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1) - 1).abs().max() < 1e-3
    xv = torch.cat([x for x, _ in data.val])
    assert xv.mean() > 1.0  # val (all 255) sits far above the train mean


def test_normalizer_off_is_identity_scaling():
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    n = fit_normalizer(images, enabled=False)
    assert torch.allclose(n(images), images.float() / 255)


def test_train_loader_shuffles_each_epoch_and_covers_all():
    ds = load_source("random", random_samples=50, random_classes=2, image_size=4, seed=0)
    split = stratified_split(ds.labels, 0.0, 0.0, seed=0)
    data = prepare(ds, split, batch_size=8, eval_batch_size=64, device=torch.device("cpu"), seed=0,
                   normalize=False)
    e1 = torch.cat([x for x, _ in data.train])
    e2 = torch.cat([x for x, _ in data.train])
    assert len(data.train) == 7 and e1.shape[0] == 50
    assert not torch.equal(e1, e2)
    key = lambda t: sorted(map(tuple, (t * 255).round().int().flatten(1).tolist()))  # noqa: E731
    assert key(e1) == key(e2) == key(ds.images.float() / 255)


def test_channels_last_loader_gives_the_same_batches_in_channels_last():
    """With channels_last the split is stored channels-last and each batch gathered and normalised in that
    layout (normalize.py's whole-image scale row): the same values, batch by batch, as the NCHW loader's."""
    ds = load_source("random", random_samples=60, random_classes=3, image_size=6, channels=3, seed=0)
    split = stratified_split(ds.labels, 0.2, 0.2, seed=0)
    kw = dict(batch_size=16, eval_batch_size=16, device=torch.device("cpu"), seed=3)
    plain, cl = prepare(ds, split, **kw), prepare(ds, split, channels_last=True, **kw)
    assert cl.train.images.is_contiguous(memory_format=torch.channels_last)
    for a, b in [*zip(plain.train, cl.train), *zip(plain.val, cl.val)]:
        assert b[0].is_contiguous(memory_format=torch.channels_last) and not b[0].is_contiguous()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x = torch.rand(4, 3, 5, 7)  # and from [0, 1] pixels (the RandAugment path), both layouts
    n = plain.normalizer
    assert torch.equal(n.from_unit(x), n.from_unit(x.contiguous(memory_format=torch.channels_last)))
    expected = (x.double() - torch.tensor(n.mean).view(1, 3, 1, 1)) / torch.tensor(n.std).view(1, 3, 1, 1)
    assert (n.from_unit(x).double() - expected).abs().max() < 1e-5
