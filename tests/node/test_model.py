"""node.model against transformers' own GGUF loader (an independent Q/K un-permute and tokenizer).

The GGUF is converted once per module; transformers is loaded once per module (about 30 s).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from node.model import (
    COMPLETE_MARKER,
    CacheOverflow,
    ClientModel,
    KVCache,
    LlamaConfig,
    LocalModel,
    PositionMismatch,
    SpanModel,
    convert_gguf,
    find_default_gguf,
    format_chat,
    load_or_convert,
    sample_next,
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Once upon a time, in a small village by the sea, there lived",
]
# fp32 against fp32 with the same weights: only summation order differs (fused QKV, GEMV layout).
REFERENCE_ATOL = 1e-4
# Same ops on the same data in the same order, so spans should agree bit for bit; allow rounding noise.
SPLIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_gguf(find_default_gguf(), tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def local(converted):
    return LocalModel.load(converted)


@pytest.fixture(scope="module")
def tokenizer(converted):
    return converted.load_tokenizer()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    gguf = find_default_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    # The reference must be the plain dequantized fp32 Llama, not a quantized-matmul kernel.
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    gguf = find_default_gguf()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def full_logits(model: LocalModel, ids: list[int]) -> torch.Tensor:
    return model.forward(ids, model.new_cache(len(ids)), 0)


def test_config_read_from_gguf(converted):
    c = converted.config
    assert (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate, c.vocab, c.bos_id, c.eos_id) == (1536, 49152, 1, 2)
    assert c.rope_theta == 100000.0 and c.tie_embeddings
    assert abs(c.rms_eps - 1e-5) < 1e-9
    assert LlamaConfig.from_dict(c.to_dict()) == c
    assert all(type(v) in (int, float, bool) for v in c.to_dict().values())


def test_logits_match_transformers(local, tokenizer, hf):
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        ours = full_logits(local, ids)
        with torch.inference_mode():
            theirs = hf(torch.tensor([ids])).logits
        assert ours.shape == theirs.shape == (1, len(ids), 49152)
        diff = (ours - theirs).abs().max().item()
        assert diff <= REFERENCE_ATOL, f"{prompt!r}: max abs diff {diff}"


def test_spans_equal_whole_model(converted, local, tokenizer):
    ids = tokenizer.encode(PROMPTS[2]).ids
    client = ClientModel.load(converted)
    spans = [SpanModel.load(converted, a, b) for a, b in [(0, 10), (10, 20), (20, 30)]]
    caches = [span.new_cache(len(ids) + 1) for span in spans]

    def step(token_ids: list[int], start_pos: int) -> torch.Tensor:
        hidden = client.embed(token_ids)
        for span, cache in zip(spans, caches):
            hidden = span.forward(hidden, cache, start_pos)
        return client.logits(hidden)

    whole_cache = local.new_cache(len(ids) + 1)
    split = step(ids, 0)
    whole = local.forward(ids, whole_cache, 0)
    assert (split - whole).abs().max().item() <= SPLIT_ATOL
    next_id = int(whole[0, -1].argmax())
    split = step([next_id], len(ids))
    whole = local.forward([next_id], whole_cache, len(ids))
    assert (split - whole).abs().max().item() <= SPLIT_ATOL
    assert [c.length for c in caches] == [len(ids) + 1] * 3


def test_incremental_decoding_equals_full_forward(local, tokenizer):
    ids = tokenizer.encode(PROMPTS[2]).ids
    full = full_logits(local, ids)
    cache = local.new_cache(len(ids))
    prefill = 5
    pieces = [local.forward(ids[:prefill], cache, 0)]
    # One chunk of 3 after the prefill exercises the bottom-right causal mask (T > 1, start_pos > 0).
    pieces.append(local.forward(ids[prefill : prefill + 3], cache, prefill))
    for pos in range(prefill + 3, len(ids)):
        pieces.append(local.forward([ids[pos]], cache, pos))
    incremental = torch.cat(pieces, dim=1)
    assert cache.length == len(ids)
    assert (incremental - full).abs().max().item() <= REFERENCE_ATOL


class _Crash(Exception):
    pass


def test_conversion_is_deterministic_and_survives_a_crash(converted, tmp_path):
    def crash_midway(done, total, what):
        if done == 40:
            raise _Crash

    with pytest.raises(_Crash):
        convert_gguf(find_default_gguf(), tmp_path, progress=crash_midway)
    assert not (tmp_path / COMPLETE_MARKER).exists()

    calls = []
    again = load_or_convert(tmp_path, progress=lambda done, total, what: calls.append((done, total)))
    assert calls[-1] == (272, 272)  # the crashed conversion is redone, every GGUF tensor once
    names = ["client.safetensors", "tokenizer.json", "config.json"] + [
        f"block_{i:04d}.safetensors" for i in range(converted.config.n_layers)
    ]
    for name in names:
        first = hashlib.sha256((converted.dir / name).read_bytes()).hexdigest()
        second = hashlib.sha256((again.dir / name).read_bytes()).hexdigest()
        assert first == second, name
    assert again.block_path(29).name == "block_0029.safetensors"
    assert not list(again.dir.glob("*.tmp-*"))

    calls.clear()
    load_or_convert(again.dir, progress=lambda done, total, what: calls.append(done))
    assert calls == []  # complete: nothing redone


STRINGS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines",
    "Ünïcödé — 日本語 and emoji 🎉",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def test_tokenizer_round_trips_and_matches_transformers(tokenizer, hf_tokenizer):
    for text in STRINGS:
        ours = tokenizer.encode(text).ids
        assert ours == hf_tokenizer(text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(ours, skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_start|>").ids == [1]
    assert tokenizer.encode("<|im_end|>").ids == [2]


def test_tokenizer_splits_digits_like_llama_cpp_smollm(tokenizer):
    # GGUF `tokenizer.ggml.pre = smollm`: each digit is its own pre-token. (transformers' GGUF
    # tokenizer ignores this and may merge digits, so it is not the reference here.)
    ids = tokenizer.encode("in 2024").ids
    assert [tokenizer.decode([i]) for i in ids] == ["in", " ", "2", "0", "2", "4"]


def test_chat_format_matches_template(converted, tokenizer, hf_tokenizer):
    prompt = "What is 2+2?"
    ours = format_chat(converted, prompt)
    assert ours == format_chat(converted.chat_template, prompt) == format_chat(tokenizer, prompt)
    theirs = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    bare = format_chat(converted, prompt, system="")
    assert bare == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_position_mismatch_and_cache_overflow(converted, local):
    span = SpanModel.load(converted, 3, 5)
    cache = span.new_cache(4)
    hidden = local.client.embed([10, 11, 12])
    with pytest.raises(PositionMismatch):
        span.forward(hidden, cache, 1)  # ahead of the cache
    span.forward(hidden, cache, 0)
    with pytest.raises(PositionMismatch):
        span.forward(hidden[:, :1], cache, 2)  # behind the cache: callers must truncate first
    with pytest.raises(CacheOverflow):
        span.forward(hidden[:, :2], cache, 3)  # 3 + 2 > 4
    assert cache.length == 3
    cache.truncate(2)
    span.forward(hidden[:, :2], cache, 2)
    assert cache.length == 4
    with pytest.raises(ValueError):
        cache.truncate(5)


def test_kv_cache_size(converted):
    c = converted.config
    cache = KVCache.for_span(c, n_layers=10, max_length=128, dtype=torch.float32)
    assert cache.nbytes == 2 * 10 * c.n_kv_heads * 128 * c.head_dim * 4
    assert (cache.length, cache.max_length, cache.n_layers) == (0, 128, 10)


def test_greedy_generation_matches_transformers(converted, local, tokenizer, hf):
    ids = tokenizer.encode(format_chat(converted, "Write a short poem about the sea.")).ids
    ours = local.generate(ids, max_new_tokens=16)
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
    assert ours == theirs
    assert len(ours) == 16 and tokenizer.decode(ours).strip()


def test_sample_next():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_next(logits, 0.0, 1.0, None) == 1
    # A nucleus this small holds only the most likely token, whatever the draw.
    assert sample_next(logits, 1.0, 0.01, torch.Generator().manual_seed(0)) == 1
    draws = [sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(20)]
    assert draws == [sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(draws) == {1, 3}  # token 2 lies outside the 0.9 nucleus
    with pytest.raises(ValueError):
        sample_next(logits, -1.0, 0.9, None)
