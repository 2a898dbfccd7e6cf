"""The module map the README draws, held true: no import circles, the core imports neither wing, each wing
only the core and the shared modules, and one module owns the KV contract's spelling."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "handlers" / "flowproxy"
SHARED = {"flowproxy", "flowproxy.defaults", "flowproxy.errors", "flowproxy.logs", "flowproxy.redact",
          "flowproxy.runstate", "flowproxy.settings", "flowproxy.telemetry", "flowproxy.probe"}
# layer -> the layers it may import (besides itself and the shared modules)
ALLOWED = {
    "core": set(),
    "consul": {"core"},
    "haproxy": {"core"},
    "sandbox": {"core"},
    "ca": {"core"},  # the ACME CA (certbot's acme)
    "pipeline": {"core", "consul", "haproxy", "sandbox"},
    "node": {"core", "consul", "haproxy", "sandbox", "ca", "pipeline"},
    "cli": {"core", "consul", "haproxy", "sandbox", "ca", "pipeline", "node"},
    "entry": {"cli", "node"},
    "backend": set(),
    "shared": {"core"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every flowproxy module `name` imports, at the top or inside a function (both count)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> str:
    if name in SHARED:
        return "shared"
    return name.split(".")[1]


def test_the_map_covers_every_module() -> None:
    assert {layer(name) for name in MODULES} <= set(ALLOWED), sorted(MODULES)


def test_no_import_circles() -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert circles == []


@pytest.mark.parametrize("name", sorted(MODULES), ids=sorted(MODULES))
def test_each_module_imports_only_what_its_layer_may(name: str) -> None:
    mine = layer(name)
    wrong = sorted(dep for dep in GRAPH[name]
                   if layer(dep) not in ALLOWED[mine] | {mine, "shared"} and dep != "flowproxy")
    assert wrong == [], f"{name} ({mine}) imports {wrong}"


FOLDER_LITERAL = re.compile(r"""["'](?:\{[^}]*\})?(routes|templates|certs|status|acme)/""")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "flowproxy.core.contract"))
def test_only_the_contract_spells_the_kv_folders(name: str) -> None:
    """`f"{prefix}routes/..."` anywhere but core/contract.py is a second owner of the layout. (File names
    inside a release, `certs/<name>.pem`, are HAProxy's and not KV keys: they never follow the prefix.)"""
    code = MODULES[name].read_text()
    spelled = [m.group(0) for m in FOLDER_LITERAL.finditer(code) if "{" in m.group(0) and "prefix" in m.group(0)]
    assert spelled == [], f"{name} builds KV keys by hand: {spelled}"
