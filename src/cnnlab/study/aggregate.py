"""A study's results: read plan.json and the run folders only → summary.json and table.md / .csv / .tex.

Statistics (see cnnlab.stats): per metric, mean ± sample sd with a 95 % t-interval over the seeds
(none for a single seed). Each variant is compared with the reference — a variant named in advance in plan.json
("reference", e.g. a tune's base config), else the best (highest mean accuracy, picked after the fact, which
the summary says) — on the seeds both completed: the exact McNemar test on the per-image correctness of the same test
images, POOLED over those seeds (b and c summed; more power than one seed, but the pairs of
different seeds share images, so treat it as a test over images × seeds), and the paired t-test
of the per-seed accuracies (seed-to-seed variation; needs ≥ 2 seeds). The difference is the mean
accuracy difference over the same shared seeds, in points. The chance check uses each run's
metrics.json: accuracy against max(majority-class rate, 1/classes), exact one-sided binomial
test; a variant reports its largest (least significant) p over its seeds. Several comparisons at once are
Holm-corrected (each test type on its own); the verdict in each sentence follows the corrected p.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import stats
from ..fileio import atomic_write_text
from ..report.tables import write_tables
from ..runs import is_finished, read_csv, read_json

METRICS = ["accuracy", "loss", "best_epoch", "precision_macro", "recall_macro", "f1_macro", "training_seconds"]
# the possible range of each, to which a t-interval over few seeds is clipped
METRIC_BOUNDS = {"accuracy": (0.0, 1.0), "precision_macro": (0.0, 1.0), "recall_macro": (0.0, 1.0),
                 "f1_macro": (0.0, 1.0), "loss": (0.0, float("inf")), "best_epoch": (1.0, float("inf")),
                 "training_seconds": (0.0, float("inf"))}


def _failure(study_dir: Path, rel: str) -> str:
    run_dir = study_dir / rel
    failed = run_dir.with_name(run_dir.name + ".failed.json")
    if failed.is_file():
        return read_json(failed).get("error") or "failed"
    return "not finished (no metrics.json): interrupted, or not run yet"


def _correctness(run_dir: Path) -> dict[str, bool]:
    rows = read_csv(run_dir / "predictions.csv")
    if not rows:
        raise OSError(f"{run_dir / 'predictions.csv'}: missing or empty")
    return {row["index"]: row["correct"] == "1" for row in rows}


def _compare(study_dir: Path, v: dict, best: dict, seeds: list[int]) -> dict:
    """The variant against the best: McNemar pooled over shared seeds, paired t-test over seeds."""
    runs_v, runs_b = v["_by_seed"], best["_by_seed"]
    shared = [s for s in seeds if s in runs_v and s in runs_b]
    acc_v = [runs_v[s][1]["accuracy"] for s in shared]
    acc_b = [runs_b[s][1]["accuracy"] for s in shared]
    diff = 100 * (sum(acc_v) - sum(acc_b)) / len(shared)
    b = c = n_pairs = 0
    paired, n_images = True, None
    for s in shared:
        try:
            cv, cb = _correctness(study_dir / runs_v[s][0]), _correctness(study_dir / runs_b[s][0])
        except (OSError, KeyError):
            paired = False
            break
        if set(cv) != set(cb):
            paired = False
            break
        keys = sorted(cv)
        bb, cc = stats.discordant([cv[k] for k in keys], [cb[k] for k in keys])
        b, c, n_pairs = b + bb, c + cc, n_pairs + len(keys)
        n_images = len(keys)
    p = stats.mcnemar_exact(b, c) if paired else None
    t = stats.paired_ttest(acc_v, acc_b)
    diffs = [100 * (x - y) for x, y in zip(acc_v, acc_b)]
    ci = stats.summarize(diffs, bounds=(-100.0, 100.0))["ci95"]
    return {"variant": v["name"], "against": best["name"], "difference_points": diff,
            "difference_ci95": ci, "mcnemar_p": p, "ttest_p": t,
            "n_pairs": n_pairs if paired else 0, "n_images": n_images if paired else None,
            "seeds": len(shared), "variant_right_best_wrong": b if paired else None,
            "variant_wrong_best_right": c if paired else None, "_part": v["evaluated_on"] or "test"}


def _corrected(comparisons: list[dict]) -> list[dict]:
    """Holm's correction over the comparisons made at once (each test type on its own), and each one's sentence.
    The verdict uses the McNemar p where the images are paired, else the t-test's, corrected over all of them."""
    k = len(comparisons)
    for key in ("mcnemar_p", "ttest_p"):
        for c, adj in zip(comparisons, stats.holm([c[key] for c in comparisons])):
            c[key + "_holm"] = adj
    for c in comparisons:
        part = c.pop("_part")
        if c["mcnemar_p"] is not None:
            c["sentence"] = stats.comparison_sentence(
                c["variant"], c["against"], c["difference_points"], c["mcnemar_p"], n_images=c["n_images"],
                seeds=c["seeds"], ttest_p=c["ttest_p"], part=part, adjusted_p=c["mcnemar_p_holm"], comparisons=k)
        else:  # different test images (other data settings): only the seed-level test applies
            c["sentence"] = stats.comparison_sentence(
                c["variant"], c["against"], c["difference_points"], c["ttest_p"],
                test="paired t-test over seeds, no McNemar: different test images", seeds=c["seeds"], part=part,
                adjusted_p=c["ttest_p_holm"], comparisons=k)
    return comparisons


def _chance(v: dict) -> dict:
    ms = [m for _, m in v["_by_seed"].values()]
    chance_lv = max(stats.chance_of(m) for m in ms)
    ps = []
    for m in ms:
        p = m["chance"].get("p_value_above_chance")
        if p is None:
            p = stats.binomial_above_chance(round(m["accuracy"] * m["n"]), m["n"], stats.chance_of(m))
        ps.append(float(p))
    acc = v["metrics"]["accuracy"]["mean"]
    p = max(ps)
    return {"variant": v["name"], "accuracy": acc, "chance": chance_lv, "p_value": p, "n": v["n_eval"],
            "seeds": len(ms), "sentence": stats.chance_sentence(acc, v["n_eval"], chance_lv, p,
                                                                part=v["evaluated_on"], subject=v["name"],
                                                                seeds=len(ms))}


def aggregate(study_dir: str | Path) -> dict:
    """Read a study folder (plan.json + run folders only) → summary.json and table.md/.csv/.tex.

    Returns the summary: {name, study_file, description, seeds, averaging: "macro",
    variants: [{name, settings, runs, failed: [{run, error}], model, optimizer, lr, parameters,
                metrics: {accuracy|loss|best_epoch|precision_macro|recall_macro|f1_macro|training_seconds:
                          {mean, sd, ci95, values}}, evaluated_on, n_eval}],
    best, comparisons: [{variant, against, difference_points, mcnemar_p, ttest_p, n_pairs, n_images, seeds,
                         variant_right_best_wrong, variant_wrong_best_right, sentence}],
    chance: [{variant, accuracy, chance, p_value, n, seeds, sentence}],
    pretrain: [{name, settings, run, accuracy, failed}], methods: {…}}.
    Unfinished runs are listed under `failed`; a variant with no finished run has null metrics.
    """
    study_dir = Path(study_dir)
    plan = read_json(study_dir / "plan.json")
    seeds = plan["seeds"]
    variants = []
    for pv in plan["variants"]:
        by_seed, failed = {}, []
        for seed, rel in zip(seeds, pv["runs"]):
            if is_finished(study_dir / rel):
                by_seed[seed] = (rel, read_json(study_dir / rel / "metrics.json"))
            else:
                failed.append({"run": rel, "error": _failure(study_dir, rel)})
        ms = [m for _, m in by_seed.values()]
        cfg = pv["config"]
        v = {"name": pv["name"], "settings": pv["settings"], "runs": [r for r, _ in by_seed.values()],
             "failed": failed, "model": cfg["model"]["name"], "optimizer": cfg["optim"]["name"],
             "lr": cfg["optim"]["lr"], "parameters": ms[0].get("parameters") if ms else None,
             "metrics": {}, "evaluated_on": ms[0].get("evaluated_on") if ms else None,
             "n_eval": ms[0].get("n") if ms else None, "_by_seed": by_seed}
        for key in METRICS:
            s = stats.summarize([m[key] for m in ms if m.get(key) is not None], bounds=METRIC_BOUNDS[key])
            v["metrics"][key] = {"mean": s["mean"], "sd": s["sd"], "ci95": s["ci95"], "values": s["values"]}
        variants.append(v)
    done = [v for v in variants if v["_by_seed"]]
    best = max(done, key=lambda v: v["metrics"]["accuracy"]["mean"]) if done else None
    # against a reference named in advance (a tune's base config), else against the best, picked after the fact
    named = plan.get("reference")
    ref = next((v for v in done if v["name"] == named), None) if named else None
    against = ref or best
    comparisons = _corrected([_compare(study_dir, v, against, seeds) for v in done if v is not against])
    selection = None
    if ref is None and best is not None and comparisons:
        selection = (f"{best['name']} is named best after seeing these results, so its lead is optimistic: the "
                     f"{len(comparisons)} comparison(s) against it are Holm-corrected for their number, not for the "
                     "choice itself; confirm a winner on fresh seeds or data (as `cnnlab tune` does)")
    chance = [_chance(v) for v in done]
    pretrain = []
    for pp in plan.get("pretrain", []):
        rel = pp["runs"][0]
        ok = is_finished(study_dir / rel)
        pretrain.append({"name": pp["name"], "settings": pp["settings"], "run": rel,
                         "accuracy": read_json(study_dir / rel / "metrics.json")["accuracy"] if ok else None,
                         "failed": None if ok else _failure(study_dir, rel)})
    for v in variants:
        del v["_by_seed"]
    summary = {"name": plan["name"], "study_file": plan["study_file"], "description": plan.get("description"),
               "seeds": seeds, "averaging": "macro", "variants": variants,
               "best": best["name"] if best else None, "reference": against["name"] if against else None,
               "reference_chosen": "in advance" if ref is not None else "after the fact (the best)",
               "selection_note": selection, "comparisons": comparisons, "chance": chance,
               "pretrain": pretrain, "methods": METHODS}
    atomic_write_text(study_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_tables(summary, study_dir)
    return summary


METHODS = {
    "spread": "mean ± sample sd (ddof = 1) over seeds; 95 % Student-t interval of the mean (none for one seed)",
    "averaging": "precision, recall and F1 are macro averages over classes (unweighted)",
    "mcnemar": "exact McNemar test (two-sided binomial on discordant pairs) of per-image correctness on the "
               "same test images against the reference (a variant named in advance, else the best), pooled over "
               "the seeds both completed",
    "ttest": "paired t-test (scipy.stats.ttest_rel) of per-seed accuracies against the same reference; "
             "needs ≥ 2 shared seeds",
    "multiplicity": "with several variants compared against one reference, each test's p-values are adjusted "
                    "with Holm's step-down method (family-wise error rate); the verdict uses the adjusted p, "
                    "and both are printed",
    "chance": "exact one-sided binomial test of accuracy against max(majority-class rate, 1/classes); "
              "the largest p over a variant's seeds",
}
