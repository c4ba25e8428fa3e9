"""Greedy decode with llama.cpp (llama-cpp-python), for benchmarks/engine.py's comparison.

Runs under a Python that has llama_cpp installed (its own virtual environment, built from source
with the machine's native instruction set; this project does not depend on it). Reads one JSON
request on stdin and prints one JSON result on stdout:

    in   {"model": GGUF path, "prompt_ids": [...], "new_tokens": N, "threads": T}
    out  {"token_ids": [...], "prefill_s": s, "decode_s": s, "tokens": n, "llama_cpp": version}

The prompt goes in as token ids (the same ids our engine decodes), the sampler is greedy (top-k 1),
and the end-of-sequence token does not stop it, so every decoder produces exactly N tokens.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    import llama_cpp

    request = json.loads(sys.stdin.read())
    llm = llama_cpp.Llama(request["model"], n_ctx=2048, n_threads=request["threads"], n_threads_batch=request["threads"],
                          verbose=False, logits_all=False)
    prompt = list(request["prompt_ids"])
    started = time.perf_counter()
    llm.eval(prompt)
    tokens = [int(llm.sample(top_k=1, temp=0.0))]  # the first token comes from the prefill, as in our engine
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    while len(tokens) < request["new_tokens"]:  # decode: one forward per further token
        llm.eval([tokens[-1]])
        tokens.append(int(llm.sample(top_k=1, temp=0.0)))
    decode_s = time.perf_counter() - started
    print(json.dumps({"token_ids": tokens, "prefill_s": prefill_s, "decode_s": decode_s, "tokens": len(tokens),
                      "llama_cpp": llama_cpp.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
