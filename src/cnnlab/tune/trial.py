"""The trial side of a tune: inside a `cnnlab train` process started for an Optuna trial, report each epoch's
validation figure to the tune's storage and stop early when the pruner says the trial is hopeless.

The tune's worker passes the link in the environment (TRIAL_ENV: storage, study, trial id, objective, pruner),
so the run's config.yaml stays an ordinary run config: `cnnlab train --resume` of a trial run outside the tune
simply trains without pruning. What is reported at epoch k is the best objective value up to epoch k — the
value the run would keep if it stopped there, since a run keeps its best epoch's weights — so a trial that
early stopping ends before the last epoch is compared fairly with longer ones (the worker reports its final
value for the epochs it never ran: pruning and early stopping agree on what a trial is worth).
"""

from __future__ import annotations

import json
import os

TRIAL_ENV = "CNNLAB_TUNE_TRIAL"


def best_so_far(values: list[float], maximize: bool) -> list[float]:
    """The running best of per-epoch values (max when maximising, else min)."""
    out, best = [], None
    for v in values:
        best = v if best is None else (max(best, v) if maximize else min(best, v))
        out.append(best)
    return out


def make_pruner(spec: dict | None):
    """An Optuna pruner from the tune's pruner settings ({name, startup_trials, warmup_epochs} or None)."""
    import optuna

    spec = spec or {"name": "none"}
    name = spec.get("name", "none")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.get("startup_trials", 5),
                                           n_warmup_steps=spec.get("warmup_epochs", 2) + 1)  # epochs are 1-based
    if name == "percentile":
        return optuna.pruners.PercentilePruner(spec.get("percentile", 25.0),
                                               n_startup_trials=spec.get("startup_trials", 5),
                                               n_warmup_steps=spec.get("warmup_epochs", 2) + 1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, spec.get("warmup_epochs", 1)),
                                              max_resource=spec.get("max_epochs", "auto"))
    return optuna.pruners.NopPruner()


class TrialReporter:
    """Reports the running best of the objective per epoch; says when the pruner wants the trial stopped."""

    def __init__(self, link: dict):
        import optuna

        from .storage import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.metric = link["objective"]          # a history column: val_accuracy, val_loss, …
        self.maximize = link["direction"] == "maximize"
        study = optuna.load_study(study_name=link["study"], storage=open_storage(link["storage"]),
                                  pruner=make_pruner(link.get("pruner")))
        self.trial = optuna.trial.Trial(study, int(link["trial_id"]))
        self.pruning = (link.get("pruner") or {}).get("name", "none") != "none"
        self.reported = 0

    def __call__(self, history: list[dict]) -> bool:
        """After an epoch: report the epochs not reported yet (a resumed trial reports its earlier ones too);
        True when the trial should stop (pruned)."""
        values = [row[self.metric] for row in history if row.get(self.metric) is not None]
        for epoch, value in enumerate(best_so_far(values, self.maximize), start=1):
            if epoch > self.reported:
                self.trial.report(float(value), epoch)
        self.reported = max(self.reported, len(values))
        return self.pruning and bool(values) and self.trial.should_prune()


def reporter_from_env() -> TrialReporter | None:
    """The reporter of the trial this process trains, or None outside a tune."""
    raw = os.environ.get(TRIAL_ENV)
    if not raw:
        return None
    return TrialReporter(json.loads(raw))
