"""The weight store: the converted model on disk, its manifest, and integrity checks.

Conversion runs once per cache directory, under a file lock so that several nodes sharing one cache
(the demo does) convert it once between them. The manifest (SHA-256 of every block file) is computed
once and kept beside the files; the blocks a node loads are hashed again at load and compared with it,
so a corrupted or edited file is refused instead of served.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

from protocol.manifest import ModelManifest

from .errors import StartupError
from .model import ConvertedModel, ModelError, find_default_gguf, load_or_convert

log = logging.getLogger("poolai.weights")

MANIFEST_FILE = "manifest.bin"
# Where the converted model lives unless a config names a place: the user's cache dir, shared by every
# node and data dir of the user (the conversion is locked, so nodes starting together convert once).
# The variable overrides it for a whole process tree, as tests and benchmarks do.
MODEL_CACHE_ENV = "POOLAI_MODEL_CACHE"
MODEL_NAME = "SmolLM2-135M-Instruct"
HASH_CHUNK = 4 * 1024 * 1024


def sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.digest()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_cache() -> Path:
    """$POOLAI_MODEL_CACHE, else <user cache dir>/poolai/models/smollm2-135m (e.g. ~/.cache/poolai/...)."""
    import os

    import platformdirs

    env = os.environ.get(MODEL_CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("poolai")) / "models" / "smollm2-135m"


def prepare_model(cache_dir: Path, gguf: str | None = None, progress=None) -> tuple[ConvertedModel, ModelManifest]:
    """Convert the GGUF into `cache_dir` if needed and return it with its manifest."""
    try:
        gguf_path = Path(gguf) if gguf else find_default_gguf()
    except ModelError as e:
        raise StartupError(str(e)) from None
    if not gguf_path.is_file():
        raise StartupError(f"model file {gguf_path} does not exist")
    with _locked(cache_dir.parent / f".{cache_dir.name}.lock"):
        try:
            converted = load_or_convert(cache_dir, gguf_path, progress=progress)
        except ModelError as e:
            raise StartupError(f"cannot convert {gguf_path.name}: {e}") from None
        manifest_path = cache_dir / MANIFEST_FILE
        if manifest_path.exists():
            manifest = ModelManifest.from_canonical(manifest_path.read_bytes())
        else:
            manifest = build_manifest(converted)
            tmp = manifest_path.with_suffix(".tmp")
            tmp.write_bytes(manifest.canonical())
            tmp.replace(manifest_path)
    return converted, manifest


def build_manifest(converted: ConvertedModel) -> ModelManifest:
    config = converted.config
    return ModelManifest.build(
        name=MODEL_NAME,
        architecture="llama",
        config=config.to_dict(),
        tokenizer_sha256=sha256_file(converted.tokenizer_path),
        client_sha256=sha256_file(converted.client_path),
        block_sha256=[sha256_file(converted.block_path(i)) for i in range(config.n_layers)],
    )


def verify_blocks(converted: ConvertedModel, manifest: ModelManifest, start: int, end: int) -> None:
    """Hash the block files of [start, end) and the client file; StartupError on any mismatch."""
    for i in range(start, end):
        if sha256_file(converted.block_path(i)) != manifest.block_sha256[i]:
            raise StartupError(f"block {i} in {converted.block_path(i)} does not match the manifest; "
                               f"delete {converted.dir} to convert again")
    if sha256_file(converted.client_path) != manifest.client_sha256:
        raise StartupError(f"{converted.client_path} does not match the manifest; delete {converted.dir}")
