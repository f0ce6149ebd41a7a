"""Shared hypothesis strategies: JSON values of every type and byte-level mutations of seeds."""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

HUGE = 70 * 1024  # above every request-size limit the parsers enforce (64 KiB for ACME)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@functools.cache  # built once: hypothesis validates a new strategy on each use
def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value: wrong types for every member a parser expects."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
        st.sampled_from(["", "A", "AA", "AAA=", "====", "\x00", "ES256", "\ud7ff\ue000"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


@functools.cache  # built once: hypothesis validates a new strategy on each use
def huge_values() -> st.SearchStrategy[Any]:
    """Values far larger than anything legitimate."""
    return st.sampled_from(
        [
            "A" * HUGE,
            ["A"] * 5000,
            {str(i): i for i in range(3000)},
            10**4000,  # over Python's int-to-str limit when re-encoded
        ]
    )


@functools.cache  # built once: hypothesis validates a new strategy on each use
def bad_b64url() -> st.SearchStrategy[str]:
    """Strings that are almost base64url: padding, the standard alphabet, whitespace, pad bits."""
    return st.one_of(
        st.sampled_from(
            ["=", "A=", "AA==", "A", "AB", "ABC+", "AB/C", "AB C", "AB\nC", "AQ", "AR"]
        ),
        st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
        st.text(alphabet="ABCabc019-_+/= \t\n%.\u00e9", max_size=40),
    )


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes], max_ops: int = 4) -> bytes:
    """A seed with up to ``max_ops`` byte-level edits: bit flips, truncation, insertion,
    deletion, overwrites, duplication of a slice, and length-byte damage."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(min_value=1, max_value=max_ops))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set", "dup", "byte"]))
        if not data:
            data.extend(draw(st.binary(min_size=1, max_size=8)))
            continue
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=16))]
        elif op == "set":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif op == "dup":
            end = min(len(data), at + draw(st.integers(min_value=1, max_value=64)))
            data[at:at] = data[at:end]
        else:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xFF]))
    return bytes(data)
