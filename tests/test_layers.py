"""The package's layers, as the code really imports them: no import runs from a lower layer up to a higher one,
siblings stay apart, and no module imports itself back through others.

Read from the source with `ast` (every import, also those inside functions and under TYPE_CHECKING), so a lazy
import that would run back up counts as much as one at the top of a file. A new module must be given a layer
here, which makes its place in the architecture a decision rather than an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mesh"

# Each layer and the layers it may import (its own always included). Read top to bottom as floors of a house.
ALLOWED: dict[str, set[str]] = {
    "ground": set(),                                   # mesh, address, units, watchdog, buffers, files, pb
    "codec": {"ground"},                               # values <-> bytes; only the top floor and the provider load it
    "transport": {"ground"},
    "storage": {"ground", "transport.wire"},           # a stored blob is its wire frames, and nothing more of a peer
    "membership": {"ground", "transport"},
    "cluster": {"ground", "transport", "storage", "membership"},
    "top": {"ground", "codec", "transport", "storage", "membership", "cluster"},
}
GROUND = {"mesh", "mesh.address", "mesh.units", "mesh.watchdog", "mesh.buffers", "mesh.files", "mesh.node_id"}
TOP = {"mesh.node", "mesh.server", "mesh.client", "mesh.cli", "mesh.settings", "mesh.metrics", "mesh.install_comfyui"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module in GROUND or module.startswith("mesh.pb"):
        return "ground"
    if module in TOP:
        return "top"
    wing = module.split(".")[1]
    if wing in ("codec", "transport", "storage", "membership", "cluster"):
        return wing
    raise AssertionError(f"{module} has no layer: give it one in tests/test_layers.py")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every mesh module that `path` imports, by its full name (`from mesh import codec` is mesh.codec)."""
    found: set[str] = set()
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "_pb2" not in p.name]
    known = {module_name(p) for p in files} | {"mesh.pb.mesh_pb2", "mesh.pb.mesh_pb2_grpc"}
    return {module_name(p): imports_of(p, known) - {module_name(p)} for p in files}


def allowed(source: str, target: str) -> bool:
    src, dst = layer_of(source), layer_of(target)
    if src == dst:
        return True
    return dst in ALLOWED[src] or any(target == f"mesh.{grant}" for grant in ALLOWED[src] if "." in grant)


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{s} ({layer_of(s)}) imports {t} ({layer_of(t)})"
                  for s, targets in g.items() for t in targets if not allowed(s, t))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), i.e. every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer_and_no_import_runs_up() -> None:
    g = graph()
    assert len(g) >= 30 and sum(map(len, g.values())) >= 80, "the import graph looks empty: the parser is broken"
    assert upward_imports(g) == []


def test_no_import_cycles() -> None:
    # The package faces import their own modules; a cycle would show here as a group of two or more.
    assert cycles(graph()) == []


def test_each_subpackage_says_what_it_is_for_and_what_it_may_import() -> None:
    for face in sorted(PACKAGE.glob("*/__init__.py")):
        if face.parent.name == "pb":
            continue
        doc = ast.get_docstring(ast.parse(face.read_text())) or ""
        assert "May import:" in doc, f"{face.relative_to(ROOT)} does not say what the layer may import"


@pytest.mark.parametrize("source, target", [
    ("mesh.storage.store", "mesh.cluster.ring"),      # storage reaching up to the cluster
    ("mesh.storage.store", "mesh.transport.peer"),    # storage talking to a peer: only wire frames are granted
    ("mesh.transport.peer", "mesh.storage.store"),    # transport reaching up to storage
    ("mesh.membership.driver", "mesh.storage.store"),  # siblings stay apart
    ("mesh.transport.wire", "mesh.codec"),            # the node never loads the codec
])
def test_the_check_catches_a_planted_upward_import(source: str, target: str) -> None:
    g = graph()
    g[source] = g[source] | {target}
    assert upward_imports(g) == [f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"]


def test_the_check_catches_a_planted_cycle() -> None:
    g = graph()
    g["mesh.transport.wire"] = g["mesh.transport.wire"] | {"mesh.transport.peer"}
    assert ["mesh.transport.peer", "mesh.transport.wire"] in cycles(g)
