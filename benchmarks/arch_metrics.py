"""`python -m benchmarks.arch_metrics [--root DIR]`: the layout figures of issue 10, read from the source.

- Python files and lines per top-level folder (and the total outside tests/).
- Import cycles among the modules of rollout/ runtime/ sync/ kernels/ trainer_examples/: every `import`
  and `from ... import`, also those inside functions (a lazy import that closes a loop is still a loop),
  except those under `if TYPE_CHECKING:`. `from pkg import name` points at pkg/name.py when that file
  exists, else at pkg/__init__.py; importing a.b.c is not counted as importing a and a.b (a package's
  __init__ would otherwise close a loop with every module it re-exports).
- Private attribute accesses across objects: `x._name` where x is not `self` or `cls` (dunders and
  namedtuple's `_replace` / `_asdict` / `_fields` / `_make` excluded), e.g. `scheduler._finish`, or a
  module's private `c10d._world`; and `from our_module import _name`. Each one is listed.

Works on any checkout (`--root` a `git worktree` of an older commit prints its "before" figures).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("rollout", "runtime", "sync", "kernels", "trainer_examples")
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def python_files(root: Path) -> list[Path]:
    skip = {".git", "__pycache__", ".venv", "venv", "build", "dist", ".pytest_cache"}
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in skip or part.endswith(".egg-info") for part in rel.parts):
            continue
        out.append(p)
    return out


def lines_by_folder(root: Path) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in python_files(root):
        rel = p.relative_to(root)
        folder = rel.parts[0] if len(rel.parts) > 1 else "."
        counts[folder][0] += 1
        counts[folder][1] += len(p.read_text(errors="replace").splitlines())
    return {k: (v[0], v[1]) for k, v in sorted(counts.items())}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of statements under `if TYPE_CHECKING:` (not runtime imports)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    for sub in ast.walk(stmt):
                        if hasattr(sub, "lineno"):
                            lines.add(sub.lineno)
    return lines


def import_graph(root: Path) -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for p in python_files(root):
        rel = p.relative_to(root)
        if rel.parts[0] in PACKAGES:
            modules[module_name(root, p)] = p
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                # the module itself, or the nearest enclosing module we know (import a.b.c.func-like names)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def private_accesses(root: Path) -> list[str]:
    out = []
    for p in python_files(root):
        rel = p.relative_to(root)
        if rel.parts[0] not in PACKAGES:
            continue
        tree = ast.parse(p.read_text(), str(p))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__") or attr in NAMEDTUPLE_API:
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
                continue
            out.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return out


def private_imports(root: Path) -> list[str]:
    """`from module import _name` between our own modules (a private helper used from outside)."""
    out = []
    for p in python_files(root):
        rel = p.relative_to(root)
        if rel.parts[0] not in PACKAGES:
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        out.append(f"{rel}:{node.lineno}: from {node.module} import {a.name}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="a checkout")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the report")
    args = parser.parse_args()
    root = Path(args.root).resolve()

    folders = lines_by_folder(root)
    graph = import_graph(root)
    loops = cycles(graph)
    private = private_accesses(root)
    private_from = private_imports(root)
    outside = [v for k, v in folders.items() if k != "tests"]
    if args.json:
        print(json.dumps({"folders": folders, "outside_tests": [sum(f for f, _ in outside), sum(n for _, n in outside)],
                          "import_cycles": loops, "private_accesses": private,
                          "private_imports": private_from}))
        return
    print(f"== {root}")
    print(f"{'folder':<20} {'files':>6} {'lines':>7}")
    for k, (files, lines) in folders.items():
        print(f"{k:<20} {files:>6} {lines:>7}")
    print(f"{'(outside tests/)':<20} {sum(f for f, _ in outside):>6} {sum(n for _, n in outside):>7}")
    print(f"\nimport cycles among {', '.join(PACKAGES)} ({len(graph)} modules): {len(loops)}")
    for comp in loops:
        print("  " + " <-> ".join(comp))
    print(f"\nprivate attribute accesses across objects (x._name, x not self/cls): {len(private)}")
    for line in private:
        print("  " + line)
    print(f"\nprivate names imported from another of our modules (from m import _name): {len(private_from)}")
    for line in private_from:
        print("  " + line)


if __name__ == "__main__":
    main()
