#!/usr/bin/env python3
"""llama.cpp's single-stream decoding speed on a GGUF, for `colony bench infer` (which runs
this in the same run as its own measurement, with the same prompt, tokens and threads).

Usage: llama_cpp_bench.py MODEL PROMPT_FILE TOKENS THREADS
PROMPT_FILE holds the prompt already rendered with the chat template. Prints one JSON object:
prefill and decode timings, decode tokens/s (greedy, the stop token ignored like ours).
"""
import json
import sys
import time

import llama_cpp


def main() -> None:
    model, prompt_file, tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompt = open(prompt_file, encoding="utf-8").read()
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=max(512, 64 + tokens + 4 * len(prompt) // 3),
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    # Greedy decoding one token at a time, as a chat server does for one stream.
    t1 = time.perf_counter()
    out = []
    for _ in range(tokens):
        logits = llm.scores[llm.n_tokens - 1]
        t = int(logits.argmax())
        out.append(t)
        llm.eval([t])
    decode = time.perf_counter() - t1
    print(json.dumps({
        "llama_cpp_python": llama_cpp.__version__,
        "prompt_tokens": len(ids),
        "tokens": tokens,
        "threads": threads,
        "prefill_s": prefill,
        "decode_s": decode,
        "tokens_per_s": tokens / decode,
        "ms_per_token": 1e3 * decode / tokens,
        "text": llm.detokenize(out).decode("utf-8", "replace"),
    }))


if __name__ == "__main__":
    main()
