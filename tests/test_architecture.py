"""The shape of the code: no import loops (even lazy ones), dependencies pointing one way, registries as the
one source of every extensible choice."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cnnlab"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: modules of this package it imports}, counting imports inside functions too. `from . import x`
    is an edge to the submodule x when there is one, else to the package; the implicit import of parent
    packages is not counted (Python does it for every import)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = []
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    targets.append(sub if sub in mods else target)
            else:
                continue
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_loops_even_lazy_ones():
    loops = _cycles(import_graph())
    assert not loops, "modules that import each other (directly or round a loop): " + "; ".join(
        " ↔ ".join(c) for c in loops)


def test_dependencies_point_one_way():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith(("cnnlab.models", "cnnlab.data")):
            assert not {d for d in deps if d.startswith("cnnlab.training")}, f"{mod} imports training: {deps}"
        if mod.startswith(("cnnlab.report", "cnnlab.study")):
            assert not {d for d in deps if d.startswith(("cnnlab.training", "cnnlab.api"))}, \
                f"{mod} imports the training stack: {deps}"


def test_a_new_schedule_or_source_is_one_registered_function(monkeypatch, tmp_path):
    """Registering is all it takes: the config accepts the name, lists it in its help, and names it in errors."""
    import pytest

    from cnnlab.config import ConfigError, describe_keys, load_config
    from cnnlab.data.dataset import Dataset
    from cnnlab.data.sources import SOURCES, load_data
    from cnnlab.training.optim import SCHEDULES

    def unregister(reg, name):
        for table in (reg._builders, reg._docs, reg.info):
            table.pop(name, None)

    monkeypatch.setattr(SCHEDULES, "_builders", dict(SCHEDULES._builders))  # restored after the test
    SCHEDULES.register("halving", doc="halve every epoch")(lambda s, e, total, lr0: lr0 * 0.5 ** int(e))
    cfg = load_config(None, ["schedule.name=halving"])
    assert cfg.schedule.name == "halving"
    assert any(k == "schedule.name" and "halving" in help_ for k, _, help_ in describe_keys())
    with pytest.raises(ConfigError, match="choose one of: .*halving"):
        load_config(None, ["schedule.name=halvng"])
    unregister(SCHEDULES, "halving")

    import torch

    monkeypatch.setattr(SOURCES, "_builders", dict(SOURCES._builders))

    @SOURCES.register("stripes", doc="vertical stripes", arg="N")
    def _stripes(arg, *, image_size, channels, **_):
        n = int(arg)
        x = torch.zeros(2 * n, channels or 1, image_size or 8, image_size or 8, dtype=torch.uint8)
        x[n:, :, :, ::2] = 255
        return Dataset(x, torch.tensor([0] * n + [1] * n), ["plain", "striped"], f"stripes:{n}")

    cfg = load_config(None, ["data.source=stripes:6"])
    ds = load_data(cfg.data, progress=False)
    assert len(ds) == 12 and ds.classes == ["plain", "striped"]
    with pytest.raises(ConfigError, match="stripes:N"):
        load_config(None, ["data.source=stripes"])  # its argument is missing
    unregister(SOURCES, "stripes")
