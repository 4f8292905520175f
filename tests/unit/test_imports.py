"""The import graph: the sans-IO core loads without the I/O machinery, and hostd has no cycle.

`hostd/stack/` and `hostd/services/` do no I/O (README, "Architecture"); what they import
is checked in a clean interpreter, since this test process has long imported asyncio.
dnslib (the DNS message codec the resolver is built on) imports `socket` for
`inet_pton`; that is the one importer of `socket` allowed, and the test names it.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORBIDDEN = ("asyncio", "socket", "threading")
ALLOWED_SOCKET_IMPORTERS = {"dnslib.dns"}

# Run in a fresh interpreter: import every core module, recording who first imports each
# forbidden module (the importing frame's module name).
PROBE = r"""
import importlib, json, pkgutil, sys
FORBIDDEN = {forbidden!r}
importers = {{}}

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in FORBIDDEN and name not in importers:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")
            ):
                frame = frame.f_back
            importers[name] = frame.f_globals.get("__name__", "?") if frame else "?"
        return None

sys.meta_path.insert(0, Spy())
import netferry.hostd.stack, netferry.hostd.services
names = []
for pkg in (netferry.hostd.stack, netferry.hostd.services):
    for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
        names.append(info.name)
print(json.dumps({{"modules": names, "loaded": {{m: m in sys.modules for m in FORBIDDEN}},
                  "importers": importers}}))
"""


def _clean_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = {[str(ROOT)]!r}\n{code}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


def test_acceptance_command_prints_false() -> None:
    # Issue 14's acceptance line, verbatim (from the repository's root, where hostd/ is a
    # folder), and the same under the installed name.
    for top in ("hostd", "netferry.hostd"):
        out = _clean_python(
            f"import {top}.stack.network, {top}.services.dns, sys; print('asyncio' in sys.modules)"
        )
        assert out.strip() == "False", top


def test_core_imports_no_asyncio_socket_or_threading() -> None:
    result = json.loads(_clean_python(PROBE.format(forbidden=FORBIDDEN)))
    assert "netferry.hostd.stack.network" in result["modules"]
    assert "netferry.hostd.services.dns" in result["modules"]
    assert "netferry.hostd.services.dhcp" in result["modules"]
    assert not result["loaded"]["asyncio"], result["importers"]
    assert not result["loaded"]["threading"], result["importers"]
    if result["loaded"]["socket"]:
        assert result["importers"]["socket"] in ALLOWED_SOCKET_IMPORTERS, result["importers"]


def _module_name(path: pathlib.Path) -> str:
    """The installed name: hostd/ is the package netferry.hostd."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "netferry." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """hostd modules `path` imports at run time, function-local imports included (a
    deferred import hides a cycle rather than removing it); `if TYPE_CHECKING:` excluded."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_hostd() -> None:
    paths = {_module_name(p): p for p in (ROOT / "hostd").rglob("*.py")}
    modules = set(paths)
    graph = {name: _imports(path, modules) - {name} for name, path in paths.items()}
    assert "netferry.hostd.stack.network" in graph["netferry.hostd.switch"]  # the walk sees imports
    assert _cycles(graph) == []
