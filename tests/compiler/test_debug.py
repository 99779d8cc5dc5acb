import torch
from kiln_testing import hf_llama
from torch.fx import GraphModule

import kiln
from kiln.debug import bisect
from kiln.pass_manager import Pass, PassResult
from kiln.pipeline import build_pipeline

aten = torch.ops.aten


class Noop(Pass):
    name = "noop"

    def call(self, gm: GraphModule) -> PassResult:
        return PassResult(gm, False)


class WrongRsqrt(Pass):
    """Deliberately wrong: rsqrt(x) -> sqrt(x), which runs fine but computes something else."""

    name = "wrong-rsqrt"

    def call(self, gm: GraphModule) -> PassResult:
        n = 0
        for node in gm.graph.nodes:
            if node.target == aten.rsqrt.default:
                node.target = aten.sqrt.default
                n += 1
        return PassResult(gm, bool(n), {"broken": n})


def test_bisect_finds_the_wrong_pass() -> None:
    config = kiln.CompileConfig(extra_passes=(Noop(), WrongRsqrt(), Noop()))
    result = bisect(hf_llama(layers=1), {"input_ids": torch.randint(0, 128, (1, 7))}, config=config)
    assert result.diverged and result.pass_name == "wrong-rsqrt"
    assert result.index == len(build_pipeline(kiln.CompileConfig())) + 2
    assert "aten.rsqrt(" in result.ir_before and "aten.rsqrt(" not in result.ir_after
    assert "aten.sqrt(" in result.ir_after
    assert [name for name, err in result.errors if err > 1e-5] == ["wrong-rsqrt", "noop"]
    assert "outputs diverge after pass" in str(result)


def test_bisect_reports_no_divergence_for_the_default_pipeline() -> None:
    result = bisect(hf_llama(layers=1), {"input_ids": torch.randint(0, 128, (1, 7))})
    assert not result.diverged and result.errors and all(err <= 1e-5 for _, err in result.errors)
