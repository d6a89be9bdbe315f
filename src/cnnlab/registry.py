"""A tiny name → builder registry (timm-style: decorate a builder, create by name).

Every extensible choice of cnnlab is one Registry: models (`models.MODELS`), data sources
(`data.sources.SOURCES`), optimisers and learning-rate schedules (`training.optim.OPTIMIZERS`,
`SCHEDULES`), weight inits (`models.init.INITS`). The config's choices, its help text and its error
messages are read from them, so adding one is one decorated function in one file (plus its test).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builder functions; unknown names fail with the valid choices.

    sort: list names alphabetically (models), or in registration order (sort=False: optimisers, in the
    order they are documented). A name registered with `arg="PATH"` is written `name:PATH` in a
    config (a data source `folder:~/photos`); `info` keeps any other facts about an entry.
    """

    def __init__(self, kind: str, sort: bool = True):
        self.kind, self.sort = kind, sort
        self._builders: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, doc: str | None = None, **info):
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            lines = (doc or fn.__doc__ or "").strip().splitlines()
            self._docs[name] = lines[0] if lines else ""
            self.info[name] = info
            return fn
        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.spellings())}")
        return self._builders[name]

    def create(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        names = [n for n in self._builders if fnmatch.fnmatch(n, pattern)]
        return sorted(names) if self.sort else names

    def describe(self, name: str) -> str:
        return self._docs.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    # ------------------------------------------------------------------ names as a config writes them

    def spellings(self) -> list[str]:
        """Every choice as written in a config: `random`, `folder:PATH`."""
        return [f"{n}:{self.info[n]['arg']}" if self.info[n].get("arg") else n for n in self.list()]

    def split(self, value: str) -> tuple[str, str | None]:
        """`folder:~/photos` → ("folder", "~/photos"); a name that takes no argument keeps any ':' in it."""
        name, sep, arg = str(value).partition(":")
        if sep and name in self._builders and self.info[name].get("arg"):
            return name, arg
        return str(value), None

    def accepts(self, value: str) -> bool:
        """Whether `value` names an entry, with its argument if it takes one."""
        name, arg = self.split(value)
        return name in self._builders and bool(self.info[name].get("arg")) == (arg is not None and arg != "")
