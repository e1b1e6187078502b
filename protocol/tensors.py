"""Tensors on the wire: msgpack maps with dtype, shape and the raw little-endian bytes.

Never pickle: a tensor is {"dtype": "f32", "shape": [1, T, H], "data": <bin>} and the decoder checks
that the byte count equals the product of the shape times the item size before anything is built
from it. This module works on bytes only; node/ turns them into torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

from .errors import MalformedFrame

DTYPES: dict[str, int] = {"f32": 4, "f16": 2, "bf16": 2}
"""Allowed dtypes and their item sizes. Hidden states only: no integer or 64-bit types needed."""

MAX_RANK = 4  # hidden states are [batch, tokens, hidden]; nothing we send has more than 4 dims
MAX_DIM = 1 << 20  # a bound per dimension, so a shape cannot overflow the size check


@dataclass(frozen=True)
class WireTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}

    @property
    def nbytes(self) -> int:
        return len(self.data)


def tensor_from_wire(value: Any, what: str = "tensor") -> WireTensor:
    """Check and unpack a wire tensor; MalformedFrame naming `what` when anything is off."""
    if not isinstance(value, dict):
        raise MalformedFrame(f"{what} must be a map, not {type(value).__name__}")
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if dtype not in DTYPES:
        raise MalformedFrame(f"{what} has dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise MalformedFrame(f"{what} has an invalid shape {shape!r}")
    if not isinstance(data, bytes):
        raise MalformedFrame(f"{what} data must be bytes")
    expected = prod(shape) * DTYPES[dtype]
    if len(data) != expected:
        raise MalformedFrame(f"{what} has {len(data)} bytes of data; shape {shape} {dtype} needs {expected}")
    return WireTensor(dtype, tuple(shape), data)
