"""Greedy decode speed of LocalModel against transformers' GGUF-loaded Llama, same prompt, fp32.

    .venv/bin/python bench/model_speed.py [--tokens 64] [--cache DIR] [--threads N]

Prints tokens/s for each (prefill excluded: the clock starts after the first token) and, when
transformers is installed, a last line `ratio=<ours/hf>`.

Decoding is memory-bound, so one thread is about as fast as two on an idle 2-core machine; but when
another process holds a core, torch's default two OpenMP threads wait on each other and decoding
drops several-fold (21 -> 3 tokens/s measured). `--threads 1` shows the difference.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from node.model import LocalModel, find_default_gguf, format_chat, load_or_convert, sample_next  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."
# Decode steps timed before measuring, so one-off allocations and MKL warm-up stay out of the rate.
WARMUP_STEPS = 4


def ours_tokens_per_s(model: LocalModel, prompt_ids: list[int], n_tokens: int) -> float:
    cache = model.new_cache(len(prompt_ids) + n_tokens + WARMUP_STEPS + 1)
    logits = model.forward(prompt_ids, cache, 0, last_only=True)
    token = sample_next(logits[0, -1], 0.0, 1.0)
    for _ in range(WARMUP_STEPS):
        token = sample_next(model.forward([token], cache, cache.length, last_only=True)[0, -1], 0.0, 1.0)
    start = time.perf_counter()
    for _ in range(n_tokens):
        token = sample_next(model.forward([token], cache, cache.length, last_only=True)[0, -1], 0.0, 1.0)
    return n_tokens / (time.perf_counter() - start)


def hf_tokens_per_s(prompt_ids: list[int], n_tokens: int) -> float:
    from transformers import AutoModelForCausalLM, DynamicCache

    gguf = find_default_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([prompt_ids]), cache=cache, use_cache=True)
        token = out.logits[0, -1].argmax()
        for _ in range(WARMUP_STEPS):
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
        start = time.perf_counter()
        for _ in range(n_tokens):
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
        return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache", type=pathlib.Path, default=None, help="conversion dir (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        converted = load_or_convert(args.cache or pathlib.Path(tmp) / "smollm2")
        model = LocalModel.load(converted)
        prompt_ids = converted.load_tokenizer().encode(format_chat(converted, PROMPT)).ids
        ours = ours_tokens_per_s(model, prompt_ids, args.tokens)
        print(f"ours: {ours:.1f} tokens/s greedy, {args.tokens} tokens, {torch.get_num_threads()} threads")
        del model
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers not installed; no ratio")
            return
        hf = hf_tokens_per_s(prompt_ids, args.tokens)
        print(f"hf:   {hf:.1f} tokens/s greedy")
        print(f"ratio={ours / hf:.2f}")


if __name__ == "__main__":
    main()
