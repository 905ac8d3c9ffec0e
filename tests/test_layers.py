"""The package's shape, checked: the pure modules import neither aiohttp nor
YAML (not even through another module), aiohttp is imported only at the
edges, and imports point one way, from the outer layers to the inner ones,
with no cycle (docs/design.md, "Where things are")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

# Plain functions and values over plain values: testable without a socket.
PURE = (
    "proxy.errors",
    "proxy.units",
    "proxy.config.model",
    "proxy.tokens.token",
    "proxy.tokens.breaker",
    "proxy.routing.router",
    "proxy.routing.access",
    "proxy.forwarding.headers",
    "proxy.forwarding.challenge",
    "proxy.forwarding.seams",
    "proxy.forwarding.body",
    "proxy.egress.policy",
    "proxy.egress.ca",
    "proxy.tokens.dpop",
)
# Where aiohttp may be imported: the engine, the token endpoint's client, the
# admin app, the assembly that starts them, the demo's mocks and the CLI's admin call.
EDGES = (
    "proxy.http1.",
    "proxy.tokens.minter",
    "proxy.tokens.session",
    "proxy.ops.admin",
    "proxy.server",
    "proxy.demo",
    "proxy.cli",  # `authproxy token --drop` calls the admin port
)
# Inner to outer: a module imports only from its own layer or an inner one.
LAYERS = (
    ("proxy.compiled", "proxy.errors", "proxy.units", "proxy.log", "proxy.metrics", "proxy.tls"),
    ("proxy.config.", "proxy.tracing"),
    ("proxy.tokens.",),
    ("proxy.egress.",),
    ("proxy.routing.",),
    ("proxy.forwarding.",),
    ("proxy.http1.",),
    ("proxy.server", "proxy.ops.", "proxy.demo", "proxy.cli", "proxy.__main__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def layer(module: str) -> int:
    for number, members in enumerate(LAYERS):
        if any(
            module == m.rstrip(".") or (m.endswith(".") and module.startswith(m)) for m in members
        ):
            return number
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py")


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_pulls_in_neither_aiohttp_nor_yaml(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'yaml', 'redis'}))"
    )
    out = subprocess.run(  # noqa: S603 - our own interpreter, a fixed probe
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"


def test_aiohttp_is_imported_only_at_the_edges() -> None:
    outside = sorted(
        module
        for module, path in MODULES.items()
        if any(name.split(".")[0] == "aiohttp" for name in imports(path))
        and not any(module.startswith(edge) for edge in EDGES)
    )
    assert outside == []


def test_imports_point_inwards() -> None:
    wrong = []
    for module, path in MODULES.items():
        if module == "proxy":
            continue
        for name in imports(path):
            if name.startswith("proxy.") and name in MODULES and layer(name) > layer(module):
                wrong.append(f"{module} (layer {layer(module)}) imports {name} ({layer(name)})")
    assert wrong == []


def test_no_import_cycle() -> None:
    graph = {
        module: {n for n in imports(path) if n in MODULES and n != module}
        for module, path in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                raise AssertionError("cycle: " + " -> ".join([*trail, module, name]))
            if name not in state:
                visit(name, [*trail, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
