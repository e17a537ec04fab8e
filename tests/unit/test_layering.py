"""The package's import rules, checked statically (``ast``; no module is imported):

(a) no import cycle between the project's modules (top-level and function-level imports alike);
(b) imports point down the layer order (docs/design.md, "Layers and owners"); packages of one layer
    do not import each other;
(c) a function-level import is either of an optional dependency (``# optional: <why>``) or defers
    something the module does not load anyway (``# deferred: <why>``: torch, megatron-core or
    transformers, directly or through a project module, that the importing module's top-level
    imports do not already load); the reason comment sits on the import's line or right above its
    group of imports.

A second test runs the same checker on a small synthetic package with one violation of each kind.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. A unit is a top-level module or sub-package of the package.
LAYERS: list[set[str]] = [
    {"__init__", "fsutil", "gpu_rules", "objectives", "architectures"},  # pure helpers, the objective registry, the family table
    {"config"},  # typed config + validate()
    {"runtime"},  # process groups, capabilities, CPU compat, signals
    {"models", "data", "loss", "checkpoint"},
    {"convert"},  # HF <-> Megatron (checkpoint + models)
    {"reference", "evaluation", "generation"},
    {"training"},
    {"testing"},  # test support: may build anything below
    {"checks", "launch"},  # what tools/ run
]
# Edges between units of one layer or upwards that are known and scheduled to go; keep empty.
ALLOWED_EXCEPTIONS: set[tuple[str, str]] = set()
OPTIONAL_ROOTS = {
    "transformer_engine", "flash_attn", "flash_attn_interface", "fused_weight_gradient_mlp_cuda", "apex", "vllm", "wandb",
    "matplotlib", "pyarrow", "openai",
}
HEAVY_ROOTS = {"torch", "megatron", "transformers"}
REASON = re.compile(r"#.*\b(optional|deferred):\s*\S")


@dataclass
class Imp:
    module: str  # importing module
    target: str  # absolute dotted name as written (resolved for relative imports)
    names: tuple[str, ...]
    line: int
    in_function: bool
    reason: bool


@dataclass
class Graph:
    files: dict[str, Path]
    imports: list[Imp] = field(default_factory=list)


def _modname(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _has_reason(lines: list[str], node: ast.stmt, siblings: list[ast.stmt]) -> bool:
    if REASON.search(lines[node.lineno - 1]):
        return True
    # the comment above the first import of this run of consecutive import statements
    i = siblings.index(node)
    while i > 0 and isinstance(siblings[i - 1], (ast.Import, ast.ImportFrom)):
        if REASON.search(lines[siblings[i - 1].lineno - 1]):
            return True
        i -= 1
    first = siblings[i]
    return first.lineno >= 2 and bool(REASON.search(lines[first.lineno - 2]))


def parse_package(base: Path, package: str, extra_files: dict[str, Path] | None = None) -> Graph:
    files = {_modname(p, base): p for p in sorted((base / package).rglob("*.py"))}
    g = Graph(files=dict(files))
    for mod, path in {**files, **(extra_files or {})}.items():
        text = path.read_text()
        lines = text.splitlines()
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool) -> None:
            body = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    visit(child, True)
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # annotations only
                elif isinstance(child, (ast.Import, ast.ImportFrom)):
                    reason = in_function and _has_reason(lines, child, body)
                    if isinstance(child, ast.Import):
                        for a in child.names:
                            g.imports.append(Imp(mod, a.name, (), child.lineno, in_function, reason))
                    else:
                        target = child.module or ""
                        if child.level:
                            parent = mod.split(".") if is_pkg else mod.split(".")[:-1]
                            parent = parent[: len(parent) - (child.level - 1)]
                            target = ".".join(parent + ([child.module] if child.module else []))
                        names = tuple(a.name for a in child.names)
                        g.imports.append(Imp(mod, target, names, child.lineno, in_function, reason))
                else:
                    visit(child, in_function)

        visit(ast.parse(text, str(path)), False)
    return g


def _project_targets(g: Graph, imp: Imp) -> list[str]:
    """The project modules an import names: the module itself (nearest existing one) and the
    submodules imported by name (``from pkg import submodule``: only those)."""
    subs = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in g.files]
    if imp.names and len(subs) == len(imp.names):
        return subs  # only submodules: the package's __init__ is not what is asked for
    t = imp.target
    while t and t not in g.files and "." in t:
        t = t.rsplit(".", 1)[0]
    return ([t] if t in g.files else []) + subs


def _unit(mod: str, package: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _heavy_closure(g: Graph, package: str) -> dict[str, set[str]]:
    """Heavy roots each module loads through its top-level imports (parent packages included)."""
    direct: dict[str, set[str]] = {m: set() for m in g.files}
    deps: dict[str, set[str]] = {m: set() for m in g.files}
    for imp in g.imports:
        if imp.in_function or imp.module not in g.files:
            continue
        root = imp.target.split(".")[0]
        if root in HEAVY_ROOTS:
            direct[imp.module].add(root)
        for t in _project_targets(g, imp):
            parts = t.split(".")
            deps[imp.module].update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                                    if ".".join(parts[:i]) in g.files)
    memo: dict[str, set[str]] = {}

    def closure(m: str, stack: frozenset) -> set[str]:
        if m in memo:
            return memo[m]
        out = set(direct[m])
        for d in deps[m] - stack - {m}:
            out |= closure(d, stack | {m})
        memo[m] = out
        return out

    return {m: closure(m, frozenset()) for m in g.files}


def check(base: Path, package: str, layers: list[set[str]], allowed: set[tuple[str, str]],
          extra_files: dict[str, Path] | None = None) -> list[str]:
    g = parse_package(base, package, extra_files)
    layer_of = {u: i for i, units in enumerate(layers) for u in units}
    heavy = _heavy_closure(g, package)
    problems: list[str] = []

    def where(imp: Imp) -> str:
        path = g.files.get(imp.module) or (extra_files or {})[imp.module]
        return f"{path.relative_to(base)}:{imp.line}"

    # (b) layers, and the edges for (a)
    edges: dict[str, dict[str, Imp]] = {m: {} for m in g.files}
    for imp in g.imports:
        if imp.module not in g.files:
            continue
        for t in _project_targets(g, imp):
            if t == imp.module:
                continue
            edges[imp.module].setdefault(t, imp)
            a, b = _unit(imp.module, package), _unit(t, package)
            if a == b:
                continue
            if a not in layer_of or b not in layer_of:
                problems.append(f"{where(imp)}: {a!r} or {b!r} has no layer; add it to LAYERS")
            elif layer_of[b] >= layer_of[a] and (a, b) not in allowed:
                kind = "the same layer" if layer_of[b] == layer_of[a] else "a higher layer"
                problems.append(f"{where(imp)}: {imp.module} imports {t} from {kind} ({a} -> {b})")

    # (a) cycles (depth-first search; each cycle reported once, by its smallest rotation)
    seen_cycles: set[tuple[str, ...]] = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cyc = stack[stack.index(t):]
                k = cyc.index(min(cyc))
                key = tuple(cyc[k:] + cyc[:k])
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    imp = edges[m][t]
                    problems.append(f"{where(imp)}: import cycle {' -> '.join(key + (key[0],))}")
            elif state.get(t) is None:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g.files):
        if m not in state:
            dfs(m)

    # (c) function-level imports
    for imp in g.imports:
        if not imp.in_function:
            continue
        root = imp.target.split(".")[0]
        if root in OPTIONAL_ROOTS:
            ok = True
        else:
            if root in HEAVY_ROOTS:
                brings = {root}
            else:
                brings = set()
                for t in _project_targets(g, imp):
                    brings |= heavy.get(t, set())
            mine = heavy.get(imp.module)
            if mine is None:  # a script outside the package: what its top level loads
                mine = set()
                for other in g.imports:
                    if other.module == imp.module and not other.in_function:
                        r = other.target.split(".")[0]
                        mine |= {r} if r in HEAVY_ROOTS else set().union(
                            *(heavy.get(t, set()) for t in _project_targets(g, other)))
            ok = bool(brings - mine)
            if not ok:
                problems.append(f"{where(imp)}: function-level import of {imp.target} defers nothing "
                                f"(it loads {sorted(brings) or 'no heavy module'}, the module loads "
                                f"{sorted(mine) or 'none'} at the top); move it to the top of the file")
                continue
        if not imp.reason:
            problems.append(f"{where(imp)}: function-level import of {imp.target} needs a one-line reason "
                            "('# optional: ...' or '# deferred: ...') on its line or above its group")
    return problems


def _scripts() -> dict[str, Path]:
    out = {f"tools.{p.stem}": p for p in sorted((ROOT / "tools").glob("*.py"))}
    out["pretrain_longpo"] = ROOT / "pretrain_longpo.py"
    return out


def test_package_layers_cycles_and_function_level_imports():
    problems = check(ROOT, "megatron_longpo", LAYERS, ALLOWED_EXCEPTIONS, _scripts())
    assert not problems, "\n".join(problems)


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in (ROOT / "megatron_longpo").iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert units <= set().union(*LAYERS), sorted(units - set().union(*LAYERS))


def test_checker_finds_each_kind_of_violation(tmp_path):
    """The checker itself, on a package with one violation of each kind (and legal imports)."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "import torch\nfrom pkg.high import b\n",  # (b) upward
        "low/c.py": "from pkg.low import d\n",  # (a) c <-> d
        "low/d.py": "def f():\n    from pkg.low import c  # deferred: a cycle stays a cycle\n",
        "high/__init__.py": "",
        "high/b.py": (
            "import torch\n"
            "def f():\n"
            "    from pkg.low import c\n"  # (c) no reason, and defers nothing (c loads no heavy module)
            "def g():\n"
            "    import vllm  # optional: an extra\n"  # fine
            "def h():\n"
            "    import json\n"  # (c) stdlib: defers nothing
        ),
        "high/e.py": (
            "def f():\n"
            "    # deferred: torch loads after parsing\n"
            "    import torch\n"
            "    import torch.distributed as dist\n"  # same group: covered by the comment
            "def g():\n"
            "    import megatron.core\n"  # (c) heavy but no reason
        ),
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    problems = check(tmp_path, "pkg", [{"__init__"}, {"low"}, {"high"}], set())
    text = "\n".join(problems)
    assert "pkg/low/a.py:2: pkg.low.a imports pkg.high.b from a higher layer (low -> high)" in text
    assert "import cycle pkg.low.c -> pkg.low.d -> pkg.low.c" in text
    assert "pkg/high/b.py:3: function-level import of pkg.low defers nothing" in text
    assert "pkg/low/d.py:2: function-level import of pkg.low defers nothing" in text
    assert "pkg/high/b.py:7: function-level import of json defers nothing" in text
    assert "pkg/high/e.py:6: function-level import of megatron.core needs a one-line reason" in text
    assert not any("e.py:3" in p or "e.py:4" in p or "b.py:5" in p for p in problems), text
    assert len(problems) == 6, text


if __name__ == "__main__":  # python tests/unit/test_layering.py: print every problem
    print("\n".join(check(ROOT, "megatron_longpo", LAYERS, ALLOWED_EXCEPTIONS, _scripts())) or "clean")
    sys.exit(0)
