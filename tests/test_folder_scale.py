"""Folders at scale: every kind of bad file with its exact reason, the incremental decode cache,
`inspect_folder`, and the streaming loader (same batches as the in-memory one)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data import images as images_mod
from cnnlab.data.augment import augment_batch
from cnnlab.data.folder import load_folder_cached, memmap_of
from cnnlab.data.images import DataError
from cnnlab.data.inspect import format_inspection, inspect_folder
from cnnlab.data.loader import DeviceLoader, prepare
from cnnlab.data.split import stratified_split
from cnnlab.data.stream import (
    StreamingLoader,
    default_memory_budget,
    fit_normalizer,
    fits_in_memory,
    parse_bytes,
    prepare_streaming,
)

J = os.path.join
TRUNCATED_JPEG = "truncated JPEG (the file ends before the image data does)"
TRUNCATED_PNG = "truncated PNG (the file ends before the image data does)"


def _load(root, size=16, channels=3, **kw):
    kw.setdefault("progress", False)
    return load_folder_cached(root, size, channels, **kw)


def _noise(h, w, seed=0, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def _save(path, array, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kw)
    return path


def _truncated(path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_noise(24, 30, seed=7)).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _bad_folder(root):
    """Good images (≤ 30×30 px: under the test's pixel limit) beside one of each kind of bad file."""
    for i in range(3):
        _save(root / "cat" / f"good{i}.jpg", _noise(20, 24, seed=i))
    _save(root / "dog" / "only.png", _noise(20, 20, seed=9))  # a class with a single image
    (root / "empty_class").mkdir()
    (root / "cat" / "zero.jpg").write_bytes(b"")
    (root / "cat" / "words.png").write_text("this is not a picture", encoding="utf-8")
    _truncated(root / "cat" / "cut.jpg", "JPEG")
    _truncated(root / "cat" / "cut.png", "PNG")
    _save(root / "cat" / "bomb.png", np.zeros((40, 40), np.uint8))    # 1,600 px: Pillow only warns
    _save(root / "cat" / "bomb2.png", np.zeros((100, 100), np.uint8))  # 10,000 px: Pillow raises
    os.symlink("gone.jpg", root / "cat" / "link.jpg")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "cat" / "._good0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    _save(root / "cat" / ".thumbs" / "t.jpg", _noise(8, 8))
    _save(root / ".hidden" / "x.png", _noise(8, 8))
    _save(root / "__MACOSX" / "cat" / "y.png", _noise(8, 8))
    return root


EXPECTED_BAD = [
    ("empty_class", "empty class folder (no image files)"),
    (J("cat", "bomb.png"), "decompression bomb: 1,600 pixels, over Pillow's limit of 1,000 (PIL.Image.MAX_IMAGE_PIXELS)"),
    (J("cat", "bomb2.png"), "decompression bomb: 10,000 pixels, over Pillow's limit of 1,000 (PIL.Image.MAX_IMAGE_PIXELS)"),
    (J("cat", "cut.jpg"), TRUNCATED_JPEG),
    (J("cat", "cut.png"), TRUNCATED_PNG),
    (J("cat", "link.jpg"), "broken symbolic link (target gone.jpg does not exist)"),
    (J("cat", "words.png"), "not an image (content matches no known image format)"),
    (J("cat", "zero.jpg"), "empty file (0 bytes)"),
]


@pytest.fixture
def low_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_bad_file_is_skipped_with_its_exact_reason(tmp_path, low_pixel_limit):
    root = _bad_folder(tmp_path / "bad")
    ds, stats = _load(root)
    assert ds.bad_files == EXPECTED_BAD
    assert ds.classes == ["cat", "dog"]  # empty_class, .hidden and __MACOSX are no classes
    assert ds.paths == [J("cat", f"good{i}.jpg") for i in range(3)] + [J("dog", "only.png")]
    assert ds.labels.tolist() == [0, 0, 0, 1] and ds.images.shape == (4, 3, 16, 16)
    assert stats.decoded == 10  # 4 good + 6 bad files decoded; the broken link fails its stat
    # second load: the same list, nothing decoded but the bombs (their reason depends on the limit)
    again, stats = _load(root)
    assert again.bad_files == EXPECTED_BAD and torch.equal(again.images, ds.images)
    assert (stats.decoded, stats.reused, stats.bad_cached) == (2, 4, 4)
    # a bad file that is replaced by a good one is retried and kept
    _save(root / "cat" / "cut.jpg", _noise(20, 24, seed=3))
    fixed, stats = _load(root)
    assert J("cat", "cut.jpg") in fixed.paths and stats.decoded == 3
    assert [b for b in fixed.bad_files if b[0] == J("cat", "cut.jpg")] == []


def test_files_that_must_decode_correctly(tmp_path):
    root = tmp_path / "good"
    band = np.zeros((10, 20), np.uint8)
    band[:, :5] = 255  # white band on the left, stored sideways
    img = Image.fromarray(band)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    (root / "a").mkdir(parents=True)
    img.save(root / "a" / "exif_rotated.jpg", exif=exif.tobytes(), quality=100)
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(root / "a" / "cmyk.jpg", quality=100)  # pure red
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(root / "a" / "deep16.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 1: green
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    (root / "b").mkdir()
    pal.save(root / "b" / "palette_alpha.png", transparency=0)
    frames = [Image.new("L", (10, 10), 255), Image.new("L", (10, 10), 0)]
    frames[0].save(root / "b" / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (root / "b" / ".DS_Store").write_bytes(b"junk")
    ds, _ = _load(root, size=20, channels=3)
    assert ds.bad_files == []
    assert sorted(ds.paths) == sorted([J("a", "exif_rotated.jpg"), J("a", "cmyk.jpg"), J("a", "deep16.png"),
                                       J("b", "palette_alpha.png"), J("b", "animated.gif")])
    img = {p: ds.images[i].int() for i, p in enumerate(ds.paths)}
    rot = img[J("a", "exif_rotated.jpg")][0].float()
    assert rot[:4].mean() > 240 and rot[6:].mean() < 15  # upright: the band is now on top
    red = img[J("a", "cmyk.jpg")].float().mean((1, 2))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert (img[J("a", "deep16.png")] - round(40000 / 65535 * 255)).abs().max() <= 1  # scaled, not clipped
    pa = img[J("b", "palette_alpha.png")]
    assert pa[:, 0, 0].tolist() == [0, 0, 0] and pa[:, 10, 10].tolist() == [0, 200, 0]  # transparent → black
    assert (img[J("b", "animated.gif")] == 255).all()  # the first frame


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / "perm"
    for c in ("a", "b"):
        _save(root / c / "ok.png", _noise(8, 8, seed=ord(c)))
    locked = _save(root / "a" / "locked.png", _noise(8, 8))
    real_open = open

    def deny(path, *a, **kw):  # what open() does without read permission (also as root)
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(images_mod, "open", deny, raising=False)
    ds, _ = _load(root)
    assert ds.bad_files == [(J("a", "locked.png"), "permission denied")]
    monkeypatch.undo()
    ds, stats = _load(root)  # not remembered: permissions change without touching mtime or size
    assert ds.bad_files == [] and stats.decoded == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their mode: chmod 000 cannot make a file unreadable")
def test_chmod_000_file_is_skipped(tmp_path):
    root = tmp_path / "perm"
    for c in ("a", "b"):
        _save(root / c / "ok.png", _noise(8, 8, seed=ord(c)))
    locked = _save(root / "a" / "locked.png", _noise(8, 8))
    locked.chmod(0)
    try:
        ds, _ = _load(root)
        assert ds.bad_files == [(J("a", "locked.png"), "permission denied")]
    finally:
        locked.chmod(0o644)


def test_on_bad_file_fail_names_the_file_fresh_and_cached(tmp_path):
    root = tmp_path / "f"
    for c in ("a", "b"):
        for i in range(3):
            _save(root / c / f"{i}.png", _noise(8, 8, seed=i))
    _truncated(root / "a" / "1x.jpg", "JPEG")
    with pytest.raises(DataError, match=r"1x\.jpg: truncated JPEG"):
        _load(root, on_bad_file="fail")
    ds, stats = _load(root)  # the fail run committed what it had decoded: a/0.png and the bad file
    assert ds.bad_files == [(J("a", "1x.jpg"), TRUNCATED_JPEG)]
    assert (stats.reused, stats.bad_cached, stats.decoded) == (2, 1, 4)  # a/0, a/1 kept; a/2, b/* decoded
    with pytest.raises(DataError, match=r"1x\.jpg: truncated JPEG"):  # known from the cache only
        _load(root, on_bad_file="fail")


def _counting(monkeypatch):
    calls = []
    real = images_mod.decode_image

    def decode(path, *a, **kw):
        calls.append(os.path.relpath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(images_mod, "decode_image", decode)
    return calls


def _fresh_decode(root, monkeypatch, tmp_path, **kw):
    """The folder decoded with an empty cache: what the incremental cache must equal."""
    with monkeypatch.context() as m:
        m.setenv("CNNLAB_CACHE", str(tmp_path / f"fresh-cache-{len(list(tmp_path.iterdir()))}"))
        return _load(root, **kw)[0]


def test_cache_add_remove_modify_decodes_only_the_change(tmp_path, monkeypatch):
    root = tmp_path / "inc"
    for c in ("a", "b", "c"):
        for i in range(4):
            _save(root / c / f"{i}.png", _noise(10, 10, seed=10 * ord(c) + i))
    calls = _counting(monkeypatch)
    first, stats = _load(root)
    assert len(calls) == 12 and stats.wrote_images and memmap_of(first.images) is not None

    calls.clear()
    again, stats = _load(root)
    assert calls == [] and not stats.wrote_index and torch.equal(again.images, first.images)

    _save(root / "b" / "new.png", np.full((10, 10, 3), 77, np.uint8))  # add
    calls.clear()
    ds, stats = _load(root)
    assert [os.path.basename(c) for c in calls] == ["new.png"] and stats.reused == 12
    assert (ds.images[ds.paths.index(J("b", "new.png"))] == 77).all()
    assert torch.equal(ds.images, _fresh_decode(root, monkeypatch, tmp_path).images)

    (root / "a" / "2.png").unlink()  # remove
    calls.clear()
    ds, stats = _load(root)
    assert calls == [] and stats.removed == 1 and len(ds) == 12 and J("a", "2.png") not in ds.paths
    assert torch.equal(ds.images, _fresh_decode(root, monkeypatch, tmp_path).images)

    target = root / "c" / "1.png"  # modify: new content and a new mtime
    before = target.stat().st_mtime_ns
    _save(target, np.full((10, 10, 3), 5, np.uint8))
    os.utime(target, ns=(before + 5_000_000_000, before + 5_000_000_000))
    calls.clear()
    ds, stats = _load(root)
    assert [os.path.basename(c) for c in calls] == ["1.png"] and stats.reused == 11
    assert (ds.images[ds.paths.index(J("c", "1.png"))] == 5).all()
    assert torch.equal(ds.images, _fresh_decode(root, monkeypatch, tmp_path).images)
    assert sorted(p.name for p in stats.cache.iterdir() if p.suffix == ".npy") == \
        [json.loads((stats.cache / "index.json").read_text())["images"]]  # old data files removed


def test_a_damaged_cache_is_never_trusted(tmp_path, monkeypatch):
    root = tmp_path / "dmg"
    for c in ("a", "b"):
        for i in range(3):
            _save(root / c / f"{i}.png", _noise(8, 8, seed=i + ord(c)))
    ds, stats = _load(root)
    ref = ds.images.clone()
    index = json.loads((stats.cache / "index.json").read_text())
    data = stats.cache / index["images"]
    damaged = data.with_name("damaged")
    damaged.write_bytes(data.read_bytes()[:-10])
    os.replace(damaged, data)  # a truncated data file (a new inode: `ds` keeps its own mapping)
    again, stats = _load(root)
    assert stats.decoded == 6 and torch.equal(again.images, ref)  # re-decoded, not trusted
    (stats.cache / "index.json").write_text("{not json")  # a garbled index: the same
    again, stats = _load(root)
    assert stats.decoded == 6 and torch.equal(again.images, ref)
    assert not [p for p in stats.cache.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- inspect

def test_inspect_finds_a_leak_a_label_conflict_and_bad_files(tmp_path):
    root = tmp_path / "insp"
    for part, n in (("train", 5), ("test", 2)):
        for c in ("ant", "bee"):
            for i in range(n):
                _save(root / part / c / f"{i}.png", _noise(12 + i, 16, seed=100 * len(part) + 10 * ord(c[0]) + i))
    leaked = (root / "train" / "ant" / "3.png").read_bytes()
    (root / "test" / "ant" / "copy_of_train.png").write_bytes(leaked)            # train → test leak
    (root / "train" / "bee" / "same_as_ant0.png").write_bytes((root / "train" / "ant" / "0.png").read_bytes())
    (root / "train" / "bee" / "zero.png").write_bytes(b"")
    r = inspect_folder(root, image_size=32, val_fraction=0.0)  # the folder's own parts only
    assert r["classes"] == ["ant", "bee"] and r["counts"] == {"ant": 8, "bee": 8}
    assert r["layout"] == "train/val/test folders" and r["split"]["method"] == "folder"
    assert r["bad_files"] == [[J("train", "bee", "zero.png"), "empty file (0 bytes)"]]
    leak = [g for g in r["duplicates"] if any(k.startswith("leak") for k in g["kinds"])]
    assert len(leak) == 1 and leak[0]["kinds"] == ["leak: train / test"]
    assert {(f["path"], f["part"]) for f in leak[0]["files"]} == {
        (J("train", "ant", "3.png"), "train"), (J("test", "ant", "copy_of_train.png"), "test")}
    conflict = [g for g in r["duplicates"] if "label conflict" in g["kinds"]]
    assert {f["class"] for f in conflict[0]["files"]} == {"ant", "bee"}
    assert r["duplicate_summary"]["leaks"] == 1 and r["imbalance"]["ratio"] == 1.0
    assert r["width"] == {"min": 16, "median": 16, "max": 16} and r["height"]["min"] == 12
    text = format_inspection(r)
    assert "leak: train / test" in text and "copy_of_train.png [test]" in text and "zero.png" in text


def test_inspect_flags_a_leak_the_default_split_would_make(tmp_path):
    root = tmp_path / "flat"
    for c in ("x", "y"):
        for i in range(10):
            _save(root / c / f"{i}.png", _noise(8, 8, seed=ord(c) * 100 + i))
    assert inspect_folder(root)["duplicates"] == []
    # a copy named to sort last in class x is image 10 whatever it copies: the split (class sizes
    # and seed) is known before choosing which file it copies — pick one in another part
    dup = root / "x" / "zz_copy.png"
    dup.write_bytes((root / "x" / "0.png").read_bytes())
    ds, _ = _load(root)
    split = stratified_split(ds.labels, 0.15, 0.15, 0)
    part = {i: p for p in ("train", "val", "test") for i in getattr(split, p)}
    assert ds.paths[10] == J("x", "zz_copy.png")
    source = next(i for i in range(10) if part[i] != part[10])
    dup.write_bytes((root / ds.paths[source]).read_bytes())
    r = inspect_folder(root)
    parts = [p for p in ("train", "val", "test") if p in (part[source], part[10])]
    assert [g["kinds"] for g in r["duplicates"]] == [[f"leak: {' / '.join(parts)}"]]
    assert {f["path"] for f in r["duplicates"][0]["files"]} == {ds.paths[source], J("x", "zz_copy.png")}


# --------------------------------------------------------------------------- streaming

def _batches(loader, epochs=2):
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in loader]


def _augmenter(seed, kwargs):
    g = torch.Generator().manual_seed(seed)
    return lambda x: augment_batch(x, g, **kwargs)


def test_streaming_loader_yields_the_in_memory_batches(tmp_path):
    root = tmp_path / "s"
    for c in ("a", "b", "c"):
        for i in range(13):
            _save(root / c / f"{i}.png", _noise(12, 12, seed=ord(c) * 100 + i))
    ds, _ = _load(root, size=8)
    assert memmap_of(ds.images) is not None
    split = stratified_split(ds.labels, 0.2, 0.2, 0)
    norm = fit_normalizer(ds.images, split.train)
    ref = ds.images[split.train].transpose(0, 1).reshape(3, -1).double() / 255  # float64 reference
    assert np.allclose(norm.mean, ref.mean(1).tolist(), atol=1e-12)
    assert np.allclose(norm.std, ref.std(1).tolist(), atol=1e-12)
    aug = {"rotation": 10.0, "hflip": 0.5, "scale": 0.1, "translate": 0.1}
    t = torch.tensor(split.train)
    for prefetch in (True, False):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        mem = DeviceLoader(ds.images[t], ds.labels[t], norm, 7, shuffle=True, generator=g1,
                           augment=_augmenter(6, aug), channels_last=True)
        stream = StreamingLoader(ds.images, ds.labels, norm, 7, shuffle=True, generator=g2,
                                 augment=_augmenter(6, aug), channels_last=True,
                                 indices=split.train, prefetch=prefetch, release_bytes=1000)
        assert len(stream) == len(mem) and stream.num_samples == mem.num_samples
        for (xm, ym), (xs, ys) in zip(_batches(mem), _batches(stream), strict=True):
            assert torch.equal(xm, xs) and torch.equal(ym, ys) and ys.dtype == torch.int64
            assert xs.is_contiguous(memory_format=torch.channels_last)
    # prepare vs prepare_streaming: the same train / val / test batches for the same seed
    kw = {"batch_size": 8, "eval_batch_size": 5, "device": torch.device("cpu"), "seed": 3, "augment": aug}
    mem = prepare(ds, stratified_split(ds.labels, 0.2, 0.2, 0), **kw)
    streamed = prepare_streaming(ds, stratified_split(ds.labels, 0.2, 0.2, 0), normalizer=mem.normalizer, **kw)
    for part in ("train", "val", "test"):
        for (xm, ym), (xs, ys) in zip(_batches(getattr(mem, part)), _batches(getattr(streamed, part)), strict=True):
            assert torch.equal(xm, xs) and torch.equal(ym, ys)
    assert streamed.eval_part == mem.eval_part == "test"
    if hasattr(mem.train, "iterate"):  # a resumed epoch: the same order, from batch 2 on
        order = mem.train.new_order()
        assert torch.equal(order, streamed.train.new_order())
        for (xm, ym), (xs, ys) in zip(mem.train.iterate(order, 2), streamed.train.iterate(order, 2), strict=True):
            assert torch.equal(xm, xs) and torch.equal(ym, ys)


def test_memory_budget():
    assert fits_in_memory(1000, 3, 64, 64, budget_bytes=1000 * 3 * 64 * 64)
    assert not fits_in_memory(1001, 3, 64, 64, budget_bytes=1000 * 3 * 64 * 64)
    assert default_memory_budget() > 0
    assert parse_bytes("1.5GB") == 3 << 29 and parse_bytes("800 MiB") == 800 << 20 and parse_bytes(4096) == 4096
    assert 0 < parse_bytes("10%") <= default_memory_budget(fraction=0.1) * 1.5
    with pytest.raises(ValueError, match="unit"):
        parse_bytes("12 parsecs")
    with pytest.raises(DataError, match="data.expand"):
        prepare_streaming(None, None, batch_size=1, eval_batch_size=1, device="cpu", seed=0, expand=2)


# --------------------------------------------------------------------------- end to end through training / CLI

def test_streamed_run_equals_in_memory_run(tmp_path):
    """Same seed, one run held in memory and one streamed from the memory-mapped cache (budget 1 byte)."""
    from conftest import fit_run, make_image_folder

    root = make_image_folder(tmp_path / "imgs", {"a": 30, "b": 30, "c": 30}, size=24)
    common = [f"data.source=folder:{root}", "data.image_size=16", "model.name=mlp", "train.epochs=2",
              "data.batch_size=16", "data.augment=true"]
    mem = fit_run(common, out=tmp_path / "mem")
    streamed = fit_run(common + ["data.memory_budget=1"], out=tmp_path / "stream")
    assert streamed.env["loader"].startswith("streamed") and mem.env["loader"] == "in memory"
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(streamed.history) == strip(mem.history)
    assert streamed.metrics["accuracy"] == mem.metrics["accuracy"] and streamed.metrics["loss"] == mem.metrics["loss"]


def test_cli_datasets_inspect_finds_a_train_test_leak(tmp_path, cnnlab_bin):
    import shutil
    import subprocess

    from conftest import make_image_folder

    root = tmp_path / "split"
    make_image_folder(root / "train", {"cat": 5, "dog": 5}, size=20, seed=1)
    make_image_folder(root / "test", {"cat": 3, "dog": 3}, size=20, seed=2)
    leaked = sorted((root / "train" / "cat").iterdir())[0]
    shutil.copy(leaked, root / "test" / "cat" / "copied-from-train.png")
    r = subprocess.run([str(cnnlab_bin), "datasets", "inspect", f"folder:{root}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "leak" in r.stdout and "copied-from-train.png" in r.stdout


def _interrupt_at_line(k: int, functions: set[str]):
    """A tracer that raises KeyboardInterrupt at the k-th line executed in `functions` of cnnlab/data/folder.py,
    as a Ctrl-C arriving between those two lines would (signal handlers run between bytecodes)."""
    seen = [0]

    def local(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == k:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        code = frame.f_code
        if code.co_filename.endswith((os.path.join("data", "folder.py"), os.path.join("data", "npyfile.py"))) \
                and code.co_name in functions:
            return local
        return None

    return tracer, seen


CACHE_WRITERS = {"_update", "append", "write_raw", "finish", "_commit", "copy_rows", "_write_index", "_cleanup"}


@pytest.mark.parametrize("cached", [0, 4], ids=["fresh", "partly-cached"])
def test_an_interrupt_at_any_line_of_a_cache_update_never_leaves_a_wrong_image(tmp_path, monkeypatch, cached):
    """Ctrl-C at every line of the decode-and-commit code in turn, then a normal load: every image must
    equal a fresh decode (no all-zero row recorded before its pixels were written, no half-made file)."""
    import sys

    root = tmp_path / "photos"
    files = [root / c / f"{i}.png" for c in ("a", "b") for i in range(3)]
    for n, f in enumerate(files):
        _save(f, _noise(12, 12, seed=n))
    expected = _fresh_decode(root, monkeypatch, tmp_path).images.clone()
    assert all(expected[i].any() for i in range(len(expected)))
    k, interrupted = 0, 0
    while True:
        k += 1
        monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / f"cache{k}"))
        if cached:  # a cache holding some of the files, so the commit merges old and new rows
            hidden = files[cached:]
            for f in hidden:
                f.rename(f.with_suffix(".hidden"))
            _load(root)
            for f in hidden:
                f.with_suffix(".hidden").rename(f)
        tracer, seen = _interrupt_at_line(k, CACHE_WRITERS)
        sys.settrace(tracer)
        try:
            _load(root)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        if seen[0] < k:  # the load ran to the end before the k-th line: every line has been tried
            break
        ds, _ = _load(root)
        assert torch.equal(ds.images, expected), f"wrong pixels after an interrupt at line {k} of the update"
    assert interrupted > 50
