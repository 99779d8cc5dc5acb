import networkx as nx
import pytest
import torch
from kiln_testing import hf_llama

import kiln
from kiln.ir import print_ir, to_networkx, verify


def _capture(layers: int = 1):
    return kiln.capture(hf_llama(layers=layers), {"input_ids": torch.randint(0, 128, (1, 8))}).gm


def test_printer_is_stable_and_one_line_per_node() -> None:
    a, b = _capture(), _capture()
    text = print_ir(a)
    assert text == print_ir(b)  # deterministic across captures
    body = [line for line in text.splitlines()[2:-1]]
    assert len(body) == len(a.graph.nodes) - sum(n.op == "placeholder" for n in a.graph.nodes)


def test_printer_summarizes_weights_and_shows_provenance() -> None:
    text = print_ir(_capture())
    assert "// weights:" in text
    assert 'weight "model.layers.0.self_attn.q_proj.weight" : f32[32, 32]' in text
    assert "tensor(" not in text  # values never dumped
    linear = next(line for line in text.splitlines() if "aten.linear(" in line)
    assert ": f32[1, T, 32]" in linear
    assert "model.layers.0.self_attn.q_proj" in linear and "modeling_llama.py:" in linear


def test_verifier_accepts_captured_graph() -> None:
    verify(_capture())


def test_verifier_rejects_missing_metadata() -> None:
    gm = _capture()
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "val" in n.meta)
    del node.meta["val"]
    with pytest.raises(kiln.VerificationError, match=node.name):
        verify(gm)


def test_verifier_rejects_use_before_definition() -> None:
    gm = _capture()
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.users]
    first, user = nodes[3], next(iter(nodes[3].users))
    user.append(first)  # move the definition after its use
    with pytest.raises(kiln.VerificationError):
        verify(gm)


def test_verifier_rejects_missing_weight() -> None:
    gm = _capture()
    node = next(n for n in gm.graph.nodes if n.op == "get_attr")
    node.target = "no.such.weight"
    with pytest.raises(kiln.VerificationError, match="nonexistent attribute|missing attribute"):
        verify(gm)


def test_verifier_checks_kiln_op_invariants() -> None:
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.kiln.attention(q, k, v, None, True, None)

    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    gm = kiln.capture(Attn(), (q, k, v), dynamic=False).gm
    verify(gm)
    torch.testing.assert_close(gm(q=q, k=k, v=v), torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    # Break the invariant: k claims 3 heads, which does not divide 4 query heads.
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"][1:]:
        node.meta["val"] = node.meta["val"].new_empty((1, 3, 5, 8))
    with pytest.raises(kiln.VerificationError, match="not a multiple of kv heads"):
        verify(gm)


def test_to_networkx_is_a_dag_with_metadata() -> None:
    gm = _capture()
    g = to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert nx.is_directed_acyclic_graph(g)
    linear = next(n for n, d in g.nodes(data=True) if d["target"] == "aten.linear")
    assert g.nodes[linear]["dtype"] == torch.float32 and g.in_degree(linear) == 2


def test_attention_reference_gives_zero_for_fully_masked_rows() -> None:
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False  # query 1 may attend to nothing
    out = torch.ops.kiln.attention(q, k, v, mask, False, None)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 4))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[:, :, [0, 2]], want[:, :, [0, 2]])
