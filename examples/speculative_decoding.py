"""Speculative decoding with the shipped models: prompt lookup and a draft model, same tokens as without.

    python examples/speculative_decoding.py

Greedy speculative decoding is token-identical to plain decoding, and so is seeded sampling with
prompt lookup; what changes is how many tokens each target step yields. Prints both, with the
acceptance the engine measured.
"""

from pathlib import Path

import kiln
from kiln import SpeculativeConfig

MODELS = Path(__file__).resolve().parents[1] / "models"
# Editing code that is already in the prompt: prompt lookup finds what comes next in the prompt itself.
CODE = '''def read_records(path, sep=","):
    """Return the rows of a delimited text file as lists of fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\\n")
            if not line or line.startswith("#"):
                continue
            rows.append([field.strip() for field in line.split(sep)])
    return rows


'''


def main() -> None:
    params = kiln.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = kiln.LLM(str(MODELS / "kiln-teacher"), kv_cache_memory=16 * 2**20)
    # The code, then the code again cut after a third of its tokens (on a token boundary the model knows).
    tok = plain.tokenizer
    both, size = tok.encode(CODE + CODE), len(tok.encode(CODE))
    prompt = both[: len(both) - size + size // 3]
    want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    print(f"plain: {plain.stats['steps']:.0f} steps for {len(want.token_ids)} tokens")
    ngram = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    for name, spec, extra in [
        ("prompt lookup", ngram, {"async_scheduling": False}),
        # drafts looked up, verified and fed on the device, each step launched before the host sees the last
        # one's tokens (the default on a GPU; on the CPU the same bookkeeping runs synchronously)
        ("prompt lookup, asynchronous", ngram, {"async_scheduling": True}),
        ("draft model", SpeculativeConfig(method="draft_model", draft_model=str(MODELS / "kiln-drafter-distilled"),
                                          num_speculative_tokens=4), {}),
    ]:
        llm = kiln.LLM(str(MODELS / "kiln-teacher"), kv_cache_memory=16 * 2**20, speculative=spec, **extra)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        s = llm.stats
        print(f"{name}: {s['steps']:.0f} steps for {len(out.outputs[0].token_ids)} tokens, "
              f"acceptance {s['acceptance_rate']:.2f}, {s['accepted_tokens_per_step']:.2f} tokens per verified step, "
              f"same tokens as plain: {out.outputs[0].token_ids == want.token_ids}")
    # Sampling with a seed: a prompt-lookup draft is kept exactly when it equals the target's own draw at its
    # position (keyed on the seed and the position), so the request samples the same tokens as without drafts.
    seeded = kiln.SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, seed=7, ignore_eos=True)
    alone = plain.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    llm = kiln.LLM(str(MODELS / "kiln-teacher"), kv_cache_memory=16 * 2**20, speculative=ngram, async_scheduling=True)
    got = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    print(f"sampling (T 0.8, seed 7), prompt lookup, asynchronous: acceptance {llm.stats['acceptance_rate']:.2f}, "
          f"same tokens as plain: {got == alone}")
    print("continuation:", repr(want.text))


if __name__ == "__main__":
    main()
