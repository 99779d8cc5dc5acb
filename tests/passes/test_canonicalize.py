import re

import torch
import torch.nn.functional as F
from kiln_testing import hf_gpt2, hf_llama

import kiln
from kiln.ir import node_counts, print_ir, verify
from kiln.passes.canonicalize import Canonicalize

aten = torch.ops.aten


def _run(model: torch.nn.Module, inputs, **kw):
    cap = kiln.capture(model, inputs, **kw)
    before = print_ir(cap.gm)
    result = Canonicalize()(cap.gm)
    verify(result.gm)
    return cap, before, result


def test_hf_llama_loses_asserts_casts_and_views() -> None:
    model = hf_llama()
    ids = torch.randint(0, 128, (1, 9))
    cap, before, result = _run(model, {"input_ids": ids})
    after = print_ir(result.gm)
    assert "aten._assert_tensor_metadata" in before and "aten._assert_tensor_metadata" not in after
    assert "module _guards_fn" in before and "_guards_fn" not in after
    for gone in ("aten.transpose.int(", "aten.view(", "aten.alias("):
        assert gone not in after, gone
    assert after.count("aten.to.dtype(") < before.count("aten.to.dtype(")  # f32 -> f32 casts gone
    i64 = {m.group(1) for m in re.finditer(r"(%\w+) = .* : i64\[", after)}
    casts = re.findall(r"aten\.to\.dtype\((%\w+), f32\)", after)
    assert any(c in i64 for c in casts), casts  # an i64 -> f32 cast (positions for RoPE) is real: kept
    assert after.count("aten.permute(") > 0 and after.count("aten.reshape(") > 0
    assert result.stats["casts_removed"] > 0 and result.stats["asserts_removed"] > 0
    for tokens in (1, 4, 11):
        x = torch.randint(0, 128, (1, tokens))
        torch.testing.assert_close(
            result.gm(input_ids=x, use_cache=False).logits, model(input_ids=x, use_cache=False).logits, rtol=0, atol=0
        )


class Slices(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # named so that axis 1 is the dynamic T
        x = input_ids
        full = aten.slice.Tensor(x.unsqueeze(2), 3, 0, 9223372036854775807)  # x[:, :, None] under torch 2.11
        stepped = aten.slice.Tensor(x, 2, 0, 9223372036854775807, 2)  # every other column: real
        part = aten.slice.Tensor(x, 2, 0, 3)  # three columns: real
        return full.sum(2)[..., :3] + part + stepped


def test_slices_that_keep_the_whole_axis_are_removed() -> None:
    model = Slices()
    x = torch.randn(1, 5, 6)
    cap, before, result = _run(model, {"input_ids": x})  # axis 1 dynamic (T): the full slice is symbolic
    after = print_ir(result.gm)
    assert "aten.slice(%unsqueeze, 3, 0, 9223372036854775807)" in before.replace(".Tensor", "")
    assert ", 3, 0, 9223372036854775807)" not in after.replace(".Tensor", ""), after  # the full slice is gone
    assert "9223372036854775807, 2)" in after and ", 2, 0, 3)" in after  # the stepped and the partial stay
    for tokens in (2, 7):
        y = torch.randn(1, tokens, 6)
        torch.testing.assert_close(result.gm(input_ids=y), model(y), rtol=0, atol=0)


class TensorFill(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.tensor in forward exports as detach_(lift_fresh_copy(constant)), as transformers' mask fill does
        y = torch.where(x > 0, torch.tensor(0.0), -1e30) + x
        return y.reshape(2, 6).reshape(3, 4)  # a reshape of a reshape: folded only without mutation


def test_detach_in_place_is_not_a_mutation() -> None:
    model = TensorFill()
    cap, before, result = _run(model, (torch.randn(3, 4),), dynamic=False)
    after = print_ir(result.gm)
    assert "aten.detach_(" in before and "aten.detach_(" not in after and "aten.lift_fresh_copy(" not in after
    assert "return [%add]" in after, after  # reshape of reshape to the same shape removed: the graph counts as pure
    x = torch.randn(3, 4)
    torch.testing.assert_close(result.gm(x=x), model(x), rtol=0, atol=0)


def test_gpt2_conv1d_becomes_linear() -> None:
    model = hf_gpt2()
    cap, before, result = _run(model, {"input_ids": torch.randint(0, 128, (1, 9))})
    assert node_counts(cap.module()).get("aten.addmm", 0) == 8
    counts = node_counts(result.gm)
    assert "aten.addmm" not in counts and counts["aten.linear"] == 9
    x = torch.randint(0, 128, (1, 6))
    torch.testing.assert_close(result.gm(input_ids=x, use_cache=False).logits, model(input_ids=x, use_cache=False).logits)


class Products(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 4))
        self.b = torch.nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.matmul(x, self.w.t()) + self.b  # linear with bias, spelled out
        b = torch.bmm(x, y)  # activation x activation: stays a matmul
        c = x.transpose(1, 2).transpose(1, 2)  # identity permutation
        half = x.half().float()  # a real cast round trip: kept
        return a.sum() + b.sum() + c.sum() + half.sum() + F.dropout(x, 0.5, training=False).sum()


def test_products_and_identities() -> None:
    x, y = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    model = Products()
    cap, before, result = _run(model, (x, y), dynamic=False)
    after = print_ir(result.gm)
    assert "aten.linear(%x, %w, %b)" in after
    assert "aten.matmul(%x, %y)" in after and "aten.bmm" not in after
    assert "aten.dropout" not in after
    # must not match: casts that change dtype stay
    assert after.count("aten.to.dtype(") + after.count("aten._to_copy(") == 2
    torch.testing.assert_close(result.gm(x=x, y=y), model(x, y), rtol=1e-5, atol=1e-5)


class TrainingDropout(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, training=True) + 0.0


def test_training_dropout_is_kept() -> None:
    cap, before, result = _run(TrainingDropout(), (torch.randn(4, 4),), dynamic=False)
    assert "aten.dropout(" in print_ir(result.gm)
