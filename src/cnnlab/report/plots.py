"""The figures, drawn with matplotlib's Agg canvas (no pyplot: no global backend, no figure registry).

Each function takes plain data (lists, dicts, arrays) and writes one PNG; reading run
folders is `tables.py`'s job. Colours follow the second paper: training red, validation
blue (its Figure 6); right green, wrong red (its Figure 8).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..display import escape_char, printable
from ..fileio import replacing

TRAIN, VAL = "#d62728", "#1f77b4"  # red / blue as in the second paper's Figure 6
RIGHT, WRONG = "#1a9641", "#d7191c"  # green / red as in its Figure 8
CHANCE = "#6b6b6b"
VARIANT_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"]
DPI = 110
GRID_ROWS, GRID_COLUMNS = 5, 8  # the prediction grid, as in the second paper's Figure 8

STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "axes.labelsize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
    "grid.linewidth": 0.6, "legend.frameon": False, "legend.fontsize": 9, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "figure.facecolor": "white", "savefig.facecolor": "white",
}


# Fonts for names in any script: DejaVu Sans, then any installed font of these families (matplotlib falls
# back glyph by glyph along font.family). A character none of them has is drawn as its escape (\u732b)
# instead of an empty box with a "Glyph missing" warning on stderr.
FALLBACK_FONTS = ("CJK", "Han Sans", "Han Serif", "WenQuanYi", "Droid Sans Fallback", "Unifont")


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[tuple[str, ...], frozenset[int]]:
    """(font families in fallback order, the code points they cover together)."""
    from matplotlib import font_manager, ft2font

    families = ["DejaVu Sans"] + sorted({f.name for f in font_manager.fontManager.ttflist
                                         if any(h in f.name for h in FALLBACK_FONTS)})
    chars: set[int] = set()
    for family in families:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
            chars |= set(ft2font.FT2Font(path).get_charmap())
        except (ValueError, RuntimeError, OSError):
            continue
    return tuple(families), frozenset(chars)


def _style() -> dict:
    return {**STYLE, "font.family": list(_fonts()[0])}


def drawable(text: str) -> str:
    """`text` as a figure can show it: control characters and glyphs no font has escaped, '$' not mathtext."""
    covered = _fonts()[1]
    text = "".join(c if ord(c) in covered or c == " " else escape_char(c) for c in printable(text))
    return text.replace("$", r"\$")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, ".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", pad_inches=0.12)
    return path


def short(name: str, limit: int = 14) -> str:
    """A class or variant name, drawable, cut to `limit` characters (with an ellipsis) for crowded labels."""
    name = drawable(name)
    return name if len(name) <= limit else name[:limit - 1] + "…"


# --------------------------------------------------------------------------- class counts

PART_COLOURS = {"train": TRAIN, "val": VAL, "test": "#7f7f7f"}


def class_counts(counts: dict[str, list[int]], classes: list[str], path: Path, *, title: str = "") -> Path:
    """Images per class in each split as stacked horizontal bars, largest training class on top."""
    k = len(classes)
    order = sorted(range(k), key=lambda i: counts.get("train", [0] * k)[i])
    fig = _figure(7.0, 0.8 + 0.28 * k)
    with matplotlib.rc_context(_style()):
        ax = fig.add_subplot()
        left = np.zeros(k)
        for part in ("train", "val", "test"):
            vals = np.asarray([counts.get(part, [0] * k)[i] for i in order], dtype=float)
            if vals.sum() == 0:
                continue
            ax.barh(range(k), vals, left=left, color=PART_COLOURS[part], label=part, height=0.7)
            left += vals
        ax.set_yticks(range(k), [short(classes[i], 18) for i in order])
        ax.set_xlabel("images")
        ax.grid(axis="y", visible=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            ax.set_title(title, loc="left")
    return _save(fig, path)


# --------------------------------------------------------------------------- training curves

def training_curves(history: list[dict], path: Path, *, best_epoch: int | None = None,
                    chance: float | None = None, title: str = "") -> Path:
    """Loss and accuracy per epoch, training red and validation blue, the best epoch marked (Figure 6)."""
    epochs = [r["epoch"] for r in history]
    marker = "o" if len(epochs) <= 30 else None
    with matplotlib.rc_context(_style()):
        fig = _figure(10, 3.8)
        axes = fig.subplots(1, 2)
        for ax, key, label in ((axes[0], "loss", "Loss (cross-entropy)"), (axes[1], "accuracy", "Accuracy")):
            for prefix, colour, name in (("", TRAIN, "training"), ("val_", VAL, "validation")):
                pts = [(r["epoch"], r[prefix + key]) for r in history if prefix + key in r]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, color=colour, marker=marker, markersize=3.5, linewidth=1.8, label=name)
            if best_epoch is not None and best_epoch in epochs:
                ax.axvline(best_epoch, color="#444", linestyle="--", linewidth=1, alpha=0.8)
                row = history[epochs.index(best_epoch)]
                if "val_" + key in row:
                    ax.plot([best_epoch], [row["val_" + key]], marker="*", markersize=14, color=VAL,
                            markeredgecolor="black", markeredgewidth=0.6, zorder=5, linestyle="none",
                            label=f"best epoch ({best_epoch})")
            losses = [r[k] for r in history for k in ("loss", "val_loss") if k in r and r[k] > 0]
            if key == "loss" and losses and max(losses) / min(losses) > 30:  # one wild epoch flattens the rest
                ax.set_yscale("log")
                label += ", log scale"
            if key == "accuracy":
                if chance is not None:
                    ax.axhline(chance, color=CHANCE, linestyle=":", linewidth=1.3, label=f"chance ({chance:.2f})")
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(label)
            ax.set_xlabel("epoch")
            if epochs:
                ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
                ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(loc="best")
        if title:
            fig.suptitle(title, fontsize=12, fontweight="bold")
        return _save(fig, path)


def study_curves(variants: dict[str, list[list[dict]]], path: Path, *, chance: float | None = None,
                 title: str = "") -> Path:
    """Per variant: mean validation accuracy and loss per epoch over seeds, with a min–max band.

    variants: name → one history (list of epoch rows) per seed. Runs that stopped early
    are ragged: at each epoch the mean and band use the seeds that reached it.
    """
    with matplotlib.rc_context(_style()):
        fig = _figure(11, 4.2)
        axes = fig.subplots(1, 2)
        for i, (name, histories) in enumerate(variants.items()):
            colour = VARIANT_COLOURS[i % len(VARIANT_COLOURS)]
            for ax, key in ((axes[0], "val_accuracy"), (axes[1], "val_loss")):
                by_epoch: dict[int, list[float]] = {}
                for h in histories:
                    for row in h:
                        if key in row and math.isfinite(row[key]):
                            by_epoch.setdefault(int(row["epoch"]), []).append(row[key])
                if not by_epoch:
                    continue
                x = np.array(sorted(by_epoch))
                vals = [by_epoch[e] for e in x]
                mean = np.array([np.mean(v) for v in vals])
                ax.fill_between(x, [min(v) for v in vals], [max(v) for v in vals], color=colour, alpha=0.15,
                                linewidth=0)
                ax.plot(x, mean, color=colour, linewidth=2, marker="o" if len(x) <= 30 else None, markersize=3,
                        label=f"{short(name, 28)} ({len(histories)} seed{'s' if len(histories) != 1 else ''})")
        axes[0].set_title("Validation accuracy (mean, band = min–max over seeds)")
        axes[1].set_title("Validation loss (mean, band = min–max over seeds)")
        if chance is not None:
            axes[0].axhline(chance, color=CHANCE, linestyle=":", linewidth=1.3, label=f"chance ({chance:.2f})")
        axes[0].set_ylim(-0.02, 1.02)
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0].legend(loc="lower right")
        if title:
            fig.suptitle(title, fontsize=12, fontweight="bold")
        return _save(fig, path)


# --------------------------------------------------------------------------- confusion matrices

def _confusion_panel(fig: Figure, ax, cm: np.ndarray, classes: list[str], *, normalised: bool, title: str,
                     counts_in_cells: bool = False) -> None:
    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    values = norm if normalised else cm
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalised else max(1, cm.max()),
                   interpolation="nearest")
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    fs = 10 if k <= 6 else 8.5 if k <= 10 else 7 if k <= 20 else 6.5 if k <= 40 else 5.5
    names = [short(c, 16) for c in classes]
    ax.set_xticks(range(k), names, fontsize=fs, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center",
                  rotation_mode="anchor")
    ax.set_yticks(range(k), names, fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= 20:  # numbers in the cells stop being readable beyond ~20 classes
        top = values.max() if values.size else 1
        for i in range(k):
            for j in range(k):
                v = values[i, j]
                if normalised:
                    text = f"{v:.0%}" if not counts_in_cells else f"{v:.0%}\n{cm[i, j]}"
                    if rows[i, 0] == 0:
                        text = "–"
                else:
                    text = str(int(v))
                ax.text(j, i, text, ha="center", va="center", fontsize=fs - (1 if counts_in_cells else 0),
                        color="white" if v > 0.55 * top else "#1d2330")
    cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
    cb.ax.tick_params(labelsize=8)
    if normalised:
        cb.set_label("fraction of the true class", fontsize=8)
    else:
        cb.set_label("images", fontsize=8)
        cb.ax.yaxis.get_major_locator().set_params(integer=True)


def _panel_size(k: int) -> float:
    """Inches per confusion panel: ~0.55 in per cell up to 10 classes, ~0.24 in beyond, ~0.2 past 20."""
    if k > 20:
        return 0.2 * k + 2.5
    return max(3.4, min(0.55 * k + 2.0, 0.24 * k + 4.0))


def confusion(cm, classes: list[str], path: Path, *, title: str = "") -> Path:
    """Counts and row-normalised confusion matrices side by side, labelled with class names (Figure 7)."""
    cm = np.asarray(cm, dtype=int)
    side = _panel_size(len(classes))
    stacked = len(classes) > 20  # side by side, past ~20 classes, would shrink each panel below legibility
    with matplotlib.rc_context(_style()):
        fig = _figure(side + 1.2, 2 * side + 0.4) if stacked else _figure(2 * side + 1.2, side)
        a, b = fig.subplots(2, 1) if stacked else fig.subplots(1, 2)
        _confusion_panel(fig, a, cm, classes, normalised=False, title="Counts")
        _confusion_panel(fig, b, cm, classes, normalised=True, title="Row-normalised (recall per class)")
        if title:
            fig.suptitle(title, fontsize=12, fontweight="bold")
        return _save(fig, path)


def confusion_pair(panels: list[tuple[str, np.ndarray]], classes: list[str], path: Path, *,
                   title: str = "") -> Path:
    """Row-normalised confusion matrices of several runs side by side (cells: % and count)."""
    side = _panel_size(len(classes))
    with matplotlib.rc_context(_style()):
        fig = _figure(len(panels) * (side + 0.6) + 0.4, side + 0.3)
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, (label, cm) in zip(axes, panels):
            _confusion_panel(fig, ax, np.asarray(cm, dtype=int), classes, normalised=True, title=label,
                             counts_in_cells=True)
        if title:
            fig.suptitle(title, fontsize=12, fontweight="bold")
        return _save(fig, path)


# --------------------------------------------------------------------------- image grids

def _to_display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C, H, W) uint8 → something imshow draws as the network saw it (before normalisation)."""
    if img.shape[0] == 1:
        return img[0], "gray"
    return np.transpose(img[:3], (1, 2, 0)), None


def image_grid(images: list[np.ndarray], titles: list[str], correct: list[bool], path: Path, *,
               columns: int = 8, title: str = "", overlays: list[np.ndarray] | None = None) -> Path:
    """Images with "true / predicted (confidence)" titles, green frame and title when right, red when wrong.
    overlays: (H, W, 3) uint8 pictures drawn instead (each image under its Grad-CAM heatmap).

    Laid out by hand in one axes whose units are inches, each image an extent in it, its frame a rectangle and its
    title a text: forty small axes, one per image, were slow to create and draw.
    """
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    cell_w, cell_h, img_in, head = 1.55, 1.78, 1.30, (0.45 if title else 0.1)  # inches
    width, height = cell_w * columns + 0.2, cell_h * rows + head
    with matplotlib.rc_context(_style()):
        fig = Figure(figsize=(width, height), dpi=DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(0, height)
        pad = 3 / 72  # 3 points above the image's edge, as each axes' set_title(pad=3) had
        for k, (img, text, ok) in enumerate(zip(images, titles, correct)):
            r, c = divmod(k, columns)
            left = 0.1 + c * cell_w + (cell_w - img_in) / 2
            bottom = height - head - (r + 1) * cell_h + 0.06
            data, cmap = (overlays[k], None) if overlays is not None else _to_display(img)
            ax.imshow(data, cmap=cmap, vmin=0, vmax=255, interpolation="nearest", aspect="auto",
                      extent=(left, left + img_in, bottom, bottom + img_in))
            colour = RIGHT if ok else WRONG
            ax.add_patch(Rectangle((left, bottom), img_in, img_in, fill=False, edgecolor=colour, linewidth=3))
            ax.text(left + img_in / 2, bottom + img_in + pad, text, ha="center", va="baseline", fontsize=8.5,
                    color=colour, fontweight="bold")
        if title:
            fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=11, fontweight="bold")
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, ".png") as tmp:
            fig.savefig(tmp, dpi=DPI)
        return path


def explanation_figure(image: np.ndarray, overlaid: np.ndarray, left: str, right: str, path: Path) -> Path:
    """One image as the network saw it, beside it under its Grad-CAM heatmap (`cnnlab explain`)."""
    with matplotlib.rc_context(_style()):
        fig = _figure(6.4, 3.5)
        a, b = fig.subplots(1, 2)
        data, cmap = _to_display(image)
        a.imshow(data, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        b.imshow(overlaid, interpolation="nearest")
        for ax, text in ((a, short(left, 40)), (b, "Grad-CAM: " + short(right, 40))):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.set_title(text, fontsize=9)
        return _save(fig, path)


def grid_title(true: str, predicted: str, confidence: float) -> str:
    t, p = short(true, 11), short(predicted, 11)
    line = f"{t} / {p}"
    return f"{line}\n({confidence:.2f})" if len(line) > 13 else f"{line} ({confidence:.2f})"


# --------------------------------------------------------------------------- study comparison

def comparison_bars(rows: list[dict], path: Path, *, chance: float | None = None,
                    metric_label: str = "test accuracy",
                    title: str = "") -> Path:
    """Mean accuracy per variant with 95 % interval error bars and each seed as a dot, best on top (Figure 9).

    rows: [{"name", "mean", "ci95": [lo, hi] | None, "values": [...]}].
    """
    rows = sorted(rows, key=lambda r: r["mean"])  # barh draws bottom-up: the best ends on top
    n = len(rows)
    with matplotlib.rc_context(_style()):
        fig = _figure(9, 1.0 + 0.55 * n + (0.4 if title else 0))
        ax = fig.subplots()
        ax.grid(axis="y", visible=False)
        y = np.arange(n)
        # opaque tints (75 % colour on white), so the mean's label box matches its bar
        colours = [tuple(0.75 * np.array(to_rgba(VARIANT_COLOURS[i % len(VARIANT_COLOURS)])[:3]) + 0.25)
                   for i in range(n)][::-1]
        means = np.array([r["mean"] for r in rows])
        ax.barh(y, means, color=colours, height=0.62, edgecolor="none")
        for i, r in enumerate(rows):
            if r.get("ci95"):  # a t-interval over few seeds can pass 0 or 1: drawn clipped to [0, 1]
                lo, hi = max(0.0, r["ci95"][0]), min(1.0, r["ci95"][1])
                ax.errorbar(r["mean"], i, xerr=[[max(0.0, r["mean"] - lo)], [max(0.0, hi - r["mean"])]],
                            color="#1d2330", capsize=5, linewidth=1.4, capthick=1.4, zorder=3)
            vals = r.get("values") or []
            if len(vals) > 1:
                jitter = np.linspace(-0.16, 0.16, len(vals))
                ax.scatter(vals, i + jitter, s=16, color="white", edgecolor="#1d2330", linewidth=0.9, zorder=4)
            inside = r["mean"] > 0.1  # the mean, written at the bar's root, away from the dots and whiskers
            ax.text(0.012 if inside else r["mean"] + 0.01, i, f"{r['mean']:.3f}", va="center", ha="left",
                    fontsize=9.5, fontweight="bold", color="white" if inside else "#1d2330", zorder=5,
                    bbox=dict(facecolor=colours[i] if inside else "white", edgecolor="none", pad=1.5))
        if chance is not None:
            ax.axvline(chance, color=CHANCE, linestyle="--", linewidth=1.4)
            ax.text(chance, n - 0.45, f" chance {chance:.2f}", color=CHANCE, fontsize=8.5, va="bottom")
        ax.set_yticks(y, [short(r["name"], 30) for r in rows])
        ax.set_xlim(0, 1.0)
        ax.set_ylim(-0.6, n - 0.2)
        ax.set_xlabel(f"{metric_label}: mean over seeds (bar), 95 % interval (error bar), each seed (dot)")
        if title:
            ax.set_title(title, loc="left")
        return _save(fig, path)
