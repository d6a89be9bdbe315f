"""`cnnlab tune`: search a run config's settings with Optuna, then say honestly whether the winner is better.

    spec      parse and validate a tune file (space, budget, objective, sampler, pruner, re-validation)
    storage   Optuna storages by URL (journal file by default; PostgreSQL for many machines)
    trial     inside a trial's `cnnlab train` process: per-epoch reports to the pruner
    search    the ask → run (through the study engine's Executor) → tell loop, crash-safe, budget-exact
    results   trials table, re-validation on fresh seeds against the base, the verdict, best.yaml
    report    the tune's figures and report.html
    runner    run_tune: all of it

Importing this package imports nothing heavy: Optuna is loaded by the modules that use it.
"""
