"""The package's shape, checked from its source: layering, sizes, cycles, unique names.

The data flow runs one way (DESIGN.md, STYLE.md)::

    ir/csrc_build -> config -> primitives -> capture -> planner -> rewrite -> runtime
        -> api/plot -> cli -> __init__

An import of a later unit is a violation. ``whale/ir`` is a leaf of frozen objects that imports
nothing else of whale, ``config.py`` imports only ``ir``, ``csrc_build.py`` nothing of whale; only
``api.py`` and ``cli.py`` wire the stages together; ``whale/plot`` draws their frozen results
(plans, reports, timelines) beside ``api.py``. The runtime executes a program built by
rewrite: it never captures, plans, runs a rewrite pass or makes a schedule. Every import counts,
wherever it sits in a file (module level, inside a function, under ``TYPE_CHECKING``), relative
or absolute. Besides: no module over 600 lines, no folder over 12 modules, no import cycle between
files, no two modules with one file name, no two public classes with one name.

Each checker takes the package folder and returns one message per violation, naming the file,
the line, the import and the rule; ``test_checkers_catch_*`` feed them a synthetic package with
one violation of each kind, so a checker that silently passes everything fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent / "whale"

# Position in the data flow; a unit may import units of its own rank or lower.
RANK = {
    "ir": 0,
    "csrc_build": 0,
    "config": 1,
    "primitives": 2,
    "capture": 3,
    "planner": 4,
    "rewrite": 5,
    "runtime": 6,
    "api": 7,
    "plot": 7,
    "cli": 8,
    "__init__": 9,
}
FLOW = " -> ".join(
    "/".join(u for u in RANK if RANK[u] == r) for r in sorted(set(RANK.values()))
)
RUNTIME_MAY_IMPORT = frozenset({"ir", "config", "csrc_build", "rewrite", "runtime"})
# The rewrite passes and the schedule generator: the runtime gets their results, never runs them.
REWRITE_PASSES = frozenset(
    {
        "shard_model",
        "TensorParallelRewrite",
        "TensorParallelAnalysis",
        "split_stages",
        "assign_stages",
        "capture_split_stages",
        "make_schedule",
    }
)
MAX_MODULE_LINES = 600
MAX_MODULES_PER_FOLDER = 12


@dataclasses.dataclass(frozen=True)
class Module:
    """One ``.py`` file of the package."""

    path: Path
    name: str  # dotted; a package's __init__.py carries the package's name
    is_package: bool
    tree: ast.Module
    num_lines: int

    @property
    def unit(self) -> str:
        """The part of the data flow it belongs to: its top folder, or its own name at top level."""
        parts = self.name.split(".")
        if len(parts) == 1:
            return "__init__"
        return parts[1]

    @property
    def shown(self) -> str:
        """The path as messages print it, e.g. ``whale/ir/plan.py``."""
        return self.path.as_posix()


@dataclasses.dataclass(frozen=True)
class Import:
    """One import of a module of the package, resolved to the file it loads."""

    source: Module
    line: int
    statement: str
    target: Module
    names: tuple[str, ...]  # the names a `from x import a, b` binds; empty for `import x`

    def where(self) -> str:
        """``file:line `statement` -> target file``, the start of every import message."""
        return f"{self.source.shown}:{self.line} `{self.statement}` -> {self.target.shown}"


@functools.lru_cache(maxsize=None)
def scan(root: Path) -> dict[str, Module]:
    """Every module under ``root`` (a package folder), parsed once, keyed by dotted name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        parts = list(rel.with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        text = path.read_text()
        modules[".".join(parts)] = Module(
            path=rel,
            name=".".join(parts),
            is_package=is_package,
            tree=ast.parse(text, filename=str(rel)),
            num_lines=len(text.splitlines()),
        )
    return modules


def absolute_name(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module a ``from`` import names, resolving ``level`` leading dots.

    One dot is the importing module's package (the module itself for an ``__init__.py``), each
    further dot one package up: ``from ...ir.plan import Plan`` in ``whale.planner.search.auto``
    names ``whale.ir.plan``.
    """
    if level == 0:
        return target or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        raise ValueError(f"{module}: relative import with {level} dots goes above the top package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _file_of(modules: dict[str, Module], dotted: str) -> Module | None:
    """The module ``dotted`` loads: itself if it is a file or package, else its nearest parent."""
    parts = dotted.split(".")
    while parts:
        found = modules.get(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    return None


@functools.lru_cache(maxsize=None)
def imports(root: Path) -> tuple[Import, ...]:
    """Every import of the package's own modules, anywhere in every file under ``root``.

    ``import a.b`` resolves to ``a/b.py`` or ``a/b/__init__.py``; ``from pkg import name`` to
    ``pkg/name.py`` when that file exists, else to ``pkg/__init__.py``. A constant
    ``importlib.import_module("whale.x")`` counts as ``import whale.x``.
    """
    modules = scan(root)
    top = root.name
    found = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            targets: list[tuple[str, tuple[str, ...]]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = absolute_name(module.name, module.is_package, node.level, node.module)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append((submodule if submodule in modules else base, (alias.name,)))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [(node.args[0].value, ())]
            for dotted, names in targets:
                if dotted.split(".")[0] != top:
                    continue
                target = _file_of(modules, dotted)
                if target is not None:
                    found.append(Import(module, node.lineno, ast.unparse(node), target, names))
    # One statement importing several names from one file reads as one import.
    merged: dict[tuple, Import] = {}
    for imp in found:
        key = (imp.source.name, imp.line, imp.statement, imp.target.name)
        if key in merged:
            imp = dataclasses.replace(imp, names=merged[key].names + imp.names)
        merged[key] = imp
    return tuple(merged.values())


# Import rules: each returns the violation's message for one import, or None.


def order_rule(imp: Import) -> str | None:
    """No unit imports a unit later in the data flow."""
    src, dst = imp.source.unit, imp.target.unit
    for unit, module in ((src, imp.source), (dst, imp.target)):
        if unit not in RANK:
            return f"{module.shown}: unit {unit!r} has no place in the data flow; add it to RANK"
    if RANK[dst] > RANK[src]:
        return (
            f"{imp.where()}: {src} imports {dst}, a later stage of the data flow ({FLOW})"
        )
    return None


def ir_leaf_rule(imp: Import) -> str | None:
    """``whale/ir`` imports nothing else of whale: every stage imports it."""
    if imp.source.unit == "ir" and imp.target.unit != "ir":
        return f"{imp.where()}: whale/ir is a leaf and imports nothing else of whale"
    return None


def config_rule(imp: Import) -> str | None:
    """``config.py`` imports only ``whale/ir``."""
    if imp.source.unit == "config" and imp.target.unit not in ("ir", "config"):
        return f"{imp.where()}: config.py may import only whale.ir"
    return None


def csrc_build_rule(imp: Import) -> str | None:
    """``csrc_build.py`` imports nothing of whale."""
    if imp.source.unit == "csrc_build" and imp.target.unit != "csrc_build":
        return f"{imp.where()}: csrc_build.py imports nothing of whale"
    return None


def runtime_stage_rule(imp: Import) -> str | None:
    """The runtime imports only ir, config, csrc_build and rewrite: it never captures or plans."""
    if imp.source.unit == "runtime" and imp.target.unit not in RUNTIME_MAY_IMPORT:
        return (
            f"{imp.where()}: whale/runtime may import only {', '.join(sorted(RUNTIME_MAY_IMPORT))}"
            " (the runtime executes a built program; it never captures or plans)"
        )
    return None


def runtime_pass_rule(imp: Import) -> str | None:
    """The runtime imports no rewrite pass nor the schedule generator, only their results."""
    if imp.source.unit == "runtime":
        passes = sorted(REWRITE_PASSES.intersection(imp.names))
        if passes:
            return (
                f"{imp.where()}: whale/runtime imports {', '.join(passes)}; the runtime executes "
                "the program rewrite built and never runs a rewrite pass or makes a schedule"
            )
    return None


def import_violations(root: Path, rule: Callable[[Import], str | None]) -> list[str]:
    """The messages of every import under ``root`` that breaks ``rule``."""
    return sorted({m for m in map(rule, imports(root)) if m is not None})


def runtime_pass_uses(root: Path) -> list[str]:
    """Runtime code reaching a rewrite pass through its module: ``stage_split.split_stages``."""
    found = []
    for module in scan(root).values():
        if module.unit != "runtime":
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Attribute) and node.attr in REWRITE_PASSES:
                found.append(
                    f"{module.shown}:{node.lineno} `{ast.unparse(node)}`: whale/runtime uses the "
                    f"rewrite pass {node.attr}; it executes the built program instead"
                )
    return found


def long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """Modules over ``limit`` lines: past that a file usually holds two ideas (STYLE.md)."""
    return [
        f"{m.shown}: {m.num_lines} lines > {limit}; split it by idea"
        for m in scan(root).values()
        if m.num_lines > limit
    ]


def crowded_folders(root: Path, limit: int = MAX_MODULES_PER_FOLDER) -> list[str]:
    """Folders holding more than ``limit`` modules (``.py`` files other than ``__init__.py``)."""
    count: dict[Path, int] = defaultdict(int)
    for m in scan(root).values():
        if not m.is_package:
            count[m.path.parent] += 1
    return [
        f"{folder.as_posix()}/: {n} modules > {limit}; group them into subpackages"
        for folder, n in sorted(count.items())
        if n > limit
    ]


def import_cycles(root: Path) -> list[str]:
    """Every cycle of the file-level import graph: ``a.py:3 -> b.py:7 -> a.py``.

    Each file in a cycle carries the line where it imports the next one.
    """
    graph = nx.DiGraph()
    for imp in imports(root):
        if imp.source is not imp.target:
            graph.add_edge(imp.source.shown, imp.target.shown, line=imp.line)
    messages = []
    for cycle in nx.simple_cycles(graph):
        first = cycle.index(min(cycle))  # start each cycle at its first file, so reports are stable
        cycle = cycle[first:] + cycle[:first]
        hops = [
            f"{a}:{graph.edges[a, b]['line']}" for a, b in zip(cycle, cycle[1:] + cycle[:1])
        ]
        messages.append("import cycle: " + " -> ".join(hops + [cycle[0]]))
    return sorted(messages)


def duplicate_module_names(root: Path) -> list[str]:
    """File names (other than ``__init__.py``) used by more than one module."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for m in scan(root).values():
        if not m.is_package:
            by_name[m.path.name].append(m.shown)
    return [
        f"module name {name} is used by {', '.join(paths)}; name each by what it holds"
        for name, paths in sorted(by_name.items())
        if len(paths) > 1
    ]


def duplicate_class_names(root: Path) -> list[str]:
    """Public top-level class names defined in more than one module."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for m in scan(root).values():
        for node in m.tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                by_name[node.name].append(f"{m.shown}:{node.lineno}")
    return [
        f"class {name} is defined in {', '.join(places)}; distinct concepts need distinct names"
        for name, places in sorted(by_name.items())
        if len(places) > 1
    ]


def _report(messages: list[str]) -> str:
    return f"{len(messages)} violation(s):\n" + "\n".join(messages)


# The package as it is.


@pytest.mark.parametrize(
    "rule",
    [
        order_rule,
        ir_leaf_rule,
        config_rule,
        csrc_build_rule,
        runtime_stage_rule,
        runtime_pass_rule,
    ],
    ids=lambda rule: rule.__name__,
)
def test_imports_follow_the_data_flow(rule):
    violations = import_violations(ROOT, rule)
    assert not violations, f"{rule.__doc__}\n{_report(violations)}"


def test_runtime_reaches_no_rewrite_pass():
    violations = runtime_pass_uses(ROOT)
    assert not violations, _report(violations)


@pytest.mark.parametrize(
    "checker",
    [long_modules, crowded_folders, import_cycles, duplicate_module_names, duplicate_class_names],
    ids=lambda checker: checker.__name__,
)
def test_package_shape(checker):
    violations = checker(ROOT)
    assert not violations, f"{checker.__doc__}\n{_report(violations)}"


def test_every_unit_is_placed():
    units = {m.unit for m in scan(ROOT).values()}
    assert units <= set(RANK), f"units with no place in RANK: {sorted(units - set(RANK))}"


# The checkers themselves, on a synthetic package with one violation of each kind.

SYNTHETIC = {
    "__init__.py": "from .api import run\n",
    "api.py": "from .runtime.loop import run\n",
    "cli.py": "from .api import run\n",
    "config.py": "from .ir.plan import Plan\nfrom .primitives import enter\n",
    "csrc_build.py": "import whale.ir\n",
    "ir/__init__.py": "",
    "ir/plan.py": "class Plan: ...\nclass _Private: ...\n"
    "def late():\n    from ..runtime.worker import go\n",
    "primitives/__init__.py": "from .scope import enter\n",
    "primitives/scope.py": "def enter():\n    import whale.capture.a\n"
    "class _Private: ...\nimport importlib\nimportlib.import_module('whale.planner.util')\n",
    "capture/__init__.py": "",
    "capture/a.py": "from . import b\n",
    "capture/b.py": "from .a import x\nfrom ..ir import plan\n",
    "capture/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
    "planner/__init__.py": "",
    "planner/util.py": "",
    "planner/search/__init__.py": "",
    "planner/search/auto.py": "from ...ir.plan import Plan\nclass Plan: ...\n",
    "rewrite/__init__.py": "",
    "rewrite/util.py": "",
    "rewrite/passes.py": "def shard_model(): ...\ndef split_stages(): ...\n",
    **{f"rewrite/m{i}.py": "" for i in range(MAX_MODULES_PER_FOLDER - 1)},
    "runtime/__init__.py": "",
    "runtime/worker.py": "def go(): ...\n",
    "runtime/loop.py": "from ..config import Config\nfrom ..capture import a\n"
    "from ..rewrite.passes import shard_model, split_stages\n"
    "from ..rewrite import passes\n"
    "def run():\n    return passes.split_stages()\n",
}


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """A small package named ``whale`` holding exactly the violations the tests below expect."""
    root = tmp_path / "whale"
    for rel, text in SYNTHETIC.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _only(messages: list[str], *expected: str) -> None:
    """Each expected fragment appears in exactly one message, and no message is unexpected."""
    for fragment in expected:
        hits = [m for m in messages if fragment in m]
        assert len(hits) == 1, f"{fragment!r} in {len(hits)} of:\n" + "\n".join(messages)
    assert len(messages) == len(expected), "\n".join(messages)


def test_relative_imports_resolve_against_the_package():
    assert absolute_name("whale.planner.search.auto", False, 3, "ir.plan") == "whale.ir.plan"
    assert absolute_name("whale.planner.search.auto", False, 1, None) == "whale.planner.search"
    assert absolute_name("whale.planner.search", True, 1, "auto") == "whale.planner.search.auto"
    assert absolute_name("whale.planner.search", True, 2, "cost") == "whale.planner.cost"
    assert absolute_name("whale.api", False, 1, "ir") == "whale.ir"
    with pytest.raises(ValueError, match="above the top package"):
        absolute_name("whale.api", False, 2, "x")


def test_checkers_resolve_imports_to_files(synthetic):
    edges = {(i.source.shown, i.line, i.target.shown) for i in imports(synthetic)}
    # `from ...ir.plan import Plan` three levels down, a class from a file
    assert ("whale/planner/search/auto.py", 1, "whale/ir/plan.py") in edges
    # `from . import b`: a module of the package; `from ..ir import plan`: likewise
    assert ("whale/capture/a.py", 1, "whale/capture/b.py") in edges
    assert ("whale/capture/b.py", 2, "whale/ir/plan.py") in edges
    # `from .scope import enter` in an __init__.py; `from ..capture import a` imports a module
    assert ("whale/primitives/__init__.py", 1, "whale/primitives/scope.py") in edges
    assert ("whale/runtime/loop.py", 2, "whale/capture/a.py") in edges
    # a name that is not a file resolves to the package's __init__.py
    assert ("whale/config.py", 2, "whale/primitives/__init__.py") in edges


def test_checkers_catch_imports_against_the_data_flow(synthetic):
    messages = import_violations(synthetic, order_rule)
    _only(
        messages,
        "whale/ir/plan.py:4 `from ..runtime.worker import go` -> whale/runtime/worker.py: "
        "ir imports runtime",
        "whale/primitives/scope.py:2 `import whale.capture.a` -> whale/capture/a.py: "
        "primitives imports capture",
        "whale/primitives/scope.py:5 `importlib.import_module('whale.planner.util')` -> "
        "whale/planner/util.py: primitives imports planner",
        "whale/config.py:2 `from .primitives import enter` -> whale/primitives/__init__.py: "
        "config imports primitives",
    )
    ir_leaf = import_violations(synthetic, ir_leaf_rule)
    _only(ir_leaf, "whale/ir/plan.py:4 `from ..runtime.worker import go`")
    config = import_violations(synthetic, config_rule)
    _only(config, "whale/config.py:2 `from .primitives import enter`")
    _only(import_violations(synthetic, csrc_build_rule), "whale/csrc_build.py:1 `import whale.ir`")
    _only(
        import_violations(synthetic, runtime_stage_rule),
        "whale/runtime/loop.py:2 `from ..capture import a` -> whale/capture/a.py: "
        "whale/runtime may import only",
    )
    _only(
        import_violations(synthetic, runtime_pass_rule),
        "whale/runtime/loop.py:3 `from ..rewrite.passes import shard_model, split_stages` -> "
        "whale/rewrite/passes.py: whale/runtime imports shard_model, split_stages",
    )
    _only(runtime_pass_uses(synthetic), "whale/runtime/loop.py:6 `passes.split_stages`")


def test_checkers_catch_size_cycles_and_duplicates(synthetic):
    _only(long_modules(synthetic), f"whale/capture/big.py: {MAX_MODULE_LINES + 1} lines")
    _only(crowded_folders(synthetic), f"whale/rewrite/: {MAX_MODULES_PER_FOLDER + 1} modules")
    _only(
        import_cycles(synthetic),
        "import cycle: whale/capture/a.py:1 -> whale/capture/b.py:1 -> whale/capture/a.py",
    )
    _only(
        duplicate_module_names(synthetic),
        "module name util.py is used by whale/planner/util.py, whale/rewrite/util.py",
    )
    _only(
        duplicate_class_names(synthetic),
        "class Plan is defined in whale/ir/plan.py:1, whale/planner/search/auto.py:2",
    )
