"""Test helpers: small Hugging Face models built from configs (no downloads), and graph helpers for pass tests."""

from __future__ import annotations


def hf_llama(layers: int = 2, kv_heads: int = 2):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_qwen2(layers: int = 2):
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


def hf_gpt2(layers: int = 2):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


HF_MODELS = {"llama": hf_llama, "qwen2": hf_qwen2, "gpt2": hf_gpt2}


def tiny_vocab_llama(seed: int, layers: int = 2, max_positions: int = 128):
    """A 12-token-vocabulary Llama with peaked distributions: a chi-square test sees every token."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions, initializer_range=0.5,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def chi_square_p(observed, probs) -> float:
    """p-value of Pearson's chi-square test of ``observed`` counts against ``probs``; outcomes with
    probability 0 must never occur, and cells expecting fewer than 5 are pooled."""
    import torch

    observed, probs = observed.double().flatten(), probs.double().flatten()
    assert observed[probs == 0].sum() == 0, "an outcome of probability 0 occurred"
    expected = probs / probs.sum() * observed.sum()
    small = (expected < 5) & (probs > 0)
    obs = torch.cat([observed[expected >= 5], observed[small].sum().reshape(1)])
    exp = torch.cat([expected[expected >= 5], expected[small].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(float(len(obs) - 1), dtype=torch.double)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def canonical_graph(module, *args):
    """``module`` captured with ``args`` and canonicalized: the graph most passes start from."""
    import kiln
    from kiln.ir import SYMBOLS_KEY
    from kiln.passes.canonicalize import Canonicalize

    cap = kiln.capture(module.eval(), args)
    gm = cap.module()
    gm.meta[SYMBOLS_KEY] = dict(cap.gm.meta.get(SYMBOLS_KEY, {}))
    Canonicalize()(gm)
    return gm


def count_op(ir: str, op: str) -> int:
    """How many lines of printed IR call ``op`` (e.g. ``"kiln.gemv"``)."""
    return sum(f"= {op}(" in line for line in ir.splitlines())


def has_attr(module, target: str) -> bool:
    """Whether the dotted attribute ``target`` exists on ``module``."""
    try:
        for part in target.split("."):
            module = getattr(module, part)
    except AttributeError:
        return False
    return True
