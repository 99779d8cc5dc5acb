"""Compile time on the CPU: capture + pipeline for an 8-layer ~100M-parameter Llama.

Target (issue #2): under 10 s, capture included. Measures kiln's own Llama preset
``llama-small`` and the same shapes as a Hugging Face ``transformers`` model, each compiled
``--repeat`` times in one process (the first compile pays torch's one-time warm-up).

    python benchmarks/bench_compile_time.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import transformers

import kiln
from kiln.models import from_preset


def hf_llama_small() -> torch.nn.Module:
    c = from_preset("llama-small", device="meta").config
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def measure(name: str, model: torch.nn.Module, repeat: int) -> list[tuple[str, int, float, float, float, int]]:
    rows = []
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 1000, (1, 16))
    for i in range(repeat):
        t0 = time.perf_counter()
        compiled = kiln.compile(model, {"input_ids": ids})
        total = time.perf_counter() - t0
        passes = compiled.report.seconds
        rows.append((name if i == 0 else "", i + 1, total - passes, passes, total, params))
    with torch.no_grad():
        out = compiled(input_ids=ids)
        out = out.logits if hasattr(out, "logits") else out
        ref = model(input_ids=ids)
        ref = ref.logits if hasattr(ref, "logits") else ref
    err = (out - ref).abs().max().item()
    print(f"{name}: {params / 1e6:.1f}M params, compiled vs eager max |diff| = {err:.2e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure("kiln llama-small", from_preset("llama-small").eval(), args.repeat)
    rows += measure("transformers Llama (same shapes)", hf_llama_small(), args.repeat)
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':34s} {'run':>3s} {'capture s':>10s} {'passes s':>9s} {'total s':>8s} {'target':>7s}")
    for name, i, cap, passes, total, _ in rows:
        print(f"{name:34s} {i:3d} {cap:10.2f} {passes:9.2f} {total:8.2f} {'<10 s':>7s}")


if __name__ == "__main__":
    main()
