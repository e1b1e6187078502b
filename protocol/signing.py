"""Ed25519 identities and signatures, tied to libp2p peer IDs.

A node has one Ed25519 key. Its libp2p peer ID embeds the public key (an identity multihash of the
protobuf-encoded key), so a signature can be checked from the peer ID alone: a signature names a
peer. Every signature is made over a domain tag plus the message, so a signature made for one
purpose (an announcement) can never be replayed as another (a receipt).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import BadSignature, LocalProtocolError, MalformedFrame

# Identity multihash (code 0x00, length 36) of the libp2p protobuf PublicKey {Type: Ed25519 (1), Data: 32 bytes}.
_ED25519_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"
PEER_ID_BYTES = len(_ED25519_PEER_ID_PREFIX) + 32


def is_peer_id(raw: bytes) -> bool:
    """Whether `raw` is the bytes of an Ed25519 libp2p peer ID, the only kind poolai speaks to."""
    return len(raw) == PEER_ID_BYTES and raw.startswith(_ED25519_PEER_ID_PREFIX)
SIGNATURE_BYTES = 64

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58encode(data: bytes) -> str:
    """Base58 (bitcoin alphabet), the text form of libp2p peer IDs."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        i = _B58_ALPHABET.find(ch)
        if i < 0:
            raise ValueError(f"not base58: {ch!r} in {text!r}")
        n = n * 58 + i
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> bytes:
    if len(public_key) != 32:
        raise LocalProtocolError(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")
    return _ED25519_PEER_ID_PREFIX + public_key


def public_key_from_peer_id(peer_id: bytes) -> bytes:
    """The Ed25519 public key embedded in a peer ID; MalformedFrame for any other kind of ID."""
    if not isinstance(peer_id, bytes) or len(peer_id) != PEER_ID_BYTES or not peer_id.startswith(
        _ED25519_PEER_ID_PREFIX
    ):
        raise MalformedFrame("peer ID is not an Ed25519 identity peer ID")
    return peer_id[len(_ED25519_PEER_ID_PREFIX) :]


def short_id(peer_id: bytes) -> str:
    """The last 8 characters of the base58 peer ID: what logs and tables show."""
    return b58encode(peer_id)[-8:]


@dataclass(frozen=True)
class Signer:
    """An Ed25519 private key together with the peer ID it stands for."""

    _key: Ed25519PrivateKey
    peer_id: bytes

    @classmethod
    def from_seed(cls, seed: bytes) -> "Signer":
        if len(seed) != 32:
            raise LocalProtocolError(f"an Ed25519 seed has 32 bytes, not {len(seed)}")
        key = Ed25519PrivateKey.from_private_bytes(seed)
        pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(key, peer_id_from_public_key(pub))

    @classmethod
    def generate(cls) -> "Signer":
        key = Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(key, peer_id_from_public_key(pub))

    def sign(self, domain: bytes, message: bytes) -> bytes:
        return self._key.sign(_tagged(domain, message))


def verify(peer_id: bytes, domain: bytes, message: bytes, signature: bytes) -> None:
    """Check that `peer_id` signed `message` under `domain`; BadSignature otherwise."""
    public = public_key_from_peer_id(peer_id)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise BadSignature(f"signature must be {SIGNATURE_BYTES} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, _tagged(domain, message))
    except InvalidSignature:
        raise BadSignature(f"signature does not verify for peer {short_id(peer_id)}") from None


def _tagged(domain: bytes, message: bytes) -> bytes:
    if not domain or b"\0" in domain:
        raise LocalProtocolError("a signing domain is a non-empty tag without NUL bytes")
    return domain + b"\0" + message
