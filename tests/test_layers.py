"""One-way layers: the imports of every module under talkstream/ follow one order, with no cycle.

The layers, lowest first. A module may import its own layer and the layers below it, never a
layer above (except the exceptions listed below, each with its reason):

| layer | modules                                         | what it is                        |
|-------|-------------------------------------------------|-----------------------------------|
| 0     | talkstream (``__version__``), errors, _config_io | names every layer shares          |
| 1     | config                                          | the config tree                   |
| 2     | kernels, busy                                   | kernels; the busy-machine hint    |
| 3     | engine                                          | networks, the runtime protocol    |
|       |                                                 | (engine.runtime), Engine          |
| 4     | export                                          | backends implementing it          |
| 5     | runtime (talkstream/runtime.py)                 | composition root: load_engine     |
| 6     | streaming, publish, integrations, cluster,      | applications of a loaded engine   |
|       | benchmarking, training                          | (peers: no module-level cycle)    |
| 7     | cli.py, every ``<package>/cli.py``, __main__.py | the commands (entry points)       |

Justified exceptions (``EXCEPTIONS``; from module prefix -> to module prefix, and why):

- ``config`` -> streaming/training/benchmarking/publish/integrations, type-only (under
  ``TYPE_CHECKING``): the one config tree names its sections' classes in annotations and imports
  them by name (``importlib``) only when a tree is read from a file, so importing ``config``
  loads none of them.
- ``streaming.live`` -> ``cli``, function-level: the ``talkstream live`` parser (built in
  ``streaming.live``) reuses the CLI's photo flags.
- ``publish.sink`` -> ``publish.cli``, function-level: ``publish/cli.py`` also holds the publish
  command's ``PublishConfig`` and destination check, which the live sink reuses.

How imports are counted. Every ``import``/``from ... import`` of a ``talkstream`` module, at any
depth of the syntax tree, has a kind:

- ``module``: executed when the module is imported (module level, including try/except and
  if-blocks that are not ``TYPE_CHECKING``);
- ``function``: inside a function or method body (a lazy import, executed when it runs);
- ``type``: under ``if TYPE_CHECKING:`` (never executed).

The layer rule and the engine rule apply to all three kinds: a lazy or type-only import is still
a dependency, so it cannot hide a violation. The cycle rule applies to ``module`` imports only:
those are the ones Python executes at import time (a cycle among them is an import-order bug
waiting to happen); a function-level import that closes a loop is legal Python, and it still has
to obey the layer order, which rules out loops between layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "talkstream"

# Module prefix -> layer; the longest matching prefix wins.
LAYERS: dict[str, int] = {
    "talkstream": 0,  # the package itself (__version__)
    "talkstream.errors": 0,
    "talkstream._config_io": 0,
    "talkstream.config": 1,
    "talkstream.kernels": 2,
    "talkstream.busy": 2,
    "talkstream.engine": 3,
    "talkstream.export": 4,
    "talkstream.runtime": 5,
    "talkstream.streaming": 6,
    "talkstream.publish": 6,
    "talkstream.integrations": 6,
    "talkstream.cluster": 6,
    "talkstream.benchmarking": 6,
    "talkstream.training": 6,
    "talkstream.cli": 7,
}
CLI_LAYER = 7  # every module named cli or __main__ (talkstream/<package>/cli.py) is a command

# The engine never imports these: it defines the runtime protocol, others implement and use it.
ENGINE_FORBIDDEN = (
    "talkstream.export",
    "talkstream.runtime",
    "talkstream.streaming",
    "talkstream.benchmarking",
    "talkstream.training",
    "talkstream.cli",
    "talkstream.integrations",
    "talkstream.publish",
    "talkstream.cluster",
)


@dataclass(frozen=True)
class Exception_:
    source: str  # importing module prefix
    target: str  # imported module prefix
    kinds: frozenset[str]  # which import kinds are allowed
    reason: str


EXCEPTIONS: tuple[Exception_, ...] = (
    *(
        Exception_(
            "talkstream.config",
            target,
            frozenset({"type"}),
            "the config tree names its sections' classes (type-only; imported by name when a "
            "tree is read)",
        )
        for target in (
            "talkstream.streaming",
            "talkstream.training",
            "talkstream.benchmarking",
            "talkstream.publish",
            "talkstream.integrations",
            "talkstream.cluster",
        )
    ),
    Exception_(
        "talkstream.streaming.live",
        "talkstream.cli",
        frozenset({"function"}),
        "the `talkstream live` parser reuses the CLI's photo flags",
    ),
    Exception_(
        "talkstream.publish.sink",
        "talkstream.publish.cli",
        frozenset({"function"}),
        "publish/cli.py holds PublishConfig and check_destination, which the sink reuses",
    ),
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (resolved to a module of the graph where possible)
    kind: str  # "module", "function" or "type"
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target} ({self.kind})"


# --- the checker: plain functions over a {module: source text} mapping -------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root: Path) -> dict[str, tuple[str, bool]]:
    """{module name: (source, is_package)} of every module under ``root``."""
    return {
        module_name(p, root): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
        for p in sorted(root.rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, kind: str) -> Iterator[tuple[ast.AST, str]]:
    """Every import node under ``node`` with its kind."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, kind
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, "type" if kind == "type" else "function")
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk_stmt(stmt, "type")
            for stmt in child.orelse:
                yield from _walk_stmt(stmt, kind)
        else:
            yield from _walk(child, kind)


def _walk_stmt(stmt: ast.stmt, kind: str) -> Iterator[tuple[ast.AST, str]]:
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        yield stmt, kind
    else:
        yield from _walk(stmt, kind)


def _resolve(name: str, known: set[str]) -> str:
    """``name`` itself if it is a module of the graph, else its longest parent that is."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, source: str, is_package: bool, modules: Iterable[str]) -> list[Import]:
    """The ``talkstream`` imports of one module (relative imports resolved)."""
    modules = set(modules)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node, kind in _walk(ast.parse(source), "module"):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            assert isinstance(node, ast.ImportFrom)
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for t in targets:
            if t == "talkstream" or t.startswith("talkstream."):
                out.append(Import(module, _resolve(t, modules), kind, node.lineno))  # type: ignore[attr-defined]
    return out


def all_imports(package: Mapping[str, tuple[str, bool]]) -> list[Import]:
    return [
        imp
        for mod, (src, is_pkg) in package.items()
        for imp in imports_of(mod, src, is_pkg, package)
    ]


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str, layers: Mapping[str, int] = LAYERS) -> int:
    if module.rpartition(".")[2] in ("cli", "__main__"):
        return CLI_LAYER
    best = max((p for p in layers if _under(module, p)), key=len, default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS")
    return layers[best]


def layer_violations(
    imports: Iterable[Import],
    layers: Mapping[str, int] = LAYERS,
    exceptions: Iterable[Exception_] = EXCEPTIONS,
) -> list[str]:
    """Imports from a layer into a higher one that no exception allows."""
    exceptions = list(exceptions)
    bad = []
    for imp in imports:
        src, dst = layer_of(imp.source, layers), layer_of(imp.target, layers)
        if dst <= src:
            continue
        if any(
            _under(imp.source, e.source) and _under(imp.target, e.target) and imp.kind in e.kinds
            for e in exceptions
        ):
            continue
        bad.append(f"{imp}: layer {src} imports layer {dst}")
    return bad


def engine_violations(imports: Iterable[Import]) -> list[str]:
    return [
        str(imp)
        for imp in imports
        if _under(imp.source, "talkstream.engine")
        and any(_under(imp.target, f) for f in ENGINE_FORBIDDEN)
    ]


def import_cycles(imports: Iterable[Import]) -> list[list[str]]:
    """Cycles among module-level imports (strongly connected components of two or more modules,
    or a module importing itself), each as a sorted list of modules."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.kind == "module":
            graph.setdefault(imp.source, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    # Only explicit imports: that importing pkg.sub first runs pkg/__init__ is no cycle (a
    # package's __init__ importing its own submodules is how packages are built).
    # Tarjan's algorithm, iteratively (no recursion limit on a large graph).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1 or node in graph[node]:
                        cycles.append(sorted(comp))
    return cycles


# --- the checks on the real package ----------------------------------------------------------


@pytest.fixture(scope="module")
def package() -> dict[str, tuple[str, bool]]:
    return read_package(ROOT)


@pytest.fixture(scope="module")
def imports(package: dict[str, tuple[str, bool]]) -> list[Import]:
    return all_imports(package)


def test_every_module_has_a_layer(package: dict[str, tuple[str, bool]]) -> None:
    for mod in package:
        layer_of(mod)  # raises for a module outside the table


def test_the_engine_imports_no_backend_and_no_application(imports: list[Import]) -> None:
    assert engine_violations(imports) == []


def test_imports_follow_the_layer_order(imports: list[Import]) -> None:
    assert layer_violations(imports) == []


def test_no_cycles_among_module_level_imports(imports: list[Import]) -> None:
    assert import_cycles(imports) == []


def test_every_exception_is_still_needed(imports: list[Import]) -> None:
    # An exception nothing uses any more is a hole in the table: remove it.
    for e in EXCEPTIONS:
        used = [
            i
            for i in imports
            if _under(i.source, e.source) and _under(i.target, e.target) and i.kind in e.kinds
        ]
        assert used, f"exception {e.source} -> {e.target} ({e.reason}) is unused"


def test_the_checker_sees_imports_at_every_depth_and_kind() -> None:
    src = (
        "from typing import TYPE_CHECKING\n"
        "import talkstream.config\n"
        "from talkstream.engine import pipeline\n"
        "from . import sibling\n"
        "try:\n"
        "    from talkstream.errors import InputError\n"
        "except ImportError:\n"
        "    pass\n"
        "if TYPE_CHECKING:\n"
        "    from talkstream.streaming.server import Engine\n"
        "class C:\n"
        "    def m(self):\n"
        "        import talkstream.export.backends as b\n"
        "        def inner():\n"
        "            from talkstream.runtime import load_engine\n"
    )
    modules = [
        "talkstream",
        "talkstream.config",
        "talkstream.errors",
        "talkstream.engine",
        "talkstream.engine.pipeline",
        "talkstream.engine.sibling",
        "talkstream.engine.x",
        "talkstream.streaming.server",
        "talkstream.export.backends",
        "talkstream.runtime",
    ]
    got = {(i.target, i.kind) for i in imports_of("talkstream.engine.x", src, False, modules)}
    assert got == {
        ("talkstream.config", "module"),
        ("talkstream.engine.pipeline", "module"),
        ("talkstream.engine.sibling", "module"),
        ("talkstream.errors", "module"),
        ("talkstream.streaming.server", "type"),
        ("talkstream.export.backends", "function"),
        ("talkstream.runtime", "function"),
    }


def _graph(edges: dict[str, list[tuple[str, str]]]) -> list[Import]:
    return [Import(src, dst, kind, 1) for src, out in edges.items() for dst, kind in out]


def test_the_checker_fails_on_violations() -> None:
    # A lazy import from the engine into export: the engine rule and the layer rule catch it.
    bad = _graph({"talkstream.engine.pipeline": [("talkstream.export.backends", "function")]})
    assert engine_violations(bad) and layer_violations(bad)
    # Type-only counts too.
    typed = _graph({"talkstream.engine.pipeline": [("talkstream.streaming.server", "type")]})
    assert engine_violations(typed) and layer_violations(typed)
    # export -> runtime is upward; export -> engine is fine.
    assert layer_violations(_graph({"talkstream.export.eager": [("talkstream.runtime", "module")]}))
    assert not layer_violations(
        _graph({"talkstream.export.eager": [("talkstream.engine.runtime", "module")]})
    )
    # An exception covers only its own kind: config may name streaming type-only, not import it.
    assert not layer_violations(
        _graph({"talkstream.config": [("talkstream.streaming.config", "type")]})
    )
    assert layer_violations(
        _graph({"talkstream.config": [("talkstream.streaming.config", "module")]})
    )
    # Application modules import each other freely (one layer) ... but a cli module is above.
    assert not layer_violations(
        _graph({"talkstream.publish.push": [("talkstream.streaming.tracks", "module")]})
    )
    assert layer_violations(
        _graph({"talkstream.publish.push": [("talkstream.publish.cli", "module")]})
    )


def test_the_checker_finds_cycles() -> None:
    cyc = _graph(
        {
            "talkstream.export.backends": [("talkstream.export.tensorrt", "module")],
            "talkstream.export.tensorrt": [("talkstream.export.common", "module")],
            "talkstream.export.common": [("talkstream.export.backends", "module")],
            "talkstream.engine.a": [("talkstream.engine.b", "module")],
        }
    )
    assert import_cycles(cyc) == [
        ["talkstream.export.backends", "talkstream.export.common", "talkstream.export.tensorrt"]
    ]
    # A function-level import closing the loop is not a module-level cycle.
    lazy = _graph(
        {
            "talkstream.export.backends": [("talkstream.export.tensorrt", "module")],
            "talkstream.export.tensorrt": [("talkstream.export.backends", "function")],
        }
    )
    assert import_cycles(lazy) == []
    # A package importing its own submodule is no cycle; the submodule importing the package
    # back is.
    pkg = _graph({"talkstream.kernels": [("talkstream.kernels.warp", "module")]})
    assert import_cycles(pkg) == []
    pkg += _graph({"talkstream.kernels.warp": [("talkstream.kernels", "module")]})
    assert import_cycles(pkg) == [["talkstream.kernels", "talkstream.kernels.warp"]]


def test_the_checker_catches_a_bad_import_in_a_copy_of_the_package(
    package: dict[str, tuple[str, bool]], imports: list[Import]
) -> None:
    # The real package with one line added: the checks that pass above now fail.
    def edited(module: str, extra: str) -> list[Import]:
        src, is_pkg = package[module]
        changed = imports_of(module, src + extra, is_pkg, package)
        return [i for i in imports if i.source != module] + changed

    lazy = edited(
        "talkstream.engine.pipeline",
        "\n\ndef _sneaky():\n    from talkstream.export.backends import load_backend\n",
    )
    assert any("talkstream.export.backends (function)" in v for v in engine_violations(lazy))
    assert any("layer 3 imports layer 4" in v for v in layer_violations(lazy))
    # A module-level cycle: export.common importing the registry that imports it.
    cycle = edited("talkstream.export.common", "\nimport talkstream.export.backends\n")
    assert any("talkstream.export.common" in c for c in import_cycles(cycle))
