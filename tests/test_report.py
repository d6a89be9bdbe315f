"""The report: figures of a run and of a study, misclassified.csv, the chance sentence, report.html
opened in headless Chromium (every image loads, no console errors, no network URL)."""

from __future__ import annotations

import ast
import base64
import csv
import html as htmllib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnlab
from cnnlab import report
from cnnlab.report import plots, tables
from cnnlab.stats import format_p

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
RUN_PLOTS = ["curves.png", "confusion.png", "predictions.png", "confused.png", "class_counts.png"]
TINY = {"data.max_per_class": 30, "data.batch_size": 32, "train.epochs": 2, "train.seed": 0}


# --------------------------------------------------------------------------- fixtures: real runs

@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory, cnnlab_cache) -> Path:
    """A small harahap-cnn run on Animal-Shape (10 classes, 40 test images), reported once."""
    out = tmp_path_factory.mktemp("report-runs") / "tiny"
    cnnlab.train(None, dict(TINY, name="tiny"), out=out, progress="none", quiet=True)
    report.write_report(out)
    return out


@pytest.fixture(scope="module")
def harahap_dir(tmp_path_factory, cnnlab_cache) -> Path:
    """The first paper's recipe as printed: 100 random images, validation split 0.2, 10 epochs."""
    out = tmp_path_factory.mktemp("report-runs") / "harahap2024"
    cnnlab.train(ROOT / "recipes" / "harahap2024.yaml", out=out, progress="none", quiet=True)
    return out


def _stat(values: list[float]) -> dict:
    from scipy import stats

    v = np.asarray(values, float)
    if len(v) < 2:
        return {"mean": float(v.mean()), "sd": None, "ci95": None, "values": v.tolist()}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v)))
    return {"mean": float(v.mean()), "sd": sd, "ci95": [float(v.mean()) - half, float(v.mean()) + half],
            "values": v.tolist()}


def _correct(run: Path) -> dict[int, int]:
    with open(run / "predictions.csv", newline="") as f:
        return {int(r["index"]): int(r["correct"]) for r in csv.DictReader(f)}


def make_study(root: Path) -> Path:
    """2 variants × 2 seeds of real tiny runs + a summary.json written by hand to compare.py's schema."""
    from scipy.stats import binomtest, ttest_rel

    study = root / "study"
    base = {"data.source": "animal-shapes-5", "data.max_per_class": 40, "data.batch_size": 32,
            "train.epochs": 3, "train.early_stopping.patience": 1}
    defs = {"cnn-adam": {"model.name": "alkhairi-cnn", "optim.name": "adam", "optim.lr": 0.001},
            "mlp-sgd": {"model.name": "mlp", "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.0}}
    seeds, variants = [0, 1], []
    for name, settings in defs.items():
        runs, metrics = [], []
        for s in seeds:
            rel = f"runs/{name}/seed-{s}"
            cnnlab.train(None, {**base, **settings, "train.seed": s, "name": f"{name}-seed-{s}"}, out=study / rel,
                         progress="none", quiet=True)
            runs.append(rel)
            metrics.append(json.loads((study / rel / "metrics.json").read_text()))
        agg = {k: _stat([m[k] for m in metrics]) for k in ("accuracy", "loss", "best_epoch", "precision_macro",
                                                            "recall_macro", "f1_macro", "training_seconds")}
        variants.append({"name": name, "settings": settings, "runs": runs, "failed": [],
                         "model": settings["model.name"], "optimizer": settings["optim.name"],
                         "lr": settings["optim.lr"], "parameters": metrics[0]["parameters"], "metrics": agg,
                         "evaluated_on": metrics[0]["evaluated_on"], "n_eval": metrics[0]["n"]})
    variants.sort(key=lambda v: -v["metrics"]["accuracy"]["mean"])
    best = variants[0]
    comparisons, chance = [], []
    for v in variants[1:]:
        b = c = 0
        for rb, rv in zip(best["runs"], v["runs"]):
            cb, cv = _correct(study / rb), _correct(study / rv)
            b += sum(cb[i] and not cv[i] for i in cb)
            c += sum(cv[i] and not cb[i] for i in cb)
        p_mc = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
        p_t = float(ttest_rel(best["metrics"]["accuracy"]["values"], v["metrics"]["accuracy"]["values"]).pvalue)
        diff = 100 * (best["metrics"]["accuracy"]["mean"] - v["metrics"]["accuracy"]["mean"])
        comparisons.append({"variant": v["name"], "against": best["name"], "difference_points": diff,
                            "mcnemar_p": p_mc, "ttest_p": p_t, "n_pairs": v["n_eval"] * len(seeds),
                            "seeds": len(seeds),
                            "sentence": f"{v['name']} is worse than {best['name']}: {diff:.1f} points, "
                                        f"{format_p(p_mc)} (McNemar), {len(seeds)} seeds"})
    for v in variants:
        m0 = json.loads((study / v["runs"][0] / "metrics.json").read_text())
        level, p = tables.chance_of(m0), m0["chance"]["p_value_above_chance"]
        chance.append({"variant": v["name"], "accuracy": v["metrics"]["accuracy"]["mean"], "chance": level,
                       "p_value": p, "sentence": f"{v['name']}: accuracy {v['metrics']['accuracy']['mean']:.3f} vs "
                                                 f"chance {level:.3f}, {format_p(p)} (exact binomial)"})
    summary = {"name": "tiny-study", "study_file": "tiny-study.yaml", "seeds": seeds, "averaging": "macro",
               "variants": variants, "best": best["name"], "comparisons": comparisons, "chance": chance}
    (study / "summary.json").write_text(json.dumps(summary, indent=2))
    (study / "table.md").write_text("| variant | accuracy |\n|---|---|\n" + "".join(
        f"| {v['name']} | {v['metrics']['accuracy']['mean']:.3f} |\n" for v in variants))
    return study


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, cnnlab_cache) -> Path:
    study = make_study(tmp_path_factory.mktemp("report-study"))
    report.write_report(study)
    return study


def _png_ok(path: Path, min_w: int = 300, min_h: int = 150, max_side: int = 6000) -> tuple[int, int]:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        extrema = im.convert("L").getextrema()
    assert min_w <= w <= max_side and min_h <= h <= max_side, (path, w, h)
    assert extrema[0] != extrema[1], f"{path} is blank"
    return w, h


# --------------------------------------------------------------------------- a run


def test_image_grid_frames_and_titles_each_image_in_its_verdicts_colour(tmp_path):
    """image_grid: each image drawn inside a frame of the verdict's colour (right / wrong), its title above it in
    that colour, in reading order; a 1-channel image in grey, an RGB one in its colours, non-square ones too."""
    grey = np.full((1, 10, 14), 128, np.uint8)
    blue = np.zeros((3, 12, 9), np.uint8)
    blue[2] = 200
    out = plots.image_grid([grey, blue], ["a / a (0.90)", "b / c (0.70)"], [True, False], tmp_path / "g.png",
                           columns=2, title="two images")
    px = np.asarray(Image.open(out).convert("RGB")).astype(int)

    def frame(colour: str) -> tuple[int, int, int, int, np.ndarray]:
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        hit = np.abs(px - rgb).sum(2) <= 6
        # the frame's top and bottom edges: runs of the colour most of an image wide (1.30 in), which no title has
        lines = np.nonzero(hit.sum(1) >= 0.8 * 1.30 * plots.DPI)[0]
        assert len(lines), f"no frame in {colour}"
        top, bottom = lines.min(), lines.max()
        xs = np.nonzero(hit[top])[0]
        return top, bottom, xs.min(), xs.max(), hit

    boxes = {}
    for colour, inside in ((plots.RIGHT, (128, 128, 128)), (plots.WRONG, (0, 0, 200))):
        top, bottom, left, right, hit = frame(colour)
        assert min(bottom - top, right - left) > 0.8 * 1.30 * plots.DPI, (colour, top, bottom, left, right)
        middle = px[(top + bottom) // 2, (left + right) // 2]
        assert np.abs(middle - inside).sum() <= 6, (colour, middle)  # the image inside its frame, as given
        title = np.nonzero(hit[:top - 3])  # pixels of the colour above the frame: its title
        assert len(title[0]) > 20, colour
        assert 0 < top - title[0].max() <= 0.1 * plots.DPI, colour  # just above the frame (a 3-point pad)
        assert left <= title[1].mean() <= right, colour  # centred over its own image
        boxes[colour] = (left, right)
    assert boxes[plots.RIGHT][1] < boxes[plots.WRONG][0]  # reading order: the first image on the left


def test_run_plots_are_valid_pngs(tiny_run_dir):
    for name in RUN_PLOTS:
        _png_ok(tiny_run_dir / "plots" / name)
    w, h = _png_ok(tiny_run_dir / "plots" / "predictions.png")
    assert w > h  # 5 rows × 8 columns
    assert (tiny_run_dir / "report.html").is_file()


def test_plot_run_returns_the_files_it_writes(tiny_run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("plots", "report.html", "misclassified.csv"))
    files = report.plot_run(run)
    assert {p.name for p in files} >= set(RUN_PLOTS) | {"misclassified.csv"}
    assert all(p.is_file() for p in files)


def test_misclassified_csv_is_the_wrong_predictions_most_confident_first(tiny_run_dir):
    with open(tiny_run_dir / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    with open(tiny_run_dir / "misclassified.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wrong = [r for r in preds if r["correct"] == "0"]
    assert wrong, "the 2-epoch run is expected to make mistakes"
    expected = sorted(wrong, key=lambda r: -float(r["confidence"]))
    assert [(r["index"], r["true"], r["predicted"], r["confidence"]) for r in rows] == \
        [(r["index"], r["true"], r["predicted"], r["confidence"]) for r in expected]
    assert list(rows[0]) == ["index", "file", "true", "predicted", "confidence"]
    conf = [float(r["confidence"]) for r in rows]
    assert conf == sorted(conf, reverse=True)


def test_run_report_states_metrics_and_chance(tiny_run_dir):
    html = htmllib.unescape((tiny_run_dir / "report.html").read_text())
    m = json.loads((tiny_run_dir / "metrics.json").read_text())
    assert tables.chance_sentence(m)[1:] in html
    for text in ("macro average", "weighted average", "95 % interval", "config.yaml", "env.json",
                 'href="misclassified.csv"', f"{m['accuracy']:.3f}", "bear", "zebra", "train images",
                 tables.balance_sentence(m, m["classes"])):
        assert text in html, text
    assert html.count('src="data:image/png;base64,') == len(RUN_PLOTS)
    # per-class counts: 30 images per class split 22 / 4 / 4 (TINY's max_per_class)
    counts = m["class_counts"]
    assert [a + b + c for a, b, c in zip(counts["train"], counts["val"], counts["test"])] == [30] * 10
    assert "The classes are balanced (22 training images each)." in html


def test_first_papers_recipe_report_states_validation_accuracy_against_chance(harahap_dir):
    path = report.write_report(harahap_dir)
    html = htmllib.unescape(path.read_text())
    m = json.loads((harahap_dir / "metrics.json").read_text())
    assert m["evaluated_on"] == "val" and m["n"] == 20
    sentence = re.search(r"alidation accuracy (0\.\d{3}) on 20 images is (not )?significantly above chance "
                         r"(0\.\d{3}) \(p (=|<) ([0-9.]+), exact binomial\)", html)
    assert sentence, "no chance sentence in the report"
    assert float(sentence.group(1)) == pytest.approx(m["accuracy"], abs=5e-4)
    assert float(sentence.group(3)) == pytest.approx(max(m["chance"]["accuracy"], m["chance"]["uniform"]), abs=5e-4)
    assert (sentence.group(2) is None) == (m["chance"]["p_value_above_chance"] < 0.05)
    for name in RUN_PLOTS[:3]:  # random images can be redrawn (the source is seeded)
        _png_ok(harahap_dir / "plots" / name)


def test_chance_sentence_wording():
    m = {"accuracy": 0.6, "n": 20, "evaluated_on": "val",
         "chance": {"accuracy": 0.55, "uniform": 0.5, "p_value_above_chance": 0.4159}}
    assert tables.chance_sentence(m) == ("validation accuracy 0.600 on 20 images is not significantly above "
                                         "chance 0.550 (p = 0.42, exact binomial)")
    m.update(accuracy=0.95, evaluated_on="test", chance={"accuracy": 0.2, "uniform": 0.25,
                                                         "p_value_above_chance": 1e-9})
    assert tables.chance_sentence(m) == ("test accuracy 0.950 on 20 images is significantly above chance 0.250 "
                                         "(p < 0.001, exact binomial)")


def test_missing_data_source_skips_the_image_grids_with_a_note(tiny_run_dir, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("plots", "report.html"))
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("source: animal-shapes", f"source: folder:{tmp_path / 'gone'}"))
    html = htmllib.unescape(report.write_report(run).read_text())
    assert "Image grids skipped" in html and "could not be read again" in html
    assert (run / "plots" / "curves.png").is_file() and not (run / "plots" / "predictions.png").exists()
    assert (run / "misclassified.csv").is_file()


def test_folder_run_report_shows_rgb_images_files_and_bad_files(image_folder, tmp_path):
    root = image_folder({"cat": 10, "dog": 10, "fox": 10}, size=16, mode="RGB")
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "folder-run"
    cnnlab.train(None, {"data.source": f"folder:{root}", "data.image_size": 16, "data.batch_size": 8,
                        "train.epochs": 1, "name": "folder-run"}, out=out, progress="none", quiet=True)
    html = htmllib.unescape(report.write_report(out).read_text())
    assert "Bad files (1)" in html and "cat/broken.jpg" in html
    _png_ok(out / "plots" / "predictions.png", min_h=100)
    with open(out / "predictions.csv", newline="") as f:
        files = {r["file"] for r in csv.DictReader(f)}
    assert files and all(f.endswith(".png") for f in files)
    with open(out / "misclassified.csv", newline="") as f:
        assert all(r["file"] in files for r in csv.DictReader(f))


def test_report_reuses_up_to_date_plots(tiny_run_dir):
    before = {p.name: p.stat().st_mtime_ns for p in (tiny_run_dir / "plots").glob("*.png")}
    report.write_report(tiny_run_dir)
    after = {p.name: p.stat().st_mtime_ns for p in (tiny_run_dir / "plots").glob("*.png")}
    assert before == after


def test_confusion_scales_to_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    for k in (2, 50):
        cm = rng.integers(0, 20, (k, k)) + np.eye(k, dtype=int) * 40
        w, h = _png_ok(plots.confusion(cm, [f"class-{i:02d}" for i in range(k)], tmp_path / f"cm{k}.png"))
        assert w < 4000


def test_study_curves_handle_ragged_histories(tmp_path):
    def hist(n, shift):
        return [{"epoch": e, "val_accuracy": 0.3 + 0.05 * e + shift, "val_loss": 2 - 0.1 * e} for e in range(1, n + 1)]
    path = plots.study_curves({"a": [hist(5, 0), hist(3, 0.02)], "b": [hist(2, -0.1)]}, tmp_path / "c.png",
                              chance=0.2)
    _png_ok(path)


def test_report_never_imports_train():
    for py in Path(report.__file__).parent.glob("*.py"):
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert not re.match(r"^(\.\.|cnnlab\.)(train|api|compare)\b", mod), f"{py.name} imports {mod}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith(("cnnlab.train", "cnnlab.api")) for a in node.names), py.name


# --------------------------------------------------------------------------- a study

def test_study_plots_and_links(study_dir):
    for name in ("curves.png", "comparison.png", "confusion.png"):
        _png_ok(study_dir / "plots" / name)
    summary = json.loads((study_dir / "summary.json").read_text())
    html = htmllib.unescape((study_dir / "report.html").read_text())
    for v in summary["variants"]:
        first = study_dir / v["runs"][0]
        for name in RUN_PLOTS[:3]:
            _png_ok(first / "plots" / name)
        for r in v["runs"]:
            assert f'href="{r}/report.html"' in html
            assert (study_dir / r / "report.html").is_file()
    for s in [c["sentence"] for c in summary["comparisons"]] + [c["sentence"] for c in summary["chance"]]:
        assert s in html
    assert 'href="table.md"' in html and "F1 (macro)" in html and "2 seeds" in html


def test_plot_study_returns_its_files_and_each_first_runs(study_dir):
    files = report.plot_study(study_dir)
    names = {p.relative_to(study_dir).as_posix() for p in files}
    assert {"plots/curves.png", "plots/comparison.png", "plots/confusion.png"} <= names
    assert "runs/cnn-adam/seed-0/plots/curves.png" in names and "runs/mlp-sgd/seed-0/plots/curves.png" in names


def test_main_report_cli_errors_on_a_plain_folder(tmp_path, capsys):
    class Args:
        folder = str(tmp_path)
    assert report.main_report(Args()) == 2
    assert "neither a run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- in a real browser

def _browser():
    """Headless Debian Chromium through Selenium; skip without it (fail on CI)."""
    def missing(why):
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser test cannot run on CI: {why}")
        pytest.skip(why)

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install 'selenium>=4.20')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium or not Path("/usr/bin/chromedriver").exists():
        missing("Chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="cnnlab-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    return driver, profile


@pytest.fixture(scope="module")
def browser():
    driver, profile = _browser()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


NETWORK_URL = re.compile(r"""(?:src|href|action|srcset|poster|data)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?"""
                         r"""\s*(?:https?:)?//|@import""", re.I)


def _full_page_screenshot(driver, path: Path) -> None:
    """The whole page, not just the viewport (Chrome DevTools' captureBeyondViewport)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000), "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def _check_page(driver, html_path: Path, min_images: int, screenshot: Path) -> None:
    html = html_path.read_text()
    assert not NETWORK_URL.search(html), NETWORK_URL.search(html).group(0)
    assert "<script" not in html.lower()
    driver.get_log("browser")  # drop what an earlier page logged
    driver.set_window_size(1280, 900)  # scrollHeight is never less than the window: start small
    driver.get(html_path.resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
        "i.getAttribute('alt')])")
    assert len(images) >= min_images, images
    for complete, w, h, alt in images:
        assert complete and w > 0 and h > 0, f"image {alt!r} did not load"
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    ARTIFACTS.mkdir(exist_ok=True)
    _full_page_screenshot(driver, screenshot)
    _png_ok(screenshot, max_side=9000)  # a whole page: config.yaml and env.json make it long


def test_run_report_in_chromium(browser, tiny_run_dir):
    _check_page(browser, tiny_run_dir / "report.html", 4, ARTIFACTS / "report-run.png")


def test_study_report_in_chromium(browser, study_dir):
    _check_page(browser, study_dir / "report.html", 3, ARTIFACTS / "report-study.png")
    _check_page(browser, study_dir / "runs" / "mlp-sgd" / "seed-0" / "report.html", 3,
                ARTIFACTS / "report-study-run.png")
