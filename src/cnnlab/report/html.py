"""report.html: one self-contained page (PNG as base64 data: URIs, CSS inline, no script, no URL)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path

from . import tables as T
from .plots import GRID_COLUMNS, GRID_ROWS
from ..stats import format_p
from .folders import RunFolder

CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#e3e6ec; --soft:#f5f7fa; --accent:#1f77b4;
        --good:#1a7f37; --good-bg:#e9f7ee; --warn:#9a6700; --warn-bg:#fff6dc; --bad:#c0262d; }
* { box-sizing: border-box; }
html { font-size: 16px; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.5;
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 64px; }
header.top { border-bottom: 3px solid var(--accent); padding-bottom: 14px; margin-bottom: 22px; }
h1 { font-size: 1.9rem; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 1.3rem; margin: 38px 0 12px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 22px 0 8px; }
.sub { color: var(--muted); margin: 0; }
.kind { text-transform: uppercase; letter-spacing: .08em; font-size: .75rem; color: var(--accent); font-weight: 700; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; margin: 18px 0; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .label { font-size: .78rem; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
.card .value { font-size: 1.55rem; font-weight: 700; font-variant-numeric: tabular-nums; line-height: 1.25; }
.card .note { font-size: .8rem; color: var(--muted); }
.callout { border-left: 5px solid var(--warn); background: var(--warn-bg); padding: 12px 16px; border-radius: 6px;
           margin: 14px 0; }
.callout.good { border-color: var(--good); background: var(--good-bg); }
.callout.info { border-color: var(--accent); background: #eaf3fb; }
.callout p { margin: 4px 0; }
.callout .big { font-size: 1.12rem; font-weight: 600; }
.callout .small { font-size: .88rem; color: var(--muted); }
ul.sentences { margin: 6px 0; padding-left: 20px; }
ul.sentences li { margin: 4px 0; }
ul.sentences.small { font-size: .84rem; color: var(--muted); margin-top: 10px; }
figure { margin: 18px 0 26px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 8px; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: 6px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: .92rem; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
tr.best td { background: #eaf3fb; font-weight: 600; }
td .ci { display: block; font-size: .76rem; color: var(--muted); font-weight: 400; }
.scroll { max-height: 420px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; display: inline-block;
          max-width: 100%; }
.scroll table { margin: 0; }
.wide { overflow-x: auto; }
table.study { font-size: .82rem; }
table.study td { white-space: nowrap; padding: 5px 7px; }
table.study th { padding: 5px 7px; vertical-align: bottom; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; overflow: auto;
      font-size: .84rem; line-height: 1.45; max-height: 520px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 24px; align-items: start; }
.ok { color: var(--good); font-weight: 600; } .wrong { color: var(--bad); font-weight: 600; }
a { color: var(--accent); }
footer { margin-top: 48px; color: var(--muted); font-size: .82rem; border-top: 1px solid var(--line);
         padding-top: 10px; }
"""


def esc(v) -> str:
    return html.escape(str(v), quote=True)


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def figure(png: Path, alt: str, caption: str) -> str:
    return (f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def table(header: list[str], rows: list[list], *, text_cols: int = 1, row_classes: list[str] | None = None,
          css_class: str = "") -> str:
    """rows: cells as str (escaped here) or (main, sub) pairs (sub shown small below, e.g. an interval)."""
    def cell(c, j, tag):
        cls = ' class="text"' if j < text_cols else ""
        if isinstance(c, tuple):
            main, sub = c
            inner = esc(main) + (f'<span class="ci">{esc(sub)}</span>' if sub else "")
        else:
            inner = esc(c)
        return f"<{tag}{cls}>{inner}</{tag}>"

    head = "".join(cell(h, j, "th") for j, h in enumerate(header))
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(cell(c, j, "td") for j, c in enumerate(r)) + "</tr>")
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def card(label: str, value: str, note: str = "") -> str:
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
            + (f'<div class="note">{esc(note)}</div>' if note else "") + "</div>")


def page(title: str, body: str) -> str:
    from .._version import __version__

    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>{body}"
            f"<footer>Written by cnnlab {esc(__version__)} on {esc(stamp)} from the files in this folder; "
            "self-contained (no network, no script).</footer></main></body></html>\n")


# --------------------------------------------------------------------------- a run

def run_page(run: RunFolder, plots: dict[str, Path], notes: list[str], mistakes: list[dict]) -> str:
    m, cfg, env = run.metrics, run.config, run.env
    part = T.part_name(m.get("evaluated_on"))
    d = cfg.get("data") or {}
    model = (cfg.get("model") or {}).get("name", "?")
    optim = cfg.get("optim") or {}
    classes = run.classes
    out = ['<header class="top"><div class="kind">cnnlab run</div>',
           f"<h1>{esc(run.name)}</h1>",
           f'<p class="sub">{esc(model)} · {esc(optim.get("name", "?"))} lr {esc(optim.get("lr", "?"))} · '
           f'data {esc(d.get("source", "?"))} · {len(classes)} classes · evaluated on the {esc(part)} split '
           f'({m.get("n", "?")} images) · folder <code>{esc(run.path.name)}</code></p></header>']

    lo, hi = m.get("accuracy_ci95") or (None, None)
    best, epochs = m.get("best_epoch"), m.get("epochs_run", len(run.history))
    cards = [card(f"{part} accuracy", f"{m['accuracy']:.3f}",
                  f"95 % CI {lo:.3f}–{hi:.3f}, n = {m['n']}" if lo is not None else f"n = {m['n']}")]
    level = T.chance_of(m)
    if level is not None:
        cards.append(card("chance level", f"{level:.3f}", "accuracy vs chance: "
                          + format_p((m.get("chance") or {}).get("p_value_above_chance"))))
    if "f1_macro" in m:
        cards.append(card("F1 (macro)", f"{m['f1_macro']:.3f}", f"weighted {m.get('f1_weighted', float('nan')):.3f}"))
    if m.get("loss") is not None:
        cards.append(card(f"{part} loss", f"{m['loss']:.4f}", "cross-entropy"))
    cards.append(card("best epoch", f"{best}",
                      f"of {epochs} run" + (", stopped early" if m.get("stopped_early") else "")))
    if m.get("parameters") is not None:
        cards.append(card("parameters", f"{m['parameters']:,}",
                          f"{m.get('training_seconds', 0):.1f} s training" if m.get("training_seconds") else ""))
    out.append('<div class="cards">' + "".join(cards) + "</div>")

    sentence = T.chance_sentence(m)
    if sentence:
        p = (m.get("chance") or {}).get("p_value_above_chance", 1.0)
        out.append(f'<div class="callout {"good" if p < T.ALPHA else ""}"><p class="big">'
                   f"{esc(sentence[0].upper() + sentence[1:])}.</p>"
                   f'<p class="small">{esc(T.chance_explanation(m))} The 95 % interval of the accuracy is the '
                   f"{esc(m.get('accuracy_ci_method', 'Wilson score interval'))}.</p></div>")
    if m.get("caution"):
        out.append(f'<div class="callout"><p><strong>Caution:</strong> {esc(m["caution"])}</p></div>')
    for n in notes:
        out.append(f'<div class="callout info"><p>{esc(n)}</p></div>')
    from ..export import export_summary  # RUN/export.json (`cnnlab export`): one line, when the model was exported
    for ok, text in filter(None, [export_summary(run.path)]):
        out.append(f'<div class="callout {"good" if ok else ""}"><p>{esc(text)}</p></div>')

    out.append("<h2>Figures</h2>")
    caps = {
        "curves": ("Training curves", "Loss and accuracy per epoch: training (red, on augmented batches in "
                   "training mode) and validation (blue); the star and dashed line mark the best epoch "
                   f"({best}), whose weights were kept and evaluated."),
        "confusion": ("Confusion matrices", f"The {part} split's {m['n']} images: counts (left) and each row "
                      "divided by its true-class total (right, i.e. recall per class). Rows: true class; "
                      "columns: predicted class."),
        "predictions": ("Predicted images", f"{part.capitalize()} images with “true / predicted (confidence)”: "
                        "green when right, red when wrong; "
                        + (f"all {len(run.predictions)} evaluated images, in a seeded random order."
                           if len(run.predictions) <= GRID_ROWS * GRID_COLUMNS else
                           f"a seeded random sample of the {len(run.predictions)} evaluated images.")),
        "confused": ("Most confidently wrong", "The wrong predictions the model was surest of "
                     "(all of them are listed in misclassified.csv)."),
        "counts": ("Images per class", "Training (red, with any offline augmented copies), validation (blue) and "
                   "test (grey) images of each class. " + T.balance_sentence(m, classes)),
    }
    for key, (alt, cap) in caps.items():
        if key in plots:
            out.append(figure(plots[key], alt, esc(cap)))

    out.append("<h2>Metrics</h2>")
    out.append(f"<p>Computed on the <strong>{esc(part)}</strong> split: {m['n']} images, {len(classes)} classes. "
               "Precision, recall and F1 are given per class and as two named averages.</p>")
    avg = [[label, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}"] for label, p, r, f in T.average_rows(m)]
    acc = [["accuracy", f"{m['accuracy']:.3f}", f"{lo:.3f}–{hi:.3f}" if lo is not None else "–", str(m["n"])]]
    if m.get("loss") is not None:
        acc.append(["loss (cross-entropy)", f"{m['loss']:.4f}", "", str(m["n"])])
    counts = m.get("class_counts") or {}
    per = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"])]
           + [str(counts[p][i]) for p in ("train", "val", "test") if p in counts]
           for i, (c, v) in enumerate((m.get("per_class") or {}).items())]
    per_head = ["Class", "Precision", "Recall", "F1", "Support"] + [f"{p} images" for p in ("train", "val", "test")
                                                                     if p in counts]
    left = [table(["Metric", "Value", "95 % interval", "n"], acc), table(["Average", "Precision", "Recall", "F1"], avg)]
    if run.predictions:
        n_wrong = len(mistakes)
        left.append(f"<h3>Misclassified: {n_wrong} of {len(run.predictions)}</h3>")
        if mistakes:
            top = [[r.get("file") or r["index"], r["true"], r["predicted"], f"{float(r['confidence']):.3f}"]
                   for r in mistakes[:15]]
            left.append(table(["File (or index)", "True", "Predicted", "Confidence"], top, text_cols=3))
            more = f" (with the {n_wrong - 15} not shown here)" if n_wrong > 15 else ""
            left.append(f'<p>All of them, most confident first: <a href="misclassified.csv">misclassified.csv</a>'
                        f"{more}.</p>")
    out.append('<div class="cols"><div><h3>Overall</h3>' + "".join(left)
               + '</div><div><h3>Per class</h3><div class="scroll">'
               + table(per_head, per) + "</div></div></div>")

    out.append("<h2>History</h2>")
    cols = T.history_columns(run.history)
    rows = [[T.history_cell(c, r.get(c)) for c in cols] for r in run.history]
    classes_ = ["best" if r.get("epoch") == best else "" for r in run.history]
    out.append(f"<p>One row per epoch; the best epoch ({esc(best)}, monitored: "
               f"{esc(m.get('monitor', '?'))}) is highlighted.</p>")
    out.append('<div class="scroll">' + table(cols, rows, row_classes=classes_) + "</div>")
    from ..runs import keras_log

    planned = (run.config.get("train") or {}).get("epochs")
    out.append("<h3>Training log</h3><p>As <code>cnnlab train</code> printed it (Keras-style).</p>"
               f"<pre>{esc(keras_log(run.history, planned))}</pre>")

    if run.bad_files:
        out.append(f"<h2>Bad files ({len(run.bad_files)})</h2><p>Unreadable images skipped while loading the data "
                   "(listed in bad_files.csv).</p>")
        out.append('<div class="scroll">' + table(["Path", "Reason"], [[r.get("path", ""), r.get("reason", "")]
                                                                      for r in run.bad_files], text_cols=2) + "</div>")

    out.append('<h2>Configuration and environment</h2><div class="cols"><div><h3>config.yaml</h3>'
               f"<pre>{esc(run.config_text)}</pre></div><div><h3>env.json</h3>")
    if env:
        out.append(table(["Key", "Value"], [[k, v if not isinstance(v, (dict, list)) else json.dumps(v)]
                                            for k, v in env.items()], text_cols=2))
    else:
        out.append("<p>No env.json in this folder.</p>")
    out.append("</div></div>")
    return page(f"{run.name} · cnnlab report", "".join(out))


# --------------------------------------------------------------------------- a study

def study_page(summary: dict, study_dir: Path, plots: dict[str, Path], run_links: dict[str, list[tuple[str, str]]],
               notes: list[str]) -> str:
    variants = summary.get("variants", [])
    seeds = summary.get("seeds", [])
    part = T.part_name(T.eval_part(summary))
    n_eval = sorted({v.get("n_eval") for v in variants if v.get("n_eval")})
    avg = summary.get("averaging", "macro")
    out = ['<header class="top"><div class="kind">cnnlab study</div>',
           f"<h1>{esc(summary.get('name', study_dir.name))}</h1>",
           f'<p class="sub">{len(variants)} variants × {len(seeds)} seed{"s" if len(seeds) != 1 else ""} '
           f"({esc(', '.join(map(str, seeds)))}) · evaluated on the {esc(part)} split of "
           f"{esc(' / '.join(map(str, n_eval)) or '?')} images · precision, recall and F1 {esc(avg)}-averaged"
           + (f" · study file <code>{esc(summary['study_file'])}</code>" if summary.get("study_file") else "")
           + "</p>" + (f'<p class="sub">{esc(summary["description"])}</p>' if summary.get("description") else "")
           + "</header>"]

    best = summary.get("best")
    comps = [c.get("sentence") for c in summary.get("comparisons", []) if c.get("sentence")]
    chance = [c.get("sentence") for c in summary.get("chance", []) if c.get("sentence")]
    all_above = all((c.get("p_value") if c.get("p_value") is not None else 1.0) < T.ALPHA
                    for c in summary.get("chance", []))
    box = [f'<p class="big">Best (highest mean {esc(part)} accuracy): {esc(best)}</p>'] if best else []
    ref = summary.get("reference")
    if ref and ref != best and comps:
        box.append(f"<p>Compared against <strong>{esc(ref)}</strong>, the reference named in advance.</p>")
    if comps:
        box.append('<ul class="sentences">' + "".join(f"<li>{esc(s)}</li>" for s in comps) + "</ul>")
    if summary.get("selection_note"):
        box.append(f'<p class="small"><strong>Chosen after the fact.</strong> {esc(summary["selection_note"])}.</p>')
    methods = summary.get("methods")
    if isinstance(methods, dict) and methods:
        box.append('<ul class="sentences small">' + "".join(f"<li><strong>{esc(k)}</strong>: {esc(v)}</li>"
                                                            for k, v in methods.items()) + "</ul>")
    else:
        box.append('<p class="small">Differences: paired tests on the same evaluated images (McNemar, exact) and '
                   f"across seeds (paired t-test); means are over {len(seeds)} seed(s), intervals are 95 % "
                   "confidence intervals of the mean.</p>")
    out.append('<div class="callout info">' + "".join(box) + "</div>")
    if chance:
        out.append(f'<div class="callout {"good" if all_above else ""}"><p><strong>Against chance</strong></p>'
                   '<ul class="sentences">'
                   + "".join(f"<li>{esc(s)}</li>" for s in chance) + "</ul></div>")
    for n in notes:
        out.append(f'<div class="callout info"><p>{esc(n)}</p></div>')

    out.append("<h2>Comparison</h2>")
    out.append(f"<p>Mean ± sd over seeds, with the 95 % interval below each mean; the best variant is highlighted. "
               f"Precision, recall and F1 are <strong>{esc(avg)}</strong> averages over classes.</p>")
    rows = T.study_rows(summary)
    out.append('<div class="wide">' + table(T.study_header(summary), [[r["name"]] + r["cells"] for r in rows],
                                            text_cols=3, row_classes=["best" if r["best"] else "" for r in rows],
                                            css_class="study")
               + "</div>")
    files = [f for f in ("table.md", "table.csv", "table.tex") if (study_dir / f).is_file()]
    if files:
        out.append("<p>The same table as " + ", ".join(f'<a href="{f}">{f}</a>' for f in files) + ".</p>")

    out.append("<h2>Figures</h2>")
    caps = {
        "comparison": ("Variant comparison", f"Mean {part} accuracy per variant over seeds (bars), its 95 % "
                       "interval (error bars) and each seed (dots); dashed: chance."),
        "curves": ("Validation curves", "Mean validation accuracy and loss per epoch over seeds; the band spans "
                   "the lowest and highest seed. Runs that stopped early count only up to their last epoch."),
        "confusion": ("Best and worst variant", "Row-normalised confusion matrices (cells: share of the true class "
                      "and count) of the seed-0 runs of the best and the worst variant."),
    }
    for key, (alt, cap) in caps.items():
        if key in plots:
            out.append(figure(plots[key], alt, esc(cap)))

    out.append("<h2>Variants and runs</h2>")
    vrows = []
    for v in variants:
        links = run_links.get(v["name"], [])
        link_html = " · ".join(f'<a href="{esc(href)}">{esc(label)}</a>' for label, href in links) or "–"
        failed = "".join(f'<br><span class="wrong">failed: {esc(_failure_text(f))}</span>'
                         for f in v.get("failed") or [])
        vrows.append(f'<tr><td class="text">{esc(v["name"])}</td><td class="text"><code>'
                     f'{esc(T.settings_text(v.get("settings")))}</code></td><td class="text">{link_html}{failed}'
                     "</td></tr>")
    for p in summary.get("pretrain") or []:
        links = run_links.get("pretrain/" + p["name"], [])
        link_html = " · ".join(f'<a href="{esc(href)}">{esc(label)}</a>' for label, href in links) or "–"
        acc = f" (accuracy {p['accuracy']:.3f})" if isinstance(p.get("accuracy"), (int, float)) else ""
        failed = f'<br><span class="wrong">failed: {esc(_failure_text(p["failed"]))}</span>' if p.get("failed") else ""
        vrows.append(f'<tr><td class="text">pretrain: {esc(p["name"])}</td><td class="text"><code>'
                     f'{esc(T.settings_text(p.get("settings")))}</code></td><td class="text">{link_html}{acc}'
                     f"{failed}</td></tr>")
    out.append('<div class="wide"><table><thead><tr><th class="text">Variant</th><th class="text">Settings</th>'
               '<th class="text">Run reports (accuracy)</th></tr></thead><tbody>' + "".join(vrows)
               + "</tbody></table></div>")
    return page(f"{summary.get('name', study_dir.name)} · cnnlab study", "".join(out))


def _failure_text(f) -> str:
    """A failed run as summary.json records it: a path, or {"run": path, "error": text}."""
    if isinstance(f, dict):
        return ": ".join(str(x) for x in (f.get("run"), f.get("error")) if x) or json.dumps(f)
    return str(f)
