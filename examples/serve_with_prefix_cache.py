"""Serve the shipped teacher: a pinned document many questions follow, streaming, and the engine's stats.

    python examples/serve_with_prefix_cache.py

The document's KV blocks are computed by the first request and kept (``pin_prefix``) until
released; the later requests find them in the prefix cache and compute only their own tokens.
Runs on the CPU in a few seconds (on a GPU the steps replay CUDA graphs).
"""

from pathlib import Path

import kiln

TEACHER = Path(__file__).resolve().parents[1] / "models" / "kiln-teacher"
DOCUMENT = '''class LRUCache:
    """A mapping that forgets its least recently used keys beyond a capacity."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.data = {}
'''
# Each prompt ends inside the indentation of a body ("\n" + 8 spaces is one token the model knows).
QUESTIONS = ["    def get(self, key):\n        ", "    def put(self, key, value):\n        ",
             "    def __len__(self):\n        "]


def main() -> None:
    llm = kiln.LLM(str(TEACHER), max_num_seqs=4, kv_cache_memory=32 * 2**20)
    handle = llm.pin_prefix(DOCUMENT)  # keep the document's KV until released
    params = kiln.SamplingParams(temperature=0, max_tokens=24, stop=["\n\n"])
    # The first request computes the document's blocks; requests scheduled after it reuse them.
    outs = llm.generate([DOCUMENT + QUESTIONS[0]], params, use_tqdm=False)
    outs += llm.generate([DOCUMENT + q for q in QUESTIONS[1:]], params, use_tqdm=False)
    for q, out in zip(QUESTIONS, outs, strict=True):
        print(f"--- {q.strip()}  ({out.num_cached_tokens} prompt tokens from the prefix cache)")
        print(q + out.outputs[0].text)
    print("--- streamed:")
    text = ""
    for snapshot in llm.stream(DOCUMENT + "    def clear(self):\n        ", params):
        new = snapshot.outputs[0].text[len(text):]
        text = snapshot.outputs[0].text
        print(new, end="", flush=True)
    print()
    llm.release(handle)
    s = llm.stats
    print(f"steps {s['steps']:.0f}, prompt tokens {s['prompt_tokens']:.0f}, generated {s['generated_tokens']:.0f}")


if __name__ == "__main__":
    main()
