"""Tensor- and pipeline-parallel generation with the shipped teacher, checked against one device.

    python examples/parallel_generate.py

``kiln.LLM(..., tensor_parallel_size=2)`` shards every layer's weights and KV heads over two
ranks; ``pipeline_parallel_size=2`` gives each rank half of the layers and their KV cache. Outside
``torchrun`` kiln starts the ranks itself (Gloo on the CPU, NCCL on GPUs). Greedy tokens equal the
single-device engine's.
"""

from pathlib import Path

import kiln

TEACHER = str(Path(__file__).resolve().parents[1] / "models" / "kiln-teacher")
PROMPTS = ["def read_config(path):\n    ", "class Stack:\n    def push(self, item):\n        "]


def main() -> None:
    params = kiln.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in kiln.LLM(TEACHER, kv_cache_memory=8 * 2**20).generate(
        PROMPTS, params, use_tqdm=False)]
    for kind in ("tensor_parallel_size", "pipeline_parallel_size"):
        llm = kiln.LLM(TEACHER, kv_cache_memory=8 * 2**20, **{kind: 2})
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        same = [o.outputs[0].token_ids for o in outs] == want
        print(f"{kind}=2: {llm.stats['steps']:.0f} steps, same tokens as one device: {same}")
        print("   ", repr(PROMPTS[0] + outs[0].outputs[0].text))
        llm.runner.close()  # stop the ranks


if __name__ == "__main__":
    main()
