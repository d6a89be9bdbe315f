"""A tiny name → builder registry (timm-style: decorate a builder, create by name)."""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builder functions; unknown names fail with the valid choices."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None):
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            lines = (doc or fn.__doc__ or "").strip().splitlines()
            self._docs[name] = lines[0] if lines else ""
            return fn
        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.list())}")
        return self._builders[name]

    def create(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._builders if fnmatch.fnmatch(n, pattern))

    def describe(self, name: str) -> str:
        return self._docs.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._builders
