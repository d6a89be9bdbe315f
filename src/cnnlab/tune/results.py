"""A tune's results: the trials table (summary.json), the re-validation of the best few on fresh seeds against
the base config on the test split, the verdict in plain words, and best.yaml.

Honesty rules: the search only ever saw validation images; the re-validation trains the top configurations
and the base again on seeds the search never used, picks the winner among them by the same validation
objective (never by test), and only then compares each with the base on the test split — McNemar on the same
test images pooled over the seeds, a paired t-test over seeds, both Holm-corrected for the number of
candidates — so "better" means better beyond the luck of the search.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import yaml

from .. import stats
from ..fileio import atomic_write_text
from ..runs import read_history, read_json
from .search import FAIL_REASON, RETRY_OF, RUN, SUPERSEDED
from .spec import OBJECTIVES, TuneSpec


def trial_rows(study) -> list[dict]:
    """One row per trial: number, state, params, value, run folder, reason, epochs, seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        sup = t.system_attrs.get(SUPERSEDED)
        rows.append({"number": t.number, "state": "superseded" if sup else state, "params": t.params,
                     "value": t.value, "run": t.user_attrs.get(RUN), "retry_of": t.user_attrs.get(RETRY_OF),
                     "reason": sup or t.user_attrs.get(FAIL_REASON), "epochs": t.user_attrs.get("epochs_run"),
                     "seconds": t.user_attrs.get("seconds"),
                     "intermediate": {int(k): v for k, v in t.intermediate_values.items()}})
    return rows


def top_trials(rows: list[dict], spec: TuneSpec, k: int) -> list[dict]:
    """The best k completed trials with distinct parameters, best first."""
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    done.sort(key=lambda r: r["value"], reverse=spec.direction == "maximize")
    out, seen = [], set()
    for r in done:
        key = json.dumps(r["params"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out[:k]


def importance(study) -> dict[str, float] | None:
    """Optuna's parameter importances (fANOVA) over the completed trials; None when too few or constant."""
    import optuna
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(done) < 3 or len({t.value for t in done}) < 2:
        return None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "few trials" notes: the report's caption says it is a rough guide
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None


def revalidation_study(spec: TuneSpec, top: list[dict], tune_dir: Path) -> Path:
    """Write TUNE_DIR/revalidate.yaml: a study of the base and the top trials over the fresh seeds, the base
    named in advance as the reference every candidate is compared with."""
    study = {"name": f"{spec.name}-revalidate",
             "description": f"the best {len(top)} configuration(s) of tune {spec.name} re-trained on fresh seeds, "
                            "each compared with the base config on the test split",
             "overrides": spec.overrides, "variants": {"base": {}}, "seeds": spec.revalidate["seeds"],
             "reference": "base"}
    if spec.base is not None:
        study["base"] = str(spec.base)
    for r in top:
        study["variants"][f"trial-{r['number']}"] = r["params"]
    path = tune_dir / "revalidate.yaml"
    atomic_write_text(path, yaml.safe_dump(study, sort_keys=False))
    return path


def _validation_value(run_dir: Path, metric: str) -> float | None:
    """The objective on validation of the model a run kept (its history row at the kept epoch)."""
    m = read_json(run_dir / "metrics.json")
    for row in read_history(run_dir / "history.csv"):
        if row.get("epoch") == m.get("best_epoch"):
            return row.get(metric)
    return None


def verdict(spec: TuneSpec, summary: dict, study_dir: Path) -> dict:
    """The winner among the candidates (by the validation objective over the fresh seeds) and whether it is
    better than the base on the test split, in numbers and one plain sentence."""
    col = OBJECTIVES[spec.objective][0]
    plan = read_json(study_dir / "plan.json")
    val = {}
    for pv in plan["variants"]:
        vals = [_validation_value(study_dir / rel, col) for rel in pv["runs"] if (study_dir / rel / "metrics.json").is_file()]
        vals = [v for v in vals if v is not None]
        val[pv["name"]] = sum(vals) / len(vals) if vals else None
    variants = {v["name"]: v for v in summary["variants"]}
    candidates = [n for n in val if n != "base" and val[n] is not None]
    if not candidates or variants.get("base", {}).get("metrics", {}).get("accuracy", {}).get("mean") is None:
        return {"winner": None, "sentence": "re-validation incomplete: no candidate or no base run finished "
                "(run the same command again to retry the failed runs)", "validation": val}
    winner = (max if spec.direction == "maximize" else min)(candidates, key=lambda n: val[n])
    comp = next(c for c in summary["comparisons"] if c["variant"] == winner)
    acc_w, acc_b = variants[winner]["metrics"]["accuracy"], variants["base"]["metrics"]["accuracy"]
    p, p_holm = comp["mcnemar_p"], comp["mcnemar_p_holm"]
    if p is None:
        p, p_holm = comp["ttest_p"], comp["ttest_p_holm"]
    k = len(candidates)
    better = p_holm is not None and p_holm < stats.ALPHA and comp["difference_points"] > 0
    worse = p_holm is not None and p_holm < stats.ALPHA and comp["difference_points"] < 0
    ci = comp.get("difference_ci95")
    n_seeds = len(spec.revalidate["seeds"])
    text = (f"The tuned configuration ({winner}, chosen on validation {spec.objective.removeprefix('val_')} over "
            f"{n_seeds} fresh seeds) reaches {100 * acc_w['mean']:.2f} % test accuracy against {100 * acc_b['mean']:.2f} % "
            f"for the base config: {comp['difference_points']:+.2f} points"
            + (f" (95 % CI of the paired difference {ci[0]:+.2f} to {ci[1]:+.2f})" if ci else "")
            + f"; McNemar {stats.format_p(p)}" + (f", Holm-corrected for {k} candidates {stats.format_p(p_holm)}"
                                                   if k > 1 else "")
            + f", paired t-test over seeds {stats.format_p(comp['ttest_p'])}. ")
    if better:
        text += "It is significantly better than the base."
    elif worse:
        text += "It is significantly WORSE than the base: the search's best was luck or overfitted the validation split."
    else:
        text += ("It is NOT significantly better than the base: the gain cannot be told from seed-to-seed and "
                 "image-to-image noise.")
    return {"winner": winner, "better": better, "worse": worse, "difference_points": comp["difference_points"],
            "difference_ci95": ci, "p": p, "p_holm": p_holm, "ttest_p": comp["ttest_p"], "candidates": k,
            "test_accuracy": {"winner": acc_w, "base": acc_b}, "validation": val, "sentence": text}


def write_best(spec: TuneSpec, tune_dir: Path, study_dir: Path, winner: str) -> Path:
    """best.yaml: the winner's run config, ready for `cnnlab train best.yaml` (the test split used again)."""
    plan = read_json(study_dir / "plan.json")
    config = next(v["config"] for v in plan["variants"] if v["name"] == winner)
    config = {**config, "name": f"{spec.name}-best"}
    config["train"] = {**config["train"], "seed": spec.base_config["train"]["seed"]}
    path = tune_dir / "best.yaml"
    header = (f"# cnnlab tune {spec.name}: the re-validated winner ({winner}); train it with\n"
              f"#   cnnlab train {path}\n")
    atomic_write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


class FolderLock:
    """An advisory file lock in the tune folder, shared by the workers writing there. wait=False: `with` gives
    False at once when another worker holds it (one worker re-validates; the others skip); wait=True: waits."""

    def __init__(self, tune_dir: Path, name: str, wait: bool = False):
        self.path, self.wait = tune_dir / name, wait
        self.f = None

    def __enter__(self) -> bool:
        self.f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def __exit__(self, *exc):
        self.f.close()
        return False
