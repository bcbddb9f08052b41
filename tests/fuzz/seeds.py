"""Seed material shared by the fuzz targets: the recorded C dc_server traffic and encoded
valid messages. Nothing here is written to the tree; the runner writes seeds to a temp dir."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from tests.procs import VECTORS
from tlscache.distcache.protocol import (
    Operation,
    Result,
    encode_add,
    encode_get,
    encode_have,
    encode_message,
    encode_remove,
    encode_response,
    encode_result,
)


@cache
def _vectors() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(VECTORS.read_text())
    return doc


def _hex_fields(node: Any, suffix: str) -> list[bytes]:
    """Every ``*<suffix>`` hex string anywhere in the vectors document."""
    found: list[bytes] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and key.endswith(suffix) and value:
                try:
                    found.append(bytes.fromhex(value))
                except ValueError:
                    continue
            else:
                found += _hex_fields(value, suffix)
    elif isinstance(node, list):
        for item in node:
            found += _hex_fields(item, suffix)
    return found


def recorded_requests() -> list[bytes]:
    """Request bytes sent to the C dc_server and dc_client (valid and bad input)."""
    return _hex_fields(_vectors(), "request_hex")


def recorded_responses() -> list[bytes]:
    """Response bytes the C dc_server and dc_client sent back."""
    return _hex_fields(_vectors(), "response_hex")


def encoded_requests() -> list[bytes]:
    """Valid requests of every operation and size class, as the encoder frames them."""
    return [
        encode_add(1, b"session-id", b"\x30\x82" + bytes(range(100)), 300_000),
        encode_add(2, b"k" * 64, b"d" * 5000, 1),  # three frames
        encode_add(3, b"x", b"y", 0),
        encode_get(4, b"session-id"),
        encode_get(0xFFFFFFFF, b""),
        encode_remove(5, b"session-id"),
        encode_have(6, b"session-id"),
        encode_message(False, 7, Operation.GET, b"g" * 2048),
        encode_message(False, 8, Operation.HAVE, b"h" * 4097),
        encode_get(9, b"a") + encode_have(10, b"b") + encode_remove(11, b"c"),
    ]


def encoded_responses() -> list[bytes]:
    """Valid responses: results, hits, misses, empty "no server" answers, large hits."""
    return [
        encode_result(1, Operation.ADD, Result.OK),
        encode_result(2, Operation.ADD, Result.ADD_MATCHING_SESSION),
        encode_result(3, Operation.GET, Result.NOTOK),
        encode_response(4, Operation.GET, b"\x30\x82" + bytes(range(140))),
        encode_response(5, Operation.GET, b"s" * 6000),
        encode_result(6, Operation.REMOVE, Result.OK),
        encode_result(7, Operation.HAVE, Result.NOTOK),
        encode_result(8, Operation.HAVE, Result.DISCONNECTED),
        encode_message(True, 9, Operation.GET, b""),
    ]
