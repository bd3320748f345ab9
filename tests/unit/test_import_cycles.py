"""No import cycles in tools/ and agent/: every import counts, at the top of a module or inside a
function (an import moved into a function hides a cycle, it does not break it); only imports
under `if TYPE_CHECKING:` are left out (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"idlewire": ROOT / "tools" / "idlewire", "idlewire_agent": ROOT / "agent" / "idlewire_agent"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, d in PACKAGES.items():
        for p in d.rglob("*.py"):
            parts = [pkg, *p.relative_to(d).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules `name` imports, anywhere in its code."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.add(a.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = here.split(".")
                    parts = parts[:len(parts) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                found.add(base)
                for a in child.names:
                    found.add(f"{base}.{a.name}")  # `from . import x` imports the module x
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out = set()
    for f in found:
        while f and f not in known:  # `import a.b.c` runs a.b.c; a name inside a module counts as it
            f = f.rpartition(".")[0]
        if f and f != name:
            out.add(f)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g = {}
    for name, path in mods.items():
        # a package's __init__ is imported by every submodule: only its own imports are edges
        g[name] = {m for m in imports(name, path, known) if not name.startswith(m + ".")}
    return g


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_agent_never_imports_the_host_tools():
    g = graph()
    bad = {n: sorted(m for m in deps if m.split(".")[0] == "idlewire") for n, deps in g.items()
           if n.startswith("idlewire_agent")}
    assert not any(bad.values()), bad


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import f\n")
    b.write_text("def f():\n    from .a import g\n    return g\n")
    known = {"p.a", "p.b"}
    g = {"p.a": imports("p.a", a, known), "p.b": imports("p.b", b, known)}
    assert find_cycle(g) == ["p.a", "p.b", "p.a"]
