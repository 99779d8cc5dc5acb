import pytest
import torch
from kiln_testing import hf_llama
from torch.fx import GraphModule

import kiln
from kiln.ir import PASS_KEY
from kiln.pass_manager import Pass, PassManager, PassResult, RewriteError, copy_meta
from kiln.passes.canonicalize import Canonicalize
from kiln.passes.eliminate_dead_code import EliminateDeadCode

aten = torch.ops.aten


class SiluToSigmoidMul(Pass):
    """A correct rewrite: silu(x) -> x * sigmoid(x)."""

    name = "silu-to-sigmoid-mul"

    def call(self, gm: GraphModule) -> PassResult:
        n_rewritten = 0
        for node in list(gm.graph.nodes):
            if node.target == aten.silu.default:
                with gm.graph.inserting_before(node):
                    sig = gm.graph.call_function(aten.sigmoid.default, (node.args[0],))
                    mul = gm.graph.call_function(aten.mul.Tensor, (node.args[0], sig))
                for new in (sig, mul):
                    copy_meta(node, new)
                    kiln.ir.infer_meta(new)
                node.replace_all_uses_with(mul)
                gm.graph.erase_node(node)
                n_rewritten += 1
        return PassResult(gm, bool(n_rewritten), {"silu_rewritten": n_rewritten})


class ForgetsMetadata(Pass):
    """A broken pass: inserts a node without shape metadata."""

    name = "forgets-metadata"

    def call(self, gm: GraphModule) -> PassResult:
        node = next(n for n in gm.graph.nodes if n.target == aten.silu.default)
        with gm.graph.inserting_after(node):
            neg = gm.graph.call_function(aten.neg.default, (node,))
        node.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
        return PassResult(gm, True)


class FailsOnNode(Pass):
    name = "fails-on-node"

    def call(self, gm: GraphModule) -> PassResult:
        node = next(n for n in gm.graph.nodes if n.target == aten.silu.default)
        raise RewriteError("cannot handle this silu", node)


def _gm(model: torch.nn.Module | None = None) -> GraphModule:
    return kiln.capture(model or hf_llama(layers=1), {"input_ids": torch.randint(0, 128, (1, 6))}).gm


def test_manager_records_stats_timing_and_provenance() -> None:
    model = hf_llama(layers=1)
    gm, report = PassManager([Canonicalize(), SiluToSigmoidMul(), EliminateDeadCode()], verify_each=True).run(_gm(model))
    names = [r.name for r in report.records]
    assert names == ["canonicalize", "silu-to-sigmoid-mul", "eliminate-dead-code"]
    assert report.stats["silu-to-sigmoid-mul"]["silu_rewritten"] == 1
    assert all(r.seconds >= 0 for r in report.records)
    made = [n for n in gm.graph.nodes if n.meta.get(PASS_KEY) == "silu-to-sigmoid-mul"]
    assert {n.target for n in made} == {aten.sigmoid.default, aten.mul.Tensor}
    text = kiln.ir.print_ir(gm)
    assert "[silu-to-sigmoid-mul]" in text and "model.layers.0.mlp" in text  # provenance kept
    ids = torch.randint(0, 128, (1, 9))
    ref = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(gm(input_ids=ids, use_cache=False).logits, ref)


def test_verification_names_the_broken_pass_and_its_predecessors() -> None:
    with pytest.raises(kiln.PassError) as info:
        PassManager([Canonicalize(), ForgetsMetadata()], verify_each=True).run(_gm())
    msg = str(info.value)
    assert "'forgets-metadata' (2/2)" in msg and "no shape metadata" in msg
    assert "passes run before it: canonicalize" in msg


def test_pass_error_names_the_node_and_source_line() -> None:
    with pytest.raises(kiln.PassError) as info:
        PassManager([FailsOnNode()]).run(_gm())
    msg = str(info.value)
    assert "cannot handle this silu" in msg and "at node %silu" in msg and "model.layers.0.mlp.act_fn" in msg


def test_disable_and_print_after_change() -> None:
    printed: list[str] = []
    manager = PassManager(
        [Canonicalize(), SiluToSigmoidMul(), EliminateDeadCode()],
        disable=["silu-to-sigmoid-mul"], print_ir_after="change", printer=printed.append,
    )
    _, report = manager.run(_gm())
    assert report.records[1].skipped
    changed = [r.name for r in report.records if r.modified]
    assert changed and len(printed) == len(changed)
    assert all(f"IR after {name}" in text for name, text in zip(changed, printed, strict=True))
    with pytest.raises(kiln.KilnError, match="unknown pass"):
        PassManager([Canonicalize()], print_ir_after=["nope"])
