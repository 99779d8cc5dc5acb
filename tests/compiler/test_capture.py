import pytest
import torch
from kiln_testing import hf_llama

import kiln
from kiln.ir import print_ir


def test_token_axis_is_dynamic_by_default() -> None:
    model = hf_llama()
    cap = kiln.capture(model, {"input_ids": torch.randint(0, 128, (1, 8))})
    text = print_ir(cap.gm)
    assert "%input_ids: i64[1, T]" in text
    assert cap.constants == {"use_cache": False}  # HF models get use_cache=False
    for tokens in (1, 3, 30):
        ids = torch.randint(0, 128, (1, tokens))
        out = cap.gm(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(out, model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_static_capture_keeps_shapes() -> None:
    cap = kiln.capture(hf_llama(layers=1), {"input_ids": torch.randint(0, 128, (1, 8))}, dynamic=False)
    assert "%input_ids: i64[1, 8]" in print_ir(cap.gm)


def test_named_dynamic_axes() -> None:
    class Add(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    cap = kiln.capture(Add(), (torch.randn(3, 5),), dynamic={"x": {0: "batch"}})
    assert "%x: f32[batch, 5]" in print_ir(cap.gm)


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor value
            return x * 2
        return x


def test_unexportable_model_gets_typed_error_with_source_line() -> None:
    with pytest.raises(kiln.UnsupportedModelError) as info:
        kiln.capture(DataDependent(), (torch.randn(2, 4),), dynamic={"x": {0: "n"}})
    message = str(info.value)
    assert "data-dependent" in message
    assert "test_capture.py" in message and "if x.sum() > 0" in message
    assert "try:" in message


class FixedLength(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float().reshape(1, 2, 4)  # holds for 8 tokens only


class AtMost16(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        torch._check(input_ids.shape[1] <= 16)  # narrows the token range below the model's maximum
        return input_ids * 2


class SkipsFive(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids * (3 if input_ids.shape[1] == 5 else 2)  # a guard T != 5, the range untouched


class EvenOnly(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float().reshape(1, -1, 2)  # a guard T % 2 == 0


@pytest.mark.parametrize(
    "model", [FixedLength(), AtMost16(), SkipsFive(), EvenOnly()], ids=["fixed", "narrowed", "not-five", "even"]
)
def test_a_real_specialization_of_the_token_axis_is_refused(model: torch.nn.Module) -> None:
    # the retry with Dim.DYNAMIC hints (for guards older torch cannot prove) must not accept a fixed or
    # narrowed token range
    with pytest.raises(kiln.UnsupportedModelError, match="specialized"):
        kiln.capture(model, {"input_ids": torch.randint(0, 128, (1, 8))})


def test_single_token_example_is_rejected_with_advice() -> None:
    with pytest.raises(kiln.ConfigError, match="at least 2 tokens"):
        kiln.capture(hf_llama(layers=1), {"input_ids": torch.randint(0, 128, (1, 1))})


def test_capture_restores_training_mode() -> None:
    model = hf_llama(layers=1).train()
    kiln.capture(model, {"input_ids": torch.randint(0, 128, (1, 4))})
    assert all(m.training for m in model.modules())


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(kiln.ConfigError, match="do not match"):
        kiln.capture(torch.nn.Linear(2, 2), (torch.randn(2, 2), torch.randn(2, 2)))
    with pytest.raises(kiln.ConfigError):
        kiln.capture("not a module", ())  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the guard comes from CUDA's attention backends")
def test_fp32_model_on_cuda_keeps_the_token_axis_dynamic() -> None:
    # fp32 SDPA on CUDA traced with the memory-efficient backend specialized the token count; traced with the
    # math backend it stays dynamic, and the graph serves other lengths
    from kiln.models import from_preset

    model = from_preset("llama-tiny", seed=0).eval().cuda()
    cap = kiln.capture(model, {"input_ids": torch.randint(0, 512, (1, 8), device="cuda")})
    for n in (3, 11):
        ids = torch.randint(0, 512, (1, n), device="cuda")
        torch.testing.assert_close(cap.gm(input_ids=ids), model(input_ids=ids), rtol=1e-4, atol=1e-4)


class ContextRegions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # exported as wrap_with_set_grad_enabled(False, submod, x)
            y = x * 2 + 1
        with torch.autocast("cpu", enabled=False):  # wrap_with_autocast(..., enabled=False, ...)
            z = y.float() @ self.w
        return z.relu()


class NestedRegions(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # transformers 4.5x's rotary embedding: autocast(False) inside no_grad
            with torch.autocast("cpu", enabled=False):
                y = x.float() * 3
            y = y + 1
        return y.cos()


def test_nested_context_regions_are_inlined() -> None:
    from kiln.ir import verify

    model = NestedRegions()
    cap = kiln.capture(model, (torch.randn(2, 5),), dynamic=False)
    assert not any("wrap_with" in str(n.target) or n.op == "get_attr" for n in cap.gm.graph.nodes)
    verify(cap.gm)
    x = torch.randn(2, 5)
    torch.testing.assert_close(cap.gm(x=x), model(x))


def test_no_grad_and_disabled_autocast_regions_are_inlined() -> None:
    from kiln.ir import verify

    model = ContextRegions()
    cap = kiln.capture(model, (torch.randn(3, 4),), dynamic=False)
    targets = [str(n.target) for n in cap.gm.graph.nodes if n.op == "call_function"]
    assert not any("wrap_with" in t or "WrapWith" in t for t in targets), targets
    assert not any(n.op == "get_attr" and "submod" in str(n.target) for n in cap.gm.graph.nodes)
    verify(cap.gm)  # every get_attr is a tensor again
    x = torch.randn(3, 4, requires_grad=True)
    out = cap.gm(x=x)
    torch.testing.assert_close(out, model(x))
    # the no-grad region's output is detached, as in the model: no gradient reaches x
    (gx,) = torch.autograd.grad(out.sum(), [x], allow_unused=True)
    assert gx is None and out.requires_grad  # ... while the weight's path keeps its gradient
    assert isinstance(cap.module(), torch.fx.GraphModule)
    assert not any("wrap_with" in str(n.target) for n in cap.module().graph.nodes)
