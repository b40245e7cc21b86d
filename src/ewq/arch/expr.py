"""Arithmetic over config values, for the shapes in the architecture tables (``tables/*.toml``).

Hand-written on ``ast`` because the tables must not run code: only names, numbers,
``+ - * //``, comparisons (``is None`` included), ``and or not`` and ``x if c else y``
are accepted. Python's ``eval`` would accept anything.
"""

from __future__ import annotations

import ast
import functools
import operator
from collections.abc import Mapping
from typing import Any

__all__ = ["ExprError", "evaluate", "names_in"]

_BIN = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CMP = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,  # a layer in a config's list (mlp_only_layers)
    ast.NotIn: lambda a, b: a not in b,
}


class ExprError(Exception):
    """An expression is malformed or names a key the config lacks."""

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


@functools.cache
def _parse(text: str) -> ast.expr:
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ExprError(f"cannot parse {text!r}: {exc.msg}") from None


@functools.cache
def names_in(text: str) -> frozenset[str]:
    """The names an expression reads."""
    return frozenset(n.id for n in ast.walk(_parse(text)) if isinstance(n, ast.Name))


def evaluate(text: str, names: Mapping[str, Any]) -> Any:
    """Evaluate ``text`` with ``names`` (config keys, defaults, ``N`` the layer)."""
    return _eval(_parse(text), names, text)


def _eval(node: ast.expr, names: Mapping[str, Any], text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(
        node.value, int | bool | str | None
    ):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        if node.id not in names:
            raise ExprError(
                f"the config has no {node.id!r} (needed by {text!r})", node.id
            )
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        left, right = _eval(node.left, names, text), _eval(node.right, names, text)
        if left is None or right is None:
            raise ExprError(f"{text!r}: a value it needs is null in the config")
        return _BIN[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval(node.operand, names, text)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, names, text)
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, names, text) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _CMP for op in node.ops):
        left = _eval(node.left, names, text)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, names, text)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.List | ast.Tuple):
        return [_eval(e, names, text) for e in node.elts]
    if isinstance(node, ast.IfExp):
        branch = node.body if _eval(node.test, names, text) else node.orelse
        return _eval(branch, names, text)
    raise ExprError(
        f"{text!r}: {type(node).__name__} is not allowed in a shape expression"
    )
