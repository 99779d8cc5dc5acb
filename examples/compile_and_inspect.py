"""Compile a model, look at what each pass did, and check it still computes the same thing.

    python examples/compile_and_inspect.py [--dump-dir dumps]

Works the same for kiln's presets and for any Hugging Face causal LM built in memory.
"""

from __future__ import annotations

import argparse

import torch
import transformers

import kiln
from kiln.models import from_preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump-dir", default=None, help="write per-pass IR files and index.html here")
    args = parser.parse_args()
    torch.manual_seed(0)

    # 1. kiln's own Llama preset: capture once, run at any sequence length.
    model = from_preset("llama-tiny").eval()
    compiled = kiln.compile(model, (torch.randint(0, 512, (1, 8)),))
    print(compiled.summary())
    for tokens in (1, 17, 64):
        ids = torch.randint(0, 512, (1, tokens))
        with torch.no_grad():
            err = (compiled(ids) - model(ids)).abs().max().item()
        print(f"{tokens:3d} tokens: max |compiled - eager| = {err:.2e}")

    # 2. A Hugging Face model: same call convention, same ModelOutput.
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256)).eval()
    hf_compiled = kiln.compile(hf, {"input_ids": torch.randint(0, 256, (1, 8))})
    out = hf_compiled(input_ids=torch.randint(0, 256, (1, 12)))
    print(type(out).__name__, tuple(out.logits.shape))
    print("GPT-2's Conv1D became linear:", hf_compiled.node_counts().get("aten.linear"), "aten.linear nodes")

    # 3. Inspect: the IR text, per-pass statistics, dumps, and skipping a pass.
    print("\n".join(compiled.ir.splitlines()[:6]))
    print({name: round(s["seconds"] * 1e3, 2) for name, s in compiled.stats.items()}, "(ms per pass)")
    if args.dump_dir:
        print("dumps written to", compiled.dump(args.dump_dir))
    skipped = kiln.compile(model, (torch.randint(0, 512, (1, 8)),), config=kiln.CompileConfig(disable=("eliminate-common-subexpressions",)))
    print("nodes with CSE:", len(compiled.graph_module.graph.nodes),
          "without:", len(skipped.graph_module.graph.nodes))


if __name__ == "__main__":
    main()
