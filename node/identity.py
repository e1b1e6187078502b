"""The node's one Ed25519 key: created on first start, kept 0600 in the data dir, reused ever after."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.crypto.ed25519 import create_new_key_pair

from protocol.signing import Signer

from .errors import StartupError

IDENTITY_FILE = "identity.key"


def load_or_create_identity(data_dir: Path) -> tuple[KeyPair, Signer]:
    """The node's key pair (for libp2p) and the same key as a protocol Signer."""
    path = data_dir / IDENTITY_FILE
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise StartupError(f"identity file {path} is readable by others (mode {mode:o}); run chmod 600 on it")
        try:
            key_pair = load_identity(path)
        except ValueError as e:
            raise StartupError(f"identity file {path} is corrupt: {e}") from None
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        key_pair = create_new_key_pair()
        tmp = path.with_suffix(".tmp")
        save_identity(key_pair, tmp)  # written 0600
        os.replace(tmp, path)
    seed = key_pair.private_key.to_bytes()
    if len(seed) != 32:
        raise StartupError(f"identity file {path} does not hold an Ed25519 key")
    return key_pair, Signer.from_seed(seed)
