"""Model manifests: what a model is, block by block, and the model ID that names it.

A manifest lists the architecture, the configuration, the SHA-256 of the tokenizer, of the client part
(embedding, final norm, head) and of every block's weight file. The model ID is the SHA-256 of the
manifest's canonical encoding, so two nodes agree on a model ID only when they hold the same weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import MalformedFrame

MANIFEST_VERSION = 1
MAX_BLOCKS = 1024  # no public transformer has more layers; bounds every span check


@dataclass(frozen=True)
class ModelManifest:
    name: str
    architecture: str
    config: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs of plain ints, floats, bools, strings
    tokenizer_sha256: bytes
    client_sha256: bytes
    block_sha256: tuple[bytes, ...]

    @classmethod
    def build(cls, name: str, architecture: str, config: dict[str, Any], tokenizer_sha256: bytes,
              client_sha256: bytes, block_sha256: list[bytes]) -> "ModelManifest":
        for key, value in config.items():
            if not isinstance(value, (int, float, bool, str)):
                raise ValueError(f"manifest config {key!r} must be a plain scalar, not {type(value).__name__}")
        if not 1 <= len(block_sha256) <= MAX_BLOCKS:
            raise ValueError(f"a model has 1..{MAX_BLOCKS} blocks, not {len(block_sha256)}")
        return cls(name, architecture, tuple(sorted(config.items())), tokenizer_sha256, client_sha256,
                   tuple(block_sha256))

    @property
    def n_blocks(self) -> int:
        return len(self.block_sha256)

    def canonical(self) -> bytes:
        return msgpack.packb(
            [MANIFEST_VERSION, self.name, self.architecture, [list(kv) for kv in self.config],
             self.tokenizer_sha256, self.client_sha256, list(self.block_sha256)],
            use_bin_type=True,
        )

    @property
    def model_id(self) -> bytes:
        return hashlib.sha256(self.canonical()).digest()

    @classmethod
    def from_canonical(cls, data: bytes) -> "ModelManifest":
        try:
            version, name, arch, config, tok, client, blocks = msgpack.unpackb(data, raw=False)
            if version != MANIFEST_VERSION:
                raise MalformedFrame(f"manifest version {version}, this node reads {MANIFEST_VERSION}")
            return cls.build(name, arch, dict(config), tok, client, blocks)
        except MalformedFrame:
            raise
        except Exception as e:
            raise MalformedFrame(f"manifest does not decode: {e}") from None

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)


def short_model_id(model_id: bytes) -> str:
    return model_id.hex()[:12]
