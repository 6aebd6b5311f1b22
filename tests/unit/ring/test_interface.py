"""Devices and drivers use a ring only through its interface (pyvirtio.ring.queue): no
module outside pyvirtio/ring reads or writes a ring object's private attributes."""

from __future__ import annotations

import ast
from pathlib import Path

import pyvirtio

PACKAGE = Path(pyvirtio.__file__).parent
RING = PACKAGE / "ring"


def ring_private_names() -> set[str]:
    """Every ``self._name`` the ring classes assign or define (their private state)."""
    names: set[str] = set()
    for path in RING.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef) and node.name.startswith("_") \
                    and not node.name.startswith("__"):
                names.add(node.name)
    return names


def private_ring_accesses(tree: ast.AST, private: set[str]) -> list[tuple[int, str]]:
    """``<expr>._name`` where ``_name`` is ring-private and ``<expr>`` is not ``self``."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in private
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and _looks_like_a_ring(node.value)):
            found.append((node.lineno, f"{ast.unparse(node.value)}.{node.attr}"))
    return found


def _looks_like_a_ring(expr: ast.expr) -> bool:
    text = ast.unparse(expr).lower()
    return "ring" in text or "queue" in text or text.endswith("vq") or text in ("q", "r")


def test_the_scan_finds_private_access_to_a_ring() -> None:
    private = ring_private_names()
    assert {"_avail", "_used", "_desc", "_inflight", "_kicks_enabled"} <= private
    tree = ast.parse("ring._avail\nself.ring._inflight = 0\nqueue.ring._used\nself._avail\n")
    assert [line for line, _ in private_ring_accesses(tree, private)] == [1, 2, 3]


def test_no_module_outside_ring_touches_a_ring_private_attribute() -> None:
    private = ring_private_names()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if RING in path.parents:
            continue
        for line, what in private_ring_accesses(ast.parse(path.read_text()), private):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {what}")
    assert offenders == []
