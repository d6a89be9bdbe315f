"""Reading config text safely: YAML files (safe loader, alias bombs refused), key=value overrides, recipes.

Knows nothing of the config's schema (cnnlab.config): it turns text into plain values, refusing what
could run code, take minutes or exhaust memory, with errors that name the file or the override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 100_000  # values in one YAML document once its aliases are expanded (a config has ~100)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the fix."""


def parse_value(text: str) -> Any:
    """A command-line value, read as one YAML scalar/flow item: 0.01, true, null, [64, 32], adam."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    check_expanded_size(value, f"the value {text[:40]!r}")
    return value


def find_recipe(arg: str) -> Path | None:
    """A YAML path as given, or a bare recipe name looked up in ./recipes (`demo` → recipes/demo.yaml)."""
    p = Path(arg)
    if p.is_file():
        return p
    for candidate in (Path("recipes") / f"{arg}.yaml", Path("recipes") / arg):
        if candidate.is_file():
            return candidate
    return None


def read_yaml(path: str | Path) -> dict:
    """Read a YAML file with the safe loader only (no object-constructing tags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid (safe) YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    check_expanded_size(data, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, optim, …)")
    return data


def split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.01")
    k, v = text.split("=", 1)
    return k.strip(), parse_value(v)


def check_expanded_size(obj: Any, what: str, limit: int = MAX_NODES) -> None:
    """Refuse YAML whose aliases expand to more than `limit` values, or refer to themselves, before anything
    expands them: a few hundred bytes of nested aliases ("billion laughs") would otherwise take minutes and
    gigabytes to copy. Shared parts are counted once per use, each computed once (memoised by identity)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(x) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        key = id(x)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{what} refers to itself (a recursive YAML alias); write the values out")
        active.add(key)
        n = 1 + sum(size(v) for v in (x.values() if isinstance(x, dict) else x))
        active.discard(key)
        if n > limit:
            raise ConfigError(f"{what} expands to more than {limit:,} values (nested YAML aliases?); "
                              "a config needs a few hundred at most")
        sizes[key] = n
        return n

    try:
        size(obj)
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply") from None


def deepcopy_tree(x):
    if isinstance(x, dict):
        return {k: deepcopy_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [deepcopy_tree(v) for v in x]
    return x
