"""Tune files: parse and validate a search (nothing runs here; every error names the key and the fix).

    name: my-tune                          # optional; default: the file's stem
    base: harahap2024-animals.yaml         # the run config tuned (relative to this file)
    overrides: {train.epochs: 10}          # applied to every trial and re-validation run
    space:                                 # config keys to search, in this order
      optim.lr: {low: 1.0e-4, high: 0.1, log: true}      # a range: float or int as the key is (step: optional)
      model.dropout: {low: 0.0, high: 0.5}
      optim.name: [adam, sgd, rmsprop]                   # a list: categorical
      optim.momentum: {low: 0.8, high: 0.99, when: {optim.name: sgd}}   # only searched when optim.name is sgd
    trials: 30                             # how many trials (failed and pruned ones count)
    timeout: 30m                           # optional: no new trial after this long (s, m, h)
    objective: val_accuracy                # or val_loss; trials never see the test split
    sampler: {name: tpe, seed: 0}          # tpe (default) | random | qmc; seeded and recorded
    pruner: {name: median, warmup_epochs: 2, startup_trials: 5}   # median (default) | percentile | hyperband | none
    revalidate: {top: 3, seeds: [100, 101, 102]}   # the best few re-trained on fresh seeds vs the base; false: skip
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, find_recipe, load_config, read_yaml
from ..study.spec import SECTIONS

TUNE_KEYS = ["name", "description", "base", "overrides", "space", "trials", "timeout", "objective", "sampler",
             "pruner", "revalidate"]
# objective → (history column reported per epoch, metrics.json key of the kept model, direction)
OBJECTIVES = {"val_accuracy": ("val_accuracy", "accuracy", "maximize"),
              "val_loss": ("val_loss", "loss", "minimize")}
SAMPLERS = ["tpe", "random", "qmc"]
PRUNERS = ["median", "percentile", "hyperband", "none"]
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
_RANGE_KEYS = {"low", "high", "log", "step", "when"}


class TuneError(ConfigError):
    """A tune file that cannot be run; the message names the key and the fix."""


@dataclass
class Param:
    key: str                          # a dotted config key
    kind: str                         # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list = field(default_factory=list)
    when: dict[str, list] = field(default_factory=dict)  # searched only when these earlier keys have these values

    def describe(self) -> str:
        if self.kind == "categorical":
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log scale)" if self.log else "") + \
                (f" step {self.step:g}" if self.step else "")
        if self.when:
            text += " when " + " and ".join(f"{k} in {v}" for k, v in self.when.items())
        return text


@dataclass
class TuneSpec:
    name: str
    path: Path
    description: str | None
    base: Path | None
    overrides: dict
    space: list[Param]
    trials: int
    timeout: float | None
    objective: str
    sampler: dict
    pruner: dict
    revalidate: dict | None
    base_config: dict                 # base + overrides, resolved (what "base" means in the re-validation)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][2]

    @property
    def search_seed(self) -> int:
        return self.base_config["train"]["seed"]

    def trial_config(self, params: dict) -> dict:
        """A trial's resolved run config: base + overrides + its parameters, the test split withheld."""
        return load_config(self.base_config, {**params, "data.withhold_test": True}).to_dict()

    def to_json(self) -> dict:
        return {"name": self.name, "file": str(self.path), "description": self.description,
                "base": str(self.base) if self.base else None, "overrides": self.overrides,
                "space": [dataclasses.asdict(p) for p in self.space], "trials": self.trials, "timeout": self.timeout,
                "objective": self.objective, "direction": self.direction, "sampler": self.sampler,
                "pruner": self.pruner, "revalidate": self.revalidate, "search_seed": self.search_seed}


def _field_kind(key: str) -> str | None:
    """'float', 'int', 'bool' or None (text / lists) from the config schema's annotation of a dotted key."""
    cls, parts = Config, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None
        f = fields[part]
        if i < len(parts) - 1:
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if not dataclasses.is_dataclass(sub):
                return None
            cls = type(sub)
            continue
        t = str(f.type)
        return "bool" if "bool" in t else "float" if "float" in t else "int" if "int" in t else None
    return None


def _seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|h|min)?\s*", str(value))
    if not m or float(m.group(1)) <= 0:
        raise TuneError(f"{where}: a positive duration such as 600, 10m or 1.5h; got {value!r}")
    return float(m.group(1)) * {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


def _check_value(base: dict, key: str, value: Any, where: str) -> None:
    try:
        load_config(base, {key: value})
    except ConfigError as e:
        raise TuneError(f"{where}: {e}") from None


def _param(key: str, raw: Any, base: dict, earlier: dict[str, Param], where: str) -> Param:
    if not isinstance(key, str) or "." not in key:
        raise TuneError(f"{where}: keys are dotted config keys such as optim.lr; got {key!r}")
    try:
        load_config(base, {key: base_value(base, key)})
    except ConfigError as e:
        raise TuneError(f"{where}: {e}") from None
    if isinstance(raw, list):
        if not raw:
            raise TuneError(f"{where}: {key}: an empty list of choices")
        if len({repr(v) for v in raw}) < len(raw):
            raise TuneError(f"{where}: {key}: a choice is repeated in {raw}")
        for v in raw:
            _check_value(base, key, v, f"{where}: {key}: choice {v!r}")
        return Param(key, "categorical", choices=list(raw))
    if not isinstance(raw, dict):
        raise TuneError(f"{where}: {key}: give a list of choices, e.g. [adam, sgd], or a range, e.g. "
                        f"{{low: 0.0001, high: 0.1, log: true}}; got {raw!r}")
    unknown = sorted(set(raw) - _RANGE_KEYS - {"choices"})
    if unknown:
        raise TuneError(f"{where}: {key}: unknown setting(s) {', '.join(unknown)}; a range takes low, high, log, "
                        "step and when; choices take choices and when")
    when = _when(raw.get("when"), earlier, f"{where}: {key}")
    if "choices" in raw:
        p = _param(key, raw["choices"], base, earlier, where)
        p.when = when
        return p
    kind = _field_kind(key)
    if kind not in ("float", "int"):
        raise TuneError(f"{where}: {key} is not a number; search it as a list of choices, e.g. "
                        f"{key}: [{base_value(base, key)!r}, …]")
    if "low" not in raw or "high" not in raw:
        raise TuneError(f"{where}: {key}: a range needs low and high")
    low, high, log, step = raw["low"], raw["high"], raw.get("log", False), raw.get("step")
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TuneError(f"{where}: {key}: {name} must be a number; got {v!r}")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step) if v is not None):
        raise TuneError(f"{where}: {key} takes whole numbers: low, high and step must be integers")
    if not low < high:
        raise TuneError(f"{where}: {key}: empty range: low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise TuneError(f"{where}: {key}: log is true or false; got {log!r}")
    if log and low <= 0:
        raise TuneError(f"{where}: {key}: a log-scale range needs low > 0; got {low}")
    if log and step is not None:
        raise TuneError(f"{where}: {key}: step and log cannot be combined (Optuna's rule)")
    if step is not None and (step <= 0 or step > high - low):
        raise TuneError(f"{where}: {key}: step must be > 0 and at most high − low")
    if kind == "int":
        low, high, step = int(low), int(high), int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
    for v in (low, high):
        _check_value(base, key, v, f"{where}: {key}: bound {v!r}")
    return Param(key, kind, low, high, log, step, when=when)


def _when(raw: Any, earlier: dict[str, Param], where: str) -> dict[str, list]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise TuneError(f"{where}: when: a mapping of earlier space keys to values, e.g. {{optim.name: sgd}}")
    out = {}
    for k, v in raw.items():
        if k not in earlier:
            raise TuneError(f"{where}: when: {k!r} is not a space key listed before this one"
                            + (f" (earlier keys: {', '.join(earlier)})" if earlier else ""))
        values = v if isinstance(v, list) else [v]
        p = earlier[k]
        bad = [x for x in values if p.kind == "categorical" and x not in p.choices]
        if bad:
            raise TuneError(f"{where}: when: {k} is never {bad[0]!r}; its choices: "
                            + ", ".join(map(str, p.choices)))
        out[k] = values
    return out


def base_value(tree: dict, key: str) -> Any:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(settings: Any, where: str) -> dict:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise TuneError(f"{where}: a mapping of dotted config keys to values; got {settings!r}")
    out = {}
    for k, v in settings.items():
        if k in SECTIONS and isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        else:
            out[str(k)] = v
    return out


def _choice(raw: Any, allowed: list[str], where: str, default: str) -> dict:
    spec = {"name": raw} if isinstance(raw, str) or raw is None else raw
    if not isinstance(spec, dict):
        raise TuneError(f"{where}: a name ({', '.join(allowed)}) or a mapping with name; got {raw!r}")
    spec = {"name": default, **{k: v for k, v in spec.items() if v is not None}}
    if spec["name"] not in allowed:
        close = difflib.get_close_matches(str(spec["name"]), allowed, n=1)
        raise TuneError(f"{where}: unknown {where} {spec['name']!r}; choose one of: {', '.join(allowed)}"
                        + (f" (did you mean {close[0]!r}?)" if close else ""))
    return spec


def load_tune(path: str | Path, trials: int | None = None, timeout: Any = None) -> TuneSpec:
    """Parse and validate a tune file (command-line --trials / --timeout win over the file's)."""
    found = find_recipe(str(path))
    if found is None:
        raise TuneError(f"tune file not found: {path}")
    path = Path(found)
    raw = read_yaml(path)
    for k in raw:
        if k not in TUNE_KEYS:
            close = difflib.get_close_matches(str(k), TUNE_KEYS, n=1)
            raise TuneError(f"{path}: unknown tune key {k!r}; valid keys: {', '.join(TUNE_KEYS)}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise TuneError(f"{path}: name {name!r} must be folder-safe (letters, digits, . _ + = -)")
    base = None
    if raw.get("base") is not None:
        b = Path(os.path.expanduser(str(raw["base"])))
        base = (b if b.is_absolute() else path.parent / b).resolve()
        if not base.is_file():
            raise TuneError(f"{path}: base config not found: {base}")
    overrides = _flatten(raw.get("overrides"), f"{path}: overrides")
    tree = read_yaml(base) if base else {}
    tree["name"] = name
    try:
        base_config = load_config(tree, overrides).to_dict()
    except ConfigError as e:
        raise TuneError(f"{path}: base + overrides: {e}") from None
    space_raw = _flatten(raw.get("space"), f"{path}: space")
    if not space_raw:
        raise TuneError(f"{path}: space: give at least one config key to search, e.g. "
                        "space: {optim.lr: {low: 1.0e-4, high: 0.1, log: true}}")
    space: dict[str, Param] = {}
    for key, spec in space_raw.items():
        space[key] = _param(key, spec, base_config, dict(space), f"{path}: space")
    n = trials if trials is not None else raw.get("trials", 20)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TuneError(f"{path}: trials: a positive whole number; got {n!r}")
    objective = raw.get("objective", "val_accuracy")
    if objective not in OBJECTIVES:
        raise TuneError(f"{path}: objective {objective!r}: choose one of {', '.join(OBJECTIVES)} (trials are "
                        "judged on validation images; the test split is kept for the re-validation)")
    sampler = _choice(raw.get("sampler"), SAMPLERS, "sampler", "tpe")
    sampler.setdefault("seed", 0)
    if isinstance(sampler["seed"], bool) or not isinstance(sampler["seed"], int) or sampler["seed"] < 0:
        raise TuneError(f"{path}: sampler.seed: a non-negative integer; got {sampler['seed']!r}")
    pruner = _choice(raw.get("pruner"), PRUNERS, "pruner", "median")
    pruner.setdefault("startup_trials", 5)
    pruner.setdefault("warmup_epochs", 2)
    pruner["max_epochs"] = base_config["train"]["epochs"]
    reval = raw.get("revalidate", {"top": 3, "seeds": [100, 101, 102]})
    if reval is not False and reval is not None:
        if not isinstance(reval, dict) or set(reval) - {"top", "seeds"}:
            raise TuneError(f"{path}: revalidate: {{top: 3, seeds: [100, 101, 102]}} or false; got {reval!r}")
        reval = {"top": reval.get("top", 3), "seeds": reval.get("seeds", [100, 101, 102])}
        top, seeds = reval["top"], reval["seeds"]
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise TuneError(f"{path}: revalidate.top: a positive whole number; got {top!r}")
        if (not isinstance(seeds, list) or len(seeds) < 2 or len(set(seeds)) < len(seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise TuneError(f"{path}: revalidate.seeds: at least 2 distinct non-negative integers (a paired t-test "
                            f"over seeds needs two); got {seeds!r}")
        if base_config["train"]["seed"] in seeds:
            raise TuneError(f"{path}: revalidate.seeds {seeds} include the search's seed "
                            f"(train.seed={base_config['train']['seed']}): re-validation needs fresh seeds")
    else:
        reval = None
    return TuneSpec(name, path.resolve(), raw.get("description"), base, overrides, list(space.values()), n,
                    _seconds(timeout if timeout is not None else raw.get("timeout"), "timeout"), objective,
                    sampler, pruner, reval, base_config)
