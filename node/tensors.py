"""torch tensors <-> protocol WireTensors (raw little-endian bytes, never pickle)."""

from __future__ import annotations

import sys

import torch

from protocol.tensors import WireTensor

_TO_WIRE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts need a byteswap here"


def to_wire(t: torch.Tensor) -> WireTensor:
    t = t.detach().contiguous().cpu()
    dtype = _TO_WIRE[t.dtype]
    data = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return WireTensor(dtype, tuple(t.shape), data)


def from_wire(w: WireTensor) -> torch.Tensor:
    dtype = _FROM_WIRE[w.dtype]
    flat = torch.frombuffer(bytearray(w.data), dtype=dtype) if w.data else torch.empty(0, dtype=dtype)
    return flat.reshape(w.shape)
