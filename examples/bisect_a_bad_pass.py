"""Find the pass that broke a model with ``kiln.debug.bisect``.

    python examples/bisect_a_bad_pass.py

Adds a deliberately wrong pass (it turns rsqrt into sqrt, so RMSNorm goes wrong) to the
pipeline; bisection names it and shows the IR before and after it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import kiln
from kiln.debug import bisect
from kiln.models import from_preset


class BreakRsqrt(kiln.Pass):
    """A wrong rewrite: rsqrt(x) -> sqrt(x)."""

    name = "break-rsqrt"

    def call(self, gm: GraphModule) -> kiln.PassResult:
        n = 0
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.rsqrt.default:
                node.target = torch.ops.aten.sqrt.default
                n += 1
        return kiln.PassResult(gm, n > 0, {"rsqrt_broken": n})


def main() -> None:
    torch.manual_seed(0)
    model = from_preset("llama-tiny").eval()
    config = kiln.CompileConfig(extra_passes=(BreakRsqrt(),))
    result = bisect(model, (torch.randint(0, 512, (1, 8)),), config=config)
    print(f"first diverging pass: #{result.index} {result.pass_name} (max abs error {result.max_abs_error:.3g})")
    for name, err in result.errors:
        print(f"  after {name:34s} max |compiled - eager| = {err:.3g}")
    changed = [line for line in result.ir_after.splitlines() if "aten.sqrt(" in line]
    print("IR after it, first changed line:\n" + changed[0])


if __name__ == "__main__":
    main()
