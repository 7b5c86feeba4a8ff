"""Opaque pagination cursors: a row's `seq`, wrapped so clients don't build them."""

from __future__ import annotations

import base64
import binascii

from ..errors import BadRequest


def encode_cursor(kind: str, seq: int) -> str:
    """`kind` names the list, so a cursor of one list is refused by another."""
    return base64.urlsafe_b64encode(f"{kind}:{seq}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = raw.partition(":")
        seq = int(number)
        if prefix != kind or seq < 0 or len(cursor) > 64:
            raise ValueError(cursor)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise BadRequest("The cursor is not one this API returned.") from None
    return seq
