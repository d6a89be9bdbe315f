"""A tune's figures (search history, parameter importance, each parameter's effect, learning curves of the
trials) and its report.html, from summary.json only (plus the re-validation study's own page)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

from ..fileio import atomic_write_text
from ..report import plots as P
from ..report.html import card, esc, figure, page, table
from ..runs import read_json

STATE_STYLE = {"complete": ("o", "#1f77b4"), "pruned": ("x", "#ff7f0e"), "fail": ("X", "#d62728")}


def _label(spec: dict) -> str:
    return spec["objective"].replace("_", " ")


def history_plot(summary: dict, path: Path) -> Path:
    """Each trial's objective (complete: dot; pruned: cross at the value it reached) and the best so far."""
    spec = summary["spec"]
    maximize = spec["direction"] == "maximize"
    rows = [r for r in summary["trials"] if r["state"] in STATE_STYLE]
    with matplotlib.rc_context(P._style()):
        fig = P._figure(8, 3.6)
        ax = fig.subplots()
        for state, (marker, colour) in STATE_STYLE.items():
            pts = [(r["number"], r["value"] if r["value"] is not None else _last(r)) for r in rows
                   if r["state"] == state]
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=colour, s=28, label=state, zorder=3)
        best, xs, ys = None, [], []
        for r in sorted(rows, key=lambda r: r["number"]):
            if r["state"] == "complete" and r["value"] is not None:
                best = r["value"] if best is None else (max if maximize else min)(best, r["value"])
            if best is not None:
                xs.append(r["number"])
                ys.append(best)
        if xs:
            ax.step(xs, ys, where="post", color="#2ca02c", linewidth=1.8, label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(_label(spec))
        ax.legend(loc="lower right" if maximize else "upper right", fontsize=8.5)
        ax.set_title("Search history", loc="left")
        return P._save(fig, path)


def _last(r: dict):
    inter = r.get("intermediate") or {}
    return inter[max(inter, key=int)] if inter else None


def importance_plot(importance: dict[str, float], path: Path) -> Path:
    items = sorted(importance.items(), key=lambda kv: kv[1])
    with matplotlib.rc_context(P._style()):
        fig = P._figure(7, 0.9 + 0.45 * len(items))
        ax = fig.subplots()
        ax.barh(range(len(items)), [v for _, v in items], color="#1f77b4", height=0.6)
        ax.set_yticks(range(len(items)), [P.drawable(k) for k, _ in items])
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=9)
        ax.set_xlim(0, max(1e-9, max(v for _, v in items)) * 1.18)
        ax.set_xlabel("importance (fANOVA, share of the objective's variance; sums to 1)")
        ax.set_title("Parameter importance", loc="left")
        return P._save(fig, path)


def slice_plot(summary: dict, path: Path) -> Path | None:
    """Objective against each parameter's value (one panel each), colour = trial number."""
    spec = summary["spec"]
    rows = [r for r in summary["trials"] if r["state"] == "complete" and r["value"] is not None]
    params = [p for p in spec["space"] if any(p["key"] in r["params"] for r in rows)]
    if not rows or not params:
        return None
    cols = min(3, len(params))
    n_rows = math.ceil(len(params) / cols)
    with matplotlib.rc_context(P._style()):
        fig = P._figure(3.4 * cols, 2.9 * n_rows)
        axes = np.atleast_1d(fig.subplots(n_rows, cols)).ravel()
        last = max(r["number"] for r in rows) or 1
        for ax, p in zip(axes, params):
            pts = [(r["params"][p["key"]], r["value"], r["number"]) for r in rows if p["key"] in r["params"]]
            if p["kind"] == "categorical":
                cats = [str(c) for c in p["choices"]]
                x = [cats.index(str(v)) + np.random.default_rng(n).uniform(-0.12, 0.12) for v, _, n in pts]
                ax.set_xticks(range(len(cats)), [P.short(c, 10) for c in cats])
            else:
                x = [v for v, _, _ in pts]
                if p["log"]:
                    ax.set_xscale("log")
            sc = ax.scatter(x, [v for _, v, _ in pts], c=[n for _, _, n in pts], cmap="viridis", vmin=0, vmax=last,
                            s=24, edgecolor="white", linewidth=0.4)
            ax.set_title(P.drawable(p["key"]), fontsize=10, loc="left")
        for ax in axes[len(params):]:
            ax.set_visible(False)
        axes[0].set_ylabel(_label(spec))
        fig.colorbar(sc, ax=list(axes[:len(params)]), label="trial", shrink=0.8)
        return P._save(fig, path)


def curves_plot(summary: dict, path: Path) -> Path | None:
    """What the pruner saw: each trial's best-so-far objective per epoch (pruned ones in orange)."""
    rows = [r for r in summary["trials"] if r.get("intermediate") and r["state"] in STATE_STYLE]
    if not rows:
        return None
    with matplotlib.rc_context(P._style()):
        fig = P._figure(8, 3.4)
        ax = fig.subplots()
        for r in rows:
            steps = sorted(r["intermediate"], key=int)
            colour = STATE_STYLE[r["state"]][1]
            ax.plot([int(s) for s in steps], [r["intermediate"][s] for s in steps], color=colour,
                    alpha=0.75 if r["state"] != "complete" else 0.45, linewidth=1.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"best {_label(summary['spec'])} so far")
        ax.set_title("Trials as the pruner saw them (blue: complete, orange: pruned)", loc="left")
        return P._save(fig, path)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_tune_report(tune_dir: str | Path) -> Path:
    """TUNE_DIR/plots/*.png and TUNE_DIR/report.html from summary.json."""
    tune_dir = Path(tune_dir)
    summary = read_json(tune_dir / "summary.json")
    spec, plots = summary["spec"], tune_dir / "plots"
    figs = [(history_plot(summary, plots / "tune_history.png"), "search history",
             "Each trial's validation objective (crosses: pruned trials at the value they reached; X: failed) and "
             "the best so far. Failed trials have no score.")]
    if summary.get("importance"):
        figs.append((importance_plot(summary["importance"], plots / "tune_importance.png"), "importance",
                     "How much of the objective's variation each parameter explains (Optuna's fANOVA over the "
                     "completed trials; with few trials, a rough guide)."))
    for fn, name, caption in ((slice_plot, "tune_slices.png", "The objective against each parameter's value "
                               "(colour: trial number — late trials cluster where the sampler found good values)."),
                              (curves_plot, "tune_curves.png", "Each trial's best validation objective so far per "
                               "epoch, as reported to the pruner; a trial stopped by early stopping counts at its "
                               "kept value for the epochs it did not run.")):
        png = fn(summary, plots / name)
        if png:
            figs.append((png, name, caption))
    c, best = summary["counts"], summary.get("best_trial")
    out = ['<header class="top"><div class="kind">cnnlab tune</div>', f"<h1>{esc(summary['name'])}</h1>",
           f'<p class="sub">{esc(spec["sampler"]["name"])} sampler (seed {esc(spec["sampler"]["seed"])}) · '
           f'{esc(spec["pruner"]["name"])} pruner · objective {esc(spec["objective"])} on the validation split '
           f"(trials never see the test split) · storage <code>{esc(summary['storage'])}</code></p></header>"]
    out.append('<div class="cards">' + card("trials", f"{sum(c.values()) - c.get('running', 0) - c.get('waiting', 0)}"
                                                     f" / {summary['trials_asked']}")
               + card("complete", str(c["complete"])) + card("pruned", str(c["pruned"]))
               + card("failed", str(c["fail"]))
               + (card(f"best {spec['objective']}", f"{best['value']:.4f}", f"trial {best['number']}") if best else "")
               + "</div>")
    reval = summary.get("revalidation")
    if reval and reval.get("sentence"):
        cls = "good" if reval.get("better") else "info"
        out.append(f'<div class="callout {cls}"><p class="big">{esc(reval["sentence"])}</p>'
                   + (f"<p>Ready to train: <code>{esc(reval['best_yaml'])}</code></p>" if reval.get("best_yaml") else "")
                   + "</div>")
        out.append("<h2>Re-validation on fresh seeds</h2>")
        rv = tune_dir / "revalidate"
        val = reval.get("validation") or {}
        rsum = read_json(rv / "summary.json") if (rv / "summary.json").is_file() else None
        if rsum:
            comps = {x["variant"]: x for x in rsum["comparisons"]}
            rows = []
            for v in rsum["variants"]:
                a = v["metrics"]["accuracy"]
                cmp_ = comps.get(v["name"], {})
                rows.append([v["name"] + (" (winner)" if v["name"] == reval.get("winner") else ""),
                             f"{val[v['name']]:.4f}" if val.get(v["name"]) is not None else "–",
                             (f"{100 * a['mean']:.2f}" if a["mean"] is not None else "–",
                              f"[{100 * a['ci95'][0]:.2f}, {100 * a['ci95'][1]:.2f}]" if a.get("ci95") else ""),
                             f"{cmp_['difference_points']:+.2f}" if cmp_ else "reference",
                             _p(cmp_.get("mcnemar_p")), _p(cmp_.get("mcnemar_p_holm")), _p(cmp_.get("ttest_p"))])
            out.append(table(["Configuration", f"Validation {spec['objective']} (mean)", "Test accuracy % [95 % CI]",
                              "vs base (points)", "McNemar p", "Holm p", "paired t p"], rows))
            out.append('<p>The full comparison: <a href="revalidate/report.html">revalidate/report.html</a>. '
                       "The winner is chosen on validation; the test split decides only the verdict.</p>")
    out.append("<h2>Search</h2>")
    out += [figure(png, alt, cap) for png, alt, cap in figs]
    out.append("<h2>Trials</h2>")
    keys = [p["key"] for p in spec["space"]]
    rows = []
    for r in summary["trials"]:
        rows.append([str(r["number"]), r["state"] + (f" (retry of {r['retry_of']})" if r.get("retry_of") is not None else "")]
                    + [_fmt(r["params"].get(k, "–")) for k in keys]
                    + [f"{r['value']:.4f}" if r["value"] is not None else "–", str(r.get("epochs") or "–"),
                       (r.get("reason") or "")[:160]])
    out.append('<div class="wide">' + table(["#", "state"] + keys + [spec["objective"], "epochs", "note"], rows,
                                            text_cols=2) + "</div>")
    html_path = tune_dir / "report.html"
    atomic_write_text(html_path, page(f"tune {summary['name']}", "".join(out)))
    return html_path


def _p(p) -> str:
    from ..stats import format_p

    return "–" if p is None else format_p(p).replace("p = ", "").replace("p ", "")
