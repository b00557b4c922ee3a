"""The package's one-way import order, checked on the source with :mod:`ast`.

Every ``import`` and ``from ... import`` of every module under ``src/lipbound`` counts: at module
top, inside functions, under ``TYPE_CHECKING``, relative or absolute. A module belongs to the
unit of the longest prefix in :data:`LAYERS`; a unit may import itself and the units of lower
layers only (``train`` only what :data:`ALLOWED_EXTRA` lists). The declared order, bottom first:

- ``base``: ``errors``, ``results``, ``_validation``, ``_progress``, ``_version``;
- ``spectral``: operator norms and their certificates, including the float-rounding helper
  :func:`lipbound.spectral.certify.round_up` that the rules use, so ``spectral`` sits BELOW
  ``rules`` (it needs nothing of graphs or rules; no separate ``_rounding`` module);
- ``graph.model``: the data model of a captured graph (``graph.types``: ``Node``/``OpGraph``;
  ``graph.modules``: module wrappers and calling helpers) that rules are functions of;
- ``rules``: the registry and the per-op rules;
- ``graph``: capture, simplify and the sequential chain, which consult the rules registry while
  tracing (leaf modules, rule keys, classification), so they sit ABOVE ``rules``;
- ``analysis``: :class:`lipbound.analysis.Analysis`, the model captured and simplified once,
  its per-node constants (``analysis.constants``: the one place rules are asked), the
  sequential segments and the dense chain (``analysis.chains``);
- ``methods``: the bounds; inside it the private helpers (``_pairs``, ``_schur``; then ``_segment``,
  SeqLip on one segment, shared by seqlip and lipsdp),
  then ``autolip`` (the composition others build on), then the other methods, which do not
  import each other;
- ``report`` (``bound``) beside ``train``; ``train`` uses only ``spectral``, ``graph.model``,
  ``rules``, ``graph``, ``analysis`` and ``base``: not the pair maths of ``methods._pairs``
  (it needs none);
- ``functional`` and ``zoo``, then the package ``__init__``, ``testing``, and ``cli`` (with its
  loader ``_io``) at the top.

Also refused: a private module (``a.b._c``) imported from outside its package ``a.b``; a private
name (``_x``), or a name missing from a module's ``__all__``, imported from outside the package
the module is part of; and any import cycle between modules (a package's ``__init__`` counts:
importing ``a.b`` runs it). ``from a import b`` of a submodule ``b`` is an edge to ``a.b``; an
import of ``a.b.c`` is an edge to ``a.b.c`` only (the parent ``__init__`` files it runs first
are not counted, so that a submodule can import its siblings).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lipbound"

# bottom first; a unit is named by its module prefixes (longest prefix wins)
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("lipbound.errors", "lipbound.results", "lipbound._validation",
              "lipbound._progress", "lipbound._version")),
    ("spectral", ("lipbound.spectral",)),
    ("graph.model", ("lipbound.graph.types", "lipbound.graph.modules")),
    ("rules", ("lipbound.rules",)),
    ("graph", ("lipbound.graph",)),
    ("local", ("lipbound.local",)),  # interval bounds / local rules (issue #18)
    ("analysis", ("lipbound.analysis",)),  # the graph analysed once: constants, chains
    ("methods", ("lipbound.methods",)),
    ("report", ("lipbound.report",)),
    ("train", ("lipbound.train",)),
    ("functional", ("lipbound.functional",)),
    ("zoo", ("lipbound.zoo",)),
    ("api", ("lipbound",)),  # the package __init__ (exact match only, see unit_of)
    ("testing", ("lipbound.testing",)),
    ("cli", ("lipbound.cli", "lipbound._io")),
)
# units whose imports are restricted to a list instead of "every lower layer"
ALLOWED_EXTRA: dict[str, frozenset[str]] = {
    "train": frozenset({"base", "spectral", "graph.model", "rules", "graph", "analysis"}),
    "report": frozenset({"base", "spectral", "graph.model", "rules", "graph", "analysis",
                         "methods"}),
}
# inside methods: rank of each module (a module may import strictly lower ranks only)
METHODS_RANK: dict[str, int] = {
    "lipbound.methods": 0,
    "lipbound.methods._pairs": 0,
    "lipbound.methods._schur": 0,
    "lipbound.methods._residual": 1,  # the residual-block LMI, built on _schur's certificate
    "lipbound.methods.autolip": 1,
    "lipbound.methods._segment": 1,  # SeqLip on one segment: seqlip and lipsdp share it
}
METHODS_TOP = 2  # every other module of lipbound.methods


@dataclass(frozen=True)
class Edge:
    importer: str  # module name ("lipbound.graph" for lipbound/graph/__init__.py)
    target: str  # imported module
    names: tuple[str, ...]  # names taken from it by "from target import ..." (() for "import")
    line: int


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def scan(root: Path = SRC) -> tuple[list[Edge], dict[str, tuple[str, ...] | None]]:
    """All import edges inside the package, and each module's ``__all__`` (None if absent)."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root)[0] for f in files}
    edges: list[Edge] = []
    exports: dict[str, tuple[str, ...] | None] = {}
    for f in files:
        mod, is_pkg = module_name(f, root)
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        exports[mod] = _dunder_all(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == PACKAGE:
                        edges.append(Edge(mod, a.name, (), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] != PACKAGE:
                    continue
                plain = []
                for a in node.names:  # "from pkg import submodule" is an edge to the submodule
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        edges.append(Edge(mod, sub, (), node.lineno))
                    else:
                        plain.append(a.name)
                if plain or not node.names:
                    edges.append(Edge(mod, target, tuple(plain), node.lineno))
    return edges, exports


def _dunder_all(tree: ast.Module) -> tuple[str, ...] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ) and isinstance(node.value, (ast.List, ast.Tuple)):
            names = [e.value for e in node.value.elts
                     if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if any(isinstance(e, ast.Starred) for e in node.value.elts):
                return None  # computed (e.g. *_LAZY): not checked
            return tuple(names)
    return None


def unit_of(module: str, layers: Sequence[tuple[str, Sequence[str]]] = LAYERS) -> str | None:
    best, best_len = None, -1
    for unit, prefixes in layers:
        for p in prefixes:
            if p == PACKAGE:
                if module == PACKAGE and best_len < len(p):
                    best, best_len = unit, len(p)
            elif (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = unit, len(p)
    return best


def _private_module_owner(module: str) -> str | None:
    """The package a private module belongs to (``a.b`` for ``a.b._c.d``), else None."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _package_of(module: str, packages: Iterable[str]) -> str:
    """The package ``module`` is part of: itself for a package, else its parent."""
    return module if module in packages else module.rpartition(".")[0]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def check(
    edges: Iterable[Edge],
    exports: Mapping[str, tuple[str, ...] | None] | None = None,
    *,
    layers: Sequence[tuple[str, Sequence[str]]] = LAYERS,
    allowed_extra: Mapping[str, frozenset[str]] = ALLOWED_EXTRA,
    packages: Iterable[str] = (),
) -> list[str]:
    """Every violation of the declared order in ``edges``, as readable lines (empty: clean)."""
    exports = exports or {}
    packages = set(packages)
    rank = {unit: i for i, (unit, _) in enumerate(layers)}
    edges = list(edges)
    out: list[str] = []
    graph: dict[str, set[str]] = {}
    for e in edges:
        where = f"{e.importer}:{e.line} imports {e.target}"
        ui, ut = unit_of(e.importer, layers), unit_of(e.target, layers)
        if ui is None or ut is None:
            out.append(f"{where}: module without a declared unit (add it to LAYERS)")
            continue
        if ui != ut:
            allowed = allowed_extra.get(ui)
            ok = ut in allowed if allowed is not None else rank[ut] < rank[ui]
            if not ok:
                out.append(f"{where}: back-edge {ui} -> {ut} (the order is "
                           f"{' -> '.join(u for u, _ in layers)})")
        elif ui == "methods":
            ri = METHODS_RANK.get(e.importer, METHODS_TOP)
            rt = METHODS_RANK.get(e.target, METHODS_TOP)
            if e.target != e.importer and not rt < ri and e.target != "lipbound.methods":
                out.append(f"{where}: a method module imports a sibling of the same rank "
                           "(move the shared piece down to a private helper module)")
        owner = _private_module_owner(e.target)
        if owner is not None and not _inside(e.importer, owner):
            out.append(f"{where}: private module of {owner} used from outside it")
        if not _inside(e.importer, _package_of(e.target, packages)):
            pub = exports.get(e.target)
            for n in e.names:
                if n.startswith("_") and not n.startswith("__"):
                    out.append(f"{where}: private name {n} taken from another unit")
                elif pub is not None and n not in pub and n != "*":
                    out.append(f"{where}: {n} is not in {e.target}.__all__ "
                               "(make it public there or do not use it)")
        graph.setdefault(e.importer, set()).add(e.target)
    out.extend(_cycles(graph))
    return out


def _cycles(graph: Mapping[str, set[str]]) -> list[str]:
    """One line per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[str] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append("import cycle: " + " <-> ".join(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@functools.lru_cache(maxsize=1)
def _real() -> tuple[list[Edge], dict[str, tuple[str, ...] | None], set[str]]:
    edges, exports = scan()
    packages = {module_name(f, SRC)[0] for f in (SRC / PACKAGE).rglob("__init__.py")}
    return edges, exports, packages


# ---- the real tree ------------------------------------------------------------------------
def test_every_module_has_a_unit() -> None:
    mods = [module_name(f, SRC)[0] for f in (SRC / PACKAGE).rglob("*.py")]
    assert len(mods) > 30  # the scan sees the package
    assert [m for m in mods if unit_of(m) is None] == []


def test_scan_sees_function_level_and_relative_imports() -> None:
    edges, _, _ = _real()
    # the report imports the methods it runs (absolute or relative, anywhere in the file)
    assert any(e.importer == "lipbound.report" and e.target.startswith("lipbound.methods")
               for e in edges)
    assert len(edges) > 150


def test_package_follows_the_declared_order() -> None:
    edges, exports, packages = _real()
    assert check(edges, exports, packages=packages) == []


# ---- the checker fails on what it must refuse ---------------------------------------------
def _edge(a: str, b: str, *names: str) -> Edge:
    return Edge(a, b, tuple(names), 1)


def test_checker_refuses_a_back_edge() -> None:
    edges, exports, packages = _real()
    bad = [*edges, _edge("lipbound.graph.capture", "lipbound.methods.autolip", "autolip")]
    out = check(bad, exports, packages=packages)
    assert "back-edge graph -> methods" in out[0]
    # and it closes a cycle through autolip's own imports of graph
    assert out[1:] and all(x.startswith("import cycle: ") and "lipbound.methods.autolip" in x
                           for x in out[1:])
    out = check([_edge("lipbound.spectral.power", "lipbound.rules", "classify")])
    assert out and "back-edge spectral -> rules" in out[0]


@pytest.mark.parametrize("a, b, needle", [
    ("lipbound.train.penalty", "lipbound.methods._pairs", "back-edge train -> methods"),
    ("lipbound.rules.linear", "lipbound.graph.capture", "back-edge rules -> graph"),
    ("lipbound.methods.sdp", "lipbound.methods.exact", "sibling"),
    ("lipbound.functional", "lipbound.methods._pairs", "private module"),
    ("lipbound.errors", "lipbound.cli", "back-edge base -> cli"),
])
def test_checker_refuses_known_bad_edges(a: str, b: str, needle: str) -> None:
    assert any(needle in line for line in check([_edge(a, b)]))


def test_checker_refuses_private_and_unexported_names() -> None:
    exports = {"lipbound.methods.lower": ("lower_bound",)}
    out = check([_edge("lipbound.report", "lipbound.methods.lower", "_probe", "probe")], exports)
    assert any("private name _probe" in x for x in out)
    assert any("probe is not in lipbound.methods.lower.__all__" in x for x in out)
    assert check([_edge("lipbound.report", "lipbound.methods.lower", "lower_bound")],
                 exports) == []


def test_checker_refuses_a_cycle_and_an_undeclared_module() -> None:
    out = check([_edge("lipbound.rules.a", "lipbound.rules.b"),
                 _edge("lipbound.rules.b", "lipbound.rules.a")])
    assert out == ["import cycle: lipbound.rules.a <-> lipbound.rules.b"]
    assert check([_edge("lipbound.rules", "lipbound.rules.a")], packages={"lipbound.rules"}) == []
    # the cycle main had: capture -> rules (its __init__) -> rules.linear -> capture
    out = check([_edge("lipbound.graph.capture", "lipbound.rules", "get_rule"),
                 _edge("lipbound.rules", "lipbound.rules.linear"),
                 _edge("lipbound.rules.linear", "lipbound.graph.capture", "call_module_as")],
                packages={"lipbound.rules"})
    cycle = "lipbound.graph.capture <-> lipbound.rules <-> lipbound.rules.linear"
    assert f"import cycle: {cycle}" in out
    assert "without a declared unit" in check([_edge("lipbound.rules", "lipbound.newthing")])[0]


def test_scan_parses_relative_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "graph").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "graph" / "__init__.py").write_text("")
    (pkg / "graph" / "capture.py").write_text(
        "def f():\n    from ..methods import autolip\n    from .. import errors\n"
    )
    (pkg / "methods").mkdir()
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "methods" / "autolip.py").write_text("")
    edges, _ = scan(tmp_path)
    targets = {(e.importer, e.target) for e in edges}
    assert ("lipbound.graph.capture", "lipbound.methods.autolip") in targets
    assert ("lipbound.graph.capture", "lipbound.errors") in targets
    assert any("back-edge graph -> methods" in x for x in check(edges))


# ---- no guards around the package's own modules -------------------------------------------
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    t = handler.type
    names = t.elts if isinstance(t, ast.Tuple) else [t] if t is not None else []
    return t is None or any(isinstance(n, ast.Name) and n.id in _IMPORT_ERRORS for n in names)


def _imports_package(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").split(".")[0]
                                                == PACKAGE):
            return True
        if isinstance(sub, ast.Import) and any(a.name.split(".")[0] == PACKAGE
                                               for a in sub.names):
            return True
        if isinstance(sub, ast.Call) and sub.args and isinstance(sub.args[0], ast.Constant) \
                and isinstance(sub.args[0].value, str) \
                and sub.args[0].value.split(".")[0] == PACKAGE:
            fn = sub.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "importorskip", "find_spec"):
                return True
    return False


def guarded_imports(source: str, filename: str = "<src>") -> list[str]:
    """``try: <import of lipbound...> except ImportError`` blocks, and ``importorskip`` /
    ``find_spec`` / ``import_module`` calls on a module of the package, as ``file:line``."""
    tree = ast.parse(source, filename=filename)
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            if any(_imports_package(stmt) for stmt in node.body):
                out.append(f"{filename}:{node.lineno}: import of the package under "
                           "except ImportError")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("importorskip", "find_spec") and _imports_package(node):
                out.append(f"{filename}:{node.lineno}: {name} of a module of the package")
    return out


def test_no_guards_around_the_package_own_modules() -> None:
    root = SRC.parent
    found = []
    for f in sorted([*(SRC / PACKAGE).rglob("*.py"), *(root / "tests").glob("*.py"),
                     *(root / "benchmarks").glob("*.py")]):
        found += guarded_imports(f.read_text(encoding="utf-8"), str(f.relative_to(root)))
    assert found == []


def test_guard_finder_finds_guards() -> None:
    src = ("try:\n    from .spectral import x\nexcept ImportError:\n    x = None\n"
           "try:\n    import cvxpy\nexcept ImportError:\n    cvxpy = None\n"
           "m = pytest.importorskip('lipbound.methods.autolip')\n"
           "ok = pytest.importorskip('cvxpy')\n"
           "h = importlib.util.find_spec('lipbound.graph') is not None\n")
    out = guarded_imports(src, "m.py")
    assert [x.split(":")[1] for x in out] == ["1", "9", "11"], out
