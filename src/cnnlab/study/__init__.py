"""Studies: a base config × (grid and/or named variants) × seeds → one run folder each → table and tests.

    spec       parse, validate and expand a study file (nothing runs)
    plan       the run requests, their resolved config files and plan.json
    executors  the one interface to the machines: run requests, each a fresh `cnnlab train` process,
               and report each outcome (LocalExecutor here; a Ray or Optuna-driven one plugs in the same way)
    ray_executor  RayExecutor: the same runs as Ray tasks on a cluster (`--executor ray`; needs cnnlab[ray])
    aggregate  plan.json + run folders → summary.json, tables, paired tests
    runner     run_study: load → plan → execute → aggregate → report

Where a change goes: a new study key → spec; a new way to run many trainings → an Executor subclass in
executors (planning and aggregation do not change); a new statistic → aggregate (and cnnlab.stats).
"""

from ..runs import is_finished  # noqa: F401
from .aggregate import METRIC_BOUNDS, METRICS, aggregate  # noqa: F401
from .executors import Executor, LocalExecutor, RunOutcome, RunRequest  # noqa: F401
from .runner import run_study  # noqa: F401
from .spec import StudyError, expand_study, expand_variants, grid_combinations, load_study  # noqa: F401
