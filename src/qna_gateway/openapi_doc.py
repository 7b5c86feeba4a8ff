"""Corrections to the OpenAPI document Litestar generates.

Litestar writes every union as `oneOf`. For `int | float` that is wrong: an integer is valid
under both `{"type": "integer"}` and `{"type": "number"}`, and `oneOf` means exactly one, so
a chat whose metadata holds `42` violated its own documented response schema (schemathesis
found it). Such unions become `anyOf`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from litestar import Litestar
from litestar.openapi.spec import OpenAPIType, Schema

_OVERLAPPING = {OpenAPIType.INTEGER, OpenAPIType.NUMBER}


def fix_overlapping_one_of(app: Litestar) -> None:
    """Rewrite, in the app's (cached) document, each `oneOf` whose members overlap."""
    _walk(app.openapi_schema, set())


def _walk(node: Any, seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, Schema) and node.one_of:
        types = {member.type for member in node.one_of if isinstance(member, Schema)}
        if types >= _OVERLAPPING:
            node.any_of, node.one_of = node.one_of, None
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            _walk(getattr(node, field.name), seen)
    elif isinstance(node, dict):
        for value in node.values():
            _walk(value, seen)
    elif isinstance(node, list | tuple):
        for value in node:
            _walk(value, seen)
