"""The package's shape: no import cycles, no oversized module without a stated reason, no new over-complex function.

Import graph. Every `.py` under `loraport/` is parsed with `ast` (nothing is imported or run) and every import
statement anywhere in it counts — module level, inside functions, under `if TYPE_CHECKING:`: `import a.b`,
`from a import b` (an edge to the submodule `a.b` when `b` is one, else to the package `a`), relative imports,
and `importlib.import_module("literal")` / `__import__("literal")`. What Python runs implicitly does not count:
importing `loraport.x.y` first runs `loraport/__init__.py` and `loraport/x/__init__.py`, but counting that would
make every package that discovers its plugins (formats/, commands/) a cycle by construction. So the package root
`loraport` is a module like any other: `import loraport` or `from loraport import merge` is an edge to it, and
since the root reaches the engines through the public API (loraport/api.py imports them on first use), a module
those engines reach must not import the root — they take `__version__` from `loraport/_version.py`. Only the
commands (which call the public API, as a user would) import the root.

Imports the walker cannot resolve (a computed `import_module(f"...")`) are listed in `DISCOVERY`: today the two
plugin discoveries; a new one must be added there on purpose, with the reason it cannot be a literal import.

Size. A module of more than `MAX_LINES` lines states why in its docstring: a line starting with "Size:".

Complexity. ruff's mccabe check (C901, max-complexity 15, configured in pyproject.toml) is not yet in the lint
selection because functions over the limit remain; `tests/c901_allowlist.txt` lists them. A new offender fails
here; a listed function that is no longer an offender fails too, so the list only shrinks. When it is empty, add
"C901" to `[tool.ruff.lint] select` and delete the list and its test.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loraport"
MAX_LINES = 400
ALLOWLIST = Path(__file__).with_name("c901_allowlist.txt")
# computed imports (module name built at run time) and why they cannot be literal: file -> reason
DISCOVERY = {
    "loraport/cli.py": "registers every module of loraport/commands/ (a command is a file)",
    "loraport/formats/__init__.py": "imports every module of loraport/formats/ (a format is a file)",
}


# ------------------------------------------------------------------------------------------------ the walker
@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str
    line: int


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package rooted at `package_dir`."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` names, or its nearest enclosing module of ours (`loraport.x.attr` -> `loraport.x`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dynamic_call(node: ast.Call) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__")


def _absolute(name: str, level: int, package: str) -> str:
    if not level:
        return name
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def module_imports(module: str, path: Path, modules: dict[str, Path], rel: str) -> tuple[list[Edge], list[int]]:
    """(edges from `module` to modules of ours, lines of computed imports that cannot be resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: list[Edge] = []
    unresolved: list[int] = []

    def add(target: str | None, line: int) -> None:
        if target is not None and target != module:
            edges.append(Edge(module, target, rel, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else _resolve(base, modules), node.lineno)
        elif isinstance(node, ast.Call) and _dynamic_call(node) and node.args:
            name = _literal(node.args[0])
            if name is None:
                unresolved.append(node.lineno)
                continue
            anchor = _literal(node.args[1]) if len(node.args) > 1 else None
            anchor = anchor or next((_literal(k.value) for k in node.keywords if k.arg == "package"), None)
            level = len(name) - len(name.lstrip("."))
            add(_resolve(_absolute(name.lstrip("."), level, anchor or package), modules), node.lineno)
    return edges, unresolved


@functools.lru_cache(maxsize=4)
def import_graph(package_dir: Path) -> tuple[list[Edge], dict[str, list[int]]]:
    modules = package_modules(package_dir)
    edges: list[Edge] = []
    unresolved: dict[str, list[int]] = {}
    for module, path in modules.items():
        rel = path.relative_to(package_dir.parent).as_posix()
        found, dynamic = module_imports(module, path, modules, rel)
        edges += found
        if dynamic:
            unresolved[rel] = dynamic
    return edges, unresolved


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted by first name."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(component: list[str], edges: list[Edge]) -> str:
    inside = set(component)
    lines = [f"cycle among {', '.join(component)}:"]
    lines += sorted({f"  {e.source} -> {e.target}  ({e.file}:{e.line})" for e in edges
                     if e.source in inside and e.target in inside})
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the package
def test_no_import_cycles():
    edges, _ = import_graph(PACKAGE)
    assert len(edges) > 100, "the walker found almost no imports: it is broken, not the package clean"
    found = cycles(edges)
    assert not found, "import cycles (move the shared piece to the module it belongs in):\n" + "\n".join(
        describe(c, edges) for c in found)


def test_computed_imports_are_the_known_discoveries():
    _, unresolved = import_graph(PACKAGE)
    assert set(unresolved) == set(DISCOVERY), (
        f"computed imports (import_module of a non-literal) at {unresolved}; the walker cannot follow them. "
        "Import a literal name, or add the file to DISCOVERY in this test with the reason.")


def test_engines_never_import_the_package_root():
    """The root re-exports the public API; anything the API reaches importing the root would be a cycle, and
    anything else doing so gains nothing (`__version__` lives in loraport/_version.py)."""
    edges, _ = import_graph(PACKAGE)
    offenders = sorted({f"{e.file}:{e.line}" for e in edges
                        if e.target == "loraport" and not e.source.startswith("loraport.commands.")})
    assert not offenders, f"import the submodule (loraport._version for __version__), not the package: {offenders}"


def test_the_merge_verb_chooses_its_engine_above_both(tmp_path):
    """The merge engine imports nothing of onnx/ (which builds on it): the choice of baking for an .onnx base is
    made by the merge verb, for the API and for batch jobs alike. Options baking cannot honour are refused
    before the (empty) base is read."""
    import loraport
    from loraport.batch import Job, run_jobs
    from loraport.errors import BadInputError

    base, ad = tmp_path / "model.onnx", tmp_path / "adapter"
    base.write_bytes(b"")
    ad.mkdir()
    with pytest.raises(BadInputError, match=r"^dtype do\(es\) not apply to baking into an .onnx base"):
        loraport.merge(base, ad, tmp_path / "out.onnx", dtype="fp16")
    [job] = run_jobs(str(base), [Job([(str(ad), 1.0)], str(tmp_path / "o.onnx"), "a")], shard_size=1 << 20)
    assert not job.ok and job.error.startswith("--shard-size do(es) not apply to baking"), job.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "model.onnx"]


# ------------------------------------------------------------------------------------------------ the walker's own test
def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def test_walker_finds_every_kind_of_import(tmp_path):
    """A made-up package whose cycles each close through one kind of import: the walker must find them all."""
    pkg = tmp_path / "pkg"
    _write(tmp_path, "pkg/__init__.py", "from pkg.api import run\n__version__ = '1'\n")
    _write(tmp_path, "pkg/api.py", "def run():\n    from . import engine\n    return engine\n")  # relative, late
    _write(tmp_path, "pkg/engine.py", "import pkg\n")  # the root, which re-exports api -> engine
    _write(tmp_path, "pkg/sub/__init__.py", "")
    _write(tmp_path, "pkg/sub/a.py", "from ..sub import b\n")
    _write(tmp_path, "pkg/sub/b.py", "import importlib\nM = importlib.import_module('pkg.sub.a')\n")
    _write(tmp_path, "pkg/sub/c.py", "import typing\nif typing.TYPE_CHECKING:\n    from pkg.sub.d import X\n")
    _write(tmp_path, "pkg/sub/d.py", "def f():\n    import pkg.sub.c.helper as h\n    return h\n")
    _write(tmp_path, "pkg/sub/e.py", "import importlib\ndef f(n):\n    return importlib.import_module(f'pkg.{n}')\n")
    _write(tmp_path, "pkg/leaf.py", "from pkg.sub import a\nimport os\n")  # an edge, but no cycle
    edges, unresolved = import_graph(pkg)
    assert cycles(edges) == [["pkg", "pkg.api", "pkg.engine"], ["pkg.sub.a", "pkg.sub.b"], ["pkg.sub.c", "pkg.sub.d"]]
    assert Edge("pkg.leaf", "pkg.sub.a", "pkg/leaf.py", 1) in edges
    assert unresolved == {"pkg/sub/e.py": [3]}
    assert "pkg.sub.d -> pkg.sub.c  (pkg/sub/d.py:2)" in describe(["pkg.sub.c", "pkg.sub.d"], edges)


# ------------------------------------------------------------------------------------------------ module size
def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def test_large_modules_state_why():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and not any(ln.startswith("Size:") for ln in _docstring(path).splitlines()):
            missing.append(f"{path.relative_to(ROOT).as_posix()} ({n} lines)")
    assert not missing, (f"modules over {MAX_LINES} lines without a 'Size:' line in their docstring saying why "
                         f"(or split them): {missing}")


# ------------------------------------------------------------------------------------------------ complexity
def _c901_offenders() -> dict[str, int]:
    """`path::function` -> complexity for each function of loraport/ over pyproject's max-complexity, as ruff
    counts it."""
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "json",
                          "--no-cache", "--exit-zero", "loraport"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = {}
    for d in json.loads(res.stdout):
        m = re.match(r"`(.+)` is too complex \((\d+) > \d+\)", d["message"])
        assert m, f"unexpected ruff message: {d['message']}"
        key = f"{Path(d['filename']).resolve().relative_to(ROOT).as_posix()}::{m.group(1)}"
        out[key] = max(out.get(key, 0), int(m.group(2)))
    return out


def _allowlist() -> dict[str, int]:
    out = {}
    for ln in ALLOWLIST.read_text(encoding="utf-8").splitlines():
        if ln.split("#")[0].strip():
            name, ceiling = ln.split("#")[0].split()
            out[name] = int(ceiling)
    return out


def test_pyproject_sets_max_complexity_15():
    import tomllib  # Python 3.11+, as tests/test_readme.py

    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]["lint"]
    assert ruff.get("mccabe", {}).get("max-complexity") == 15, "pyproject: [tool.ruff.lint.mccabe] max-complexity = 15"
    exempt = ruff.get("per-file-ignores", {})
    assert all("C901" in exempt.get(f"{d}/**", []) for d in ("tests", "bench")), "tests/, bench/ are exempt from C901"


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e .[dev])")
def test_no_new_complex_functions():
    offenders, allowed = _c901_offenders(), _allowlist()
    new = sorted(f"{k} ({v})" for k, v in offenders.items() if k not in allowed)
    grew = sorted(f"{k} ({v} > {allowed[k]})" for k, v in offenders.items() if k in allowed and v > allowed[k])
    fixed = sorted(set(allowed) - set(offenders))
    assert not new, (f"functions over max-complexity 15 (ruff check --select C901 loraport): {new}; split them "
                     "(tests/c901_allowlist.txt only shrinks)")
    assert not grew, f"functions on tests/c901_allowlist.txt grew more complex: {grew}; split them"
    assert not fixed, f"no longer over the limit, delete from tests/c901_allowlist.txt: {fixed}"
