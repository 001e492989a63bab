"""The layering ARCHITECTURE.md states, checked on the code: which embedpool package may import which, and which
transport libraries each may use. Function-level (lazy) imports count too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "embedpool"

BASE = {"errors", "config", "logs", "metrics", "tracing", "_native"}
# What each part may import from embedpool (besides itself). Keep in step with ARCHITECTURE.md.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "logs": set(),
    "metrics": set(),
    "tracing": set(),
    "model": BASE,
    "pool": BASE,
    "store": BASE,
    "engine": BASE | {"model", "pool"},
    "security": BASE | {"store"},
    "service": BASE | {"engine", "pool", "store", "security"},
    "status": {"errors"},
    "channel": {"errors"},
    "client": BASE | {"status", "channel", "v1"},
    # A client-side tool: servers only through the client and HTTP; the engine itself for engine-only runs.
    "benchmark": BASE | {"client", "channel", "status", "v1", "model", "engine"},
    "http": BASE | {"service", "security", "store", "status", "engine"},
    "server": BASE | {"service", "security", "store", "status", "engine", "pool", "v1", "http"},
    "cli": {"*"},
    "admin": {"*"},
    "__init__": {"errors"},
    "v1": set(),
}
TRANSPORTS = {
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "grpc_status",
    "google",
    "fastapi",
    "fastapi_offline",
    "starlette",
    "uvicorn",
    "pydantic",
    "httpx",
    "httptools",
}
# Transport libraries each part may use; any part not listed may use none.
MAY_USE: dict[str, set[str]] = {
    "status": {"grpc"},
    "channel": {"grpc"},
    "client": {"grpc", "grpc_status", "google"},
    "benchmark": {"httpx"},
    "http": {"fastapi", "fastapi_offline", "starlette", "uvicorn", "pydantic"},
    "server": {"grpc", "grpc_health", "grpc_reflection", "grpc_status", "google"},
    "v1": {"grpc", "google"},
    "cli": TRANSPORTS,
    "admin": TRANSPORTS,
}
COMPOSITION_ROOT = "server/app.py"
"""The process: the one module of `server` that assembles both doors (and so imports `http`)."""


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            if node.module == "embedpool":
                for alias in node.names:
                    yield node.lineno, f"embedpool.{alias.name}"


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "v1" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    part = _part(path)
    assert part in MAY_IMPORT, f"{part}: new part of the package; add it to ARCHITECTURE.md and this test"
    allowed = MAY_IMPORT[part]
    wrong = []
    for line, name in _imports(path):
        top, _, rest = name.partition(".")
        if top == "embedpool":
            target = rest.partition(".")[0]
            if not target or target in (part, "__version__") or "*" in allowed:
                continue
            if target == "http" and str(path.relative_to(PACKAGE)) != COMPOSITION_ROOT:
                wrong.append(f"line {line}: {name} (only {COMPOSITION_ROOT} joins the doors)")
            elif target not in allowed:
                wrong.append(f"line {line}: {name}")
        elif top in TRANSPORTS and top not in MAY_USE.get(part, set()):
            wrong.append(f"line {line}: {name} (a transport library)")
    assert not wrong, f"{path.relative_to(PACKAGE)} ({part}) imports across the layers: {wrong}"
