"""Study files: parse, validate and expand a study (grid × variants × seeds, pretrain) — nothing runs here.

    name: my-study                  # optional; default: the file's stem
    description: …                  # optional
    base: alkhairi2023-cnn.yaml     # a run config; relative paths are relative to the study file
    overrides: {train.epochs: 20}   # applied to every run
    grid: {optim.name: [adam, rmsprop, sgd], data.augment: [off, on]}   # every combination
    variants:                       # and/or named variants, each setting several keys
      cnn-adam: {model.name: alkhairi-cnn, optim.name: adam, optim.lr: 0.001}
      mlp-sgd:  {base: alkhairi2023-mlp.yaml}          # a variant may bring its own base config
    pretrain:                       # optional runs whose weights variants start from
      other: {data.classes: [bear, bird, dog, giraffe, zebra]}
    seeds: [0, 1, 2]                # default [0]
    reference: cnn-adam             # optional: the variant every other is compared with, named in advance
                                    # (default: the best, picked after the fact, which the summary says)

Expansion:
- grid only: one variant per combination, named from its values: a string value stands for itself,
  other values are "<last key part>-<value>" (`{optim.name: [adam], data.augment: [on]}` →
  "adam-augment-on"); if two combinations would get the same name, every name spells out
  "<key>=<value>".
- named variants and a grid: every named variant is crossed with every grid
  combination, named "<variant>-<combination>"; a key may not be both a grid axis and set by a
  variant. Neither: a single variant named "base".
- pretrain: named runs on base + overrides + their settings, trained before everything else with
  the first seed; a setting whose value is "@pretrain/<name>" is replaced by the path of that
  run's model.safetensors (its best weights). Variants that use it wait for it, and fail
  (recorded) if it fails.
Every run config is validated here, before any work, with errors naming the variant.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config, read_yaml, split_override

STUDY_KEYS = ["name", "description", "base", "overrides", "grid", "variants", "pretrain", "seeds", "reference"]
SECTIONS = ["data", "model", "optim", "schedule", "regularization", "train"]
PRETRAIN_REF = "@pretrain/"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


class StudyError(ConfigError):
    """A study file that cannot be run; the message names the key or variant and the fix."""


# --------------------------------------------------------------------------- expansion (pure)

def _flatten(settings: Any, where: str) -> dict:
    """{dotted key: value}; a section given as a mapping ({train: {epochs: 5}}) becomes dotted keys."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise StudyError(f"{where}: expected a mapping of dotted keys to values, e.g. "
                         f"{{optim.lr: 0.01}}; got {settings!r}")
    out = {}
    for k, v in settings.items():
        if not isinstance(k, str):
            raise StudyError(f"{where}: keys must be dotted config keys such as optim.lr; got {k!r}")
        if k in SECTIONS and isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        else:
            out[k] = v
    return out


def _token(key: str, value: Any) -> str:
    last = key.split(".")[-1]
    if isinstance(value, bool):
        return f"{last}-{'on' if value else 'off'}"
    if isinstance(value, str):
        return value
    if value is None:
        return f"{last}-none"
    if isinstance(value, (list, tuple)):
        return f"{last}-" + "x".join(str(v) for v in value)
    if isinstance(value, dict):
        return f"{last}-" + "-".join(f"{k}-{v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{last}-{value:g}"
    return f"{last}-{value}"


def safe_name(text: str) -> str:
    """A folder-safe name: letters, digits and . _ + = - only."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.") or "variant"


def grid_combinations(grid: dict | None) -> list[tuple[str, dict]]:
    """[(name, {key: value})] for every combination of the grid's axes (first axis slowest)."""
    grid = _flatten(grid, "grid")
    if not grid:
        return []
    for key, values in grid.items():
        if key == "base":
            raise StudyError("grid: 'base' cannot be a grid axis; give each base its own named variant")
        if not isinstance(values, list):
            raise StudyError(f"grid: axis {key} must be a list of values, e.g. {key}: [{values!r}]; "
                             "a single value belongs in overrides")
        if not values:
            raise StudyError(f"grid: axis {key} has no values")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    names = ["-".join(safe_name(_token(k, v)) for k, v in c.items()) for c in combos]
    if len(set(names)) < len(names):  # e.g. the same string on two axes: spell out the keys
        names = ["_".join(safe_name(f"{k}={_token(k, v) if not isinstance(v, str) else v}") for k, v in c.items())
                 for c in combos]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise StudyError(f"grid: two combinations are both named {dup!r}; is a value repeated on an axis?")
    return list(zip(names, combos))


def expand_variants(grid: dict | None = None, variants: dict | None = None) -> list[tuple[str, dict]]:
    """[(variant name, settings)] of a grid and/or named variants (see the module docstring)."""
    combos = grid_combinations(grid)
    if variants is not None and not isinstance(variants, dict):
        raise StudyError(f"variants: expected a mapping of names to settings; got {variants!r}")
    named = []
    for name, settings in (variants or {}).items():
        name = str(name)
        if not _NAME_OK.match(name):
            raise StudyError(f"variant {name!r}: names become folder names; use letters, digits and . _ + = - "
                             "(starting with a letter or digit)")
        named.append((name, _flatten(settings, f"variant {name!r}")))
    if named and combos:
        out = []
        for vname, vset in named:
            clash = sorted(set(vset) & set(combos[0][1]))
            if clash:
                raise StudyError(f"variant {vname!r} sets {', '.join(clash)}, which is also a grid axis; "
                                 "remove it from one of the two")
            out += [(f"{vname}-{cname}", {**cset, **vset}) for cname, cset in combos]
    else:
        out = named or combos or [("base", {})]
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise StudyError(f"two variants are both named {dup!r}; rename one")
    return out


def _seeds(seeds: Any) -> list[int]:
    if seeds is None:
        return [0]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise StudyError(f"seeds: a non-empty list of non-negative integers, e.g. [0, 1, 2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds: {seeds} repeats a seed")
    return list(seeds)


def expand_study(study: dict) -> list[tuple[str, dict, int]]:
    """[(variant name, settings, seed)] of a study mapping (its grid, variants and seeds), variant-major."""
    return [(name, settings, seed) for name, settings in expand_variants(study.get("grid"), study.get("variants"))
            for seed in _seeds(study.get("seeds"))]


# --------------------------------------------------------------------------- loading and validation

def _check_keys(study: dict, path: Path) -> None:
    for k in study:
        if k not in STUDY_KEYS:
            close = difflib.get_close_matches(str(k), STUDY_KEYS, n=1)
            raise StudyError(f"{path}: unknown study key {k!r}; valid keys: {', '.join(STUDY_KEYS)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))


def _overrides(value: Any) -> dict:
    if isinstance(value, list):  # ["optim.lr=0.01", …] as on the command line
        return dict(split_override(str(v)) for v in value)
    return _flatten(value, "overrides")


def _refs(settings: dict) -> list[str]:
    """Pretrain names referenced as '@pretrain/<name>' by any setting value."""
    return [v[len(PRETRAIN_REF):] for v in settings.values() if isinstance(v, str) and v.startswith(PRETRAIN_REF)]


def resolve_refs(obj: Any, study_dir: Path | None) -> Any:
    """Replace '@pretrain/<name>' strings by <study>/pretrain/<name>/model.safetensors (absolute)."""
    if isinstance(obj, dict):
        return {k: resolve_refs(v, study_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve_refs(v, study_dir) for v in obj]
    if isinstance(obj, str) and obj.startswith(PRETRAIN_REF) and study_dir is not None:
        return str((study_dir / "pretrain" / obj[len(PRETRAIN_REF):] / "model.safetensors").resolve())
    return obj


def _resolved_config(label: str, name: str, base: Path | None, overrides: dict, settings: dict) -> dict:
    """The validated config (as a dict) of one variant; errors name the variant."""
    tree = read_yaml(base) if base is not None else {}
    tree["name"] = name
    try:
        return load_config(tree, {**overrides, **settings}).to_dict()
    except ConfigError as e:
        raise StudyError(f"{label}: {e}") from None


def _base_path(value: Any, study_path: Path, where: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StudyError(f"{where}: base must be a path to a run config; got {value!r}")
    p = Path(os.path.expanduser(value))
    p = p if p.is_absolute() else study_path.parent / p
    if not p.is_file():
        raise StudyError(f"{where}: base config not found: {p}")
    return p.resolve()


def load_study(path: str | Path, extra: list[str] | dict | None = None) -> dict:
    """Parse, validate and expand a study file; nothing runs.

    extra: overrides from the command line ("data.source=folder:~/photos"), applied to every run last
    (over the study's overrides and each variant's settings).

    Returns {'name', 'path', 'description', 'base', 'overrides', 'seeds', 'variants': [{'name',
    'settings', 'base', 'config', 'needs'}], 'pretrain': [same], 'runs': expand_study(...)}, where
    'config' is the fully resolved run config (a dict; '@pretrain/…' references left as they are).
    """
    path = Path(path)
    raw = read_yaml(path)
    _check_keys(raw, path)
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise StudyError(f"{path}: name {name!r} must be folder-safe (letters, digits, . _ + = -)")
    base = _base_path(raw.get("base"), path, str(path))
    overrides = _overrides(raw.get("overrides"))
    extra = _overrides(list(extra) if isinstance(extra, (list, tuple)) else extra)
    seeds = _seeds(raw.get("seeds"))

    def entry(kind: str, vname: str, settings: dict, cfg_name: str) -> dict:
        shown, settings = dict(settings), dict(settings)  # shown: as written (a base path as given)
        own_base = _base_path(settings.pop("base"), path, f"{kind} {vname!r}") if "base" in settings else base
        try:
            config = _resolved_config(f"{path}: {kind} {vname!r}", cfg_name, own_base, overrides,
                                      {**settings, **extra})
        except StudyError as e:  # fine without the command line's overrides: the mistake is theirs
            if not extra:
                raise
            _resolved_config(f"{path}: {kind} {vname!r}", cfg_name, own_base, overrides, settings)
            raise StudyError(str(e).replace(f"{path}: {kind} {vname!r}", "the command line's overrides", 1)) from None
        return {"name": vname, "settings": shown, "base": own_base, "needs": _refs({**overrides, **settings}),
                "config": config}

    pre = raw.get("pretrain") or {}
    if not isinstance(pre, dict):
        raise StudyError(f"{path}: pretrain: a mapping of names to settings; got {pre!r}")
    pretrain = []
    for pname, psettings in pre.items():
        pname = str(pname)
        if not _NAME_OK.match(pname):
            raise StudyError(f"{path}: pretrain {pname!r}: use a folder-safe name (letters, digits, . _ + = -)")
        pretrain.append(entry("pretrain", pname, _flatten(psettings, f"pretrain {pname!r}"), f"pretrain-{pname}"))
    variants = [entry("variant", vname, settings, vname)
                for vname, settings in expand_variants(raw.get("grid"), raw.get("variants"))]
    known = {p["name"] for p in pretrain}
    for kind, entries in (("pretrain", pretrain), ("variant", variants)):
        for e in entries:
            missing = [r for r in e["needs"] if r not in known]
            if kind == "pretrain" and e["needs"]:
                problem = "a pretrain run cannot start from another pretrain run's weights"
            elif missing:
                problem = (f"no pretrain run named {missing[0]!r} "
                           f"(pretrain runs: {', '.join(sorted(known)) or 'none'})")
            else:
                continue
            raise StudyError(f"{path}: {kind} {e['name']!r}: @pretrain reference: {problem}")
    reference = raw.get("reference")
    if reference is not None and reference not in [v["name"] for v in variants]:
        raise StudyError(f"{path}: reference {reference!r} is not a variant; variants: "
                         + ", ".join(v["name"] for v in variants))
    return {"name": name, "path": path.resolve(), "description": raw.get("description"), "base": base,
            "reference": reference,
            "overrides": {**overrides, **extra}, "seeds": seeds, "variants": variants, "pretrain": pretrain,
            "runs": [(v["name"], v["settings"], s) for v in variants for s in seeds]}
