"""Quantization-aware training: the straight-through estimator, LSQ scales, training and conversion."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.errors import ConfigError
from kiln.quantize import (
    PerAxis,
    PerGroup,
    PerToken,
    QATModel,
    QuantConfig,
    QuantSpec,
    convert_qat,
    prepare_qat,
)
from kiln.quantize.ops import dequantize_reference, quantize_reference
from kiln.quantize.qat import fake_quantize
from kiln.quantize.report import quant_report
from kiln.train import TrainConfig, next_token_loss, train

W4 = QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerGroup(16), symmetric=False))
W8A8 = QuantConfig(
    weights=QuantSpec(dtype="int8", granularity=PerAxis(0)),
    activations=QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True),
    method="rtn",
)
IDS = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(5))


def _narrow_params(
    x: torch.Tensor, group: int | None, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering only ~60% of each group's range, so that some codes are clipped."""
    rows = x.reshape(-1, group) if group else x
    lo, hi = rows.amin(1) * 0.6, rows.amax(1) * 0.6
    scale = (hi - lo) / (qmax - qmin)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    shape = (x.shape[0], x.shape[1] // group) if group else (x.shape[0],)
    return scale.reshape(shape), zp.reshape(shape)


@pytest.mark.parametrize(("group", "qmin", "qmax"), [(None, -128, 127), (16, 0, 15)])
def test_ste_gradient_is_the_identity_inside_the_range_and_zero_outside(group, qmin, qmax) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 64, generator=gen)
    scale, zp = _narrow_params(x, group, qmin, qmax)
    kw = {"group_size": group} if group else {"axis": 0}
    xr = x.clone().requires_grad_(True)
    out = fake_quantize(xr, scale, zp.to(torch.int8), qmin, qmax, torch.int8, **kw)
    codes = quantize_reference(x, scale, zp.to(torch.int8), qmin, qmax, torch.int8, **kw)
    assert torch.equal(out, dequantize_reference(codes, scale, zp.to(torch.int8), **kw))  # forward = Q/DQ
    upstream = torch.randn(x.shape, generator=gen)
    out.backward(upstream)
    # the reference: torch's own fake quantization (per channel over the rows of each group)
    rows = x.reshape(-1, group) if group else x
    ref_x = rows.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(
        ref_x, scale.reshape(-1), zp.reshape(-1).int(), 0, qmin, qmax
    )
    ref.backward(upstream.reshape(rows.shape))
    torch.testing.assert_close(out.reshape(rows.shape), ref, rtol=0, atol=1e-6)
    assert torch.equal(xr.grad.reshape(rows.shape), ref_x.grad)
    r = torch.round(rows / scale.reshape(-1, 1)) + zp.reshape(-1, 1)
    inside = (r >= qmin) & (r <= qmax)
    assert 0 < inside.float().mean() < 1  # both cases occur
    g = xr.grad.reshape(rows.shape)
    assert torch.equal(g[inside], upstream.reshape(rows.shape)[inside]) and (g[~inside] == 0).all()
    assert (g[inside] != 0).all()


def test_lsq_scale_gradient_matches_torch_learnable_fake_quantize() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 48, generator=gen)
    scale, zp = _narrow_params(x, 16, 0, 15)
    upstream = torch.randn(x.shape, generator=gen)
    s = scale.clone().requires_grad_(True)
    out = fake_quantize(x, s, zp.to(torch.int8), 0, 15, torch.int8, group_size=16, grad_factor=0.5)
    out.backward(upstream)
    rows = x.reshape(-1, 16)
    s_ref = scale.reshape(-1).clone().requires_grad_(True)
    ref = torch._fake_quantize_learnable_per_channel_affine(
        rows, s_ref, zp.reshape(-1).float(), 0, 0, 15, 0.5
    )
    ref.backward(upstream.reshape(rows.shape))
    assert s.grad.shape == scale.shape and s.grad.abs().sum() > 0
    torch.testing.assert_close(s.grad.reshape(-1), s_ref.grad, rtol=1e-4, atol=1e-5)


def test_fp8_ste_clips_beyond_the_format_range() -> None:
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    scale = x.detach().abs().amax(1) * 0.5 / 448  # half the range: the largest values clip
    out = fake_quantize(x, scale, None, -448, 448, torch.float8_e4m3fn, axis=0)
    out.sum().backward()
    inside = (x.detach() / scale[:, None]).abs() <= 448
    assert 0 < inside.float().mean() < 1 and torch.equal(x.grad, inside.float())
    ref = dequantize_reference(
        quantize_reference(x.detach(), scale, None, -448, 448, torch.float8_e4m3fn, axis=0), scale, axis=0
    )
    assert torch.equal(out.detach(), ref)


@pytest.fixture(scope="module")
def prepared_w4(tiny_llama) -> QATModel:
    return prepare_qat(tiny_llama, W4, (IDS,))


def test_prepared_graph_is_the_qdq_graph_with_fake_quantize(tiny_llama, prepared_w4) -> None:
    counts = kiln.ir.node_counts(prepared_w4.graph_module)
    assert (
        counts["kiln.fake_quantize"] == 14
        and "kiln.quantize" not in counts
        and "kiln.dequantize" not in counts
    )
    assert (
        "kiln.fake_quantize" in prepared_w4.ir
        and prepared_w4.report.stats["prepare-qat"]["weights_trainable"] == 14
    )
    qdq = kiln.quantize.quantize(
        tiny_llama,
        W4,
        example_inputs=(IDS,),
        compile_config=kiln.CompileConfig(disable=("lower-qdq",), dynamic={"input_ids": {0: "B", 1: "T"}}),
    )
    x = torch.randint(0, 512, (3, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(prepared_w4(x), qdq(x), rtol=1e-5, atol=1e-5)
    names = {n for n, _ in prepared_w4.named_parameters()}
    assert (
        "graph_module.model.layers.0.mlp.down_proj.weight" in names
        and "graph_module.model.norm.weight" in names
    )


def test_gradients_reach_every_quantized_weight(prepared_w4, tiny_llama) -> None:
    prepared_w4.zero_grad()
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    next_token_loss(prepared_w4, x[:, :-1], x[:, 1:]).backward()
    gm = prepared_w4.graph_module
    for node in gm.graph.nodes:
        if node.target == torch.ops.kiln.fake_quantize.default:
            w = gm.get_parameter(str(node.args[0].target))
            assert w.grad is not None and w.grad.abs().sum() > 0, node.args[0].target
    assert gm.get_parameter("model.embed_tokens.weight").grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_llama.parameters())  # the caller's model is not part of it
    prepared_w4.zero_grad()


def test_w8a8_trains_through_dynamic_activation_quantization(tiny_llama) -> None:
    qat = prepare_qat(tiny_llama, W8A8, (IDS,), trainable="quantized")
    stats = qat.report.stats["prepare-qat"]
    assert stats["fake_quantized"] == 14 + 8 and stats["dynamic_scales_detached"] == 8
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    next_token_loss(qat, x[:, :-1], x[:, 1:]).backward()
    gm = qat.graph_module
    assert not gm.get_parameter("model.embed_tokens.weight").requires_grad  # trainable="quantized"
    assert not gm.get_parameter("model.norm.weight").requires_grad
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert gm.get_parameter(name).grad.abs().sum() > 0  # layer 0's through layer 1's activation Q/DQ
    compiled = convert_qat(qat)
    assert compiled.node_counts()["kiln.qlinear_w8a8"] == 14
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-5, atol=1e-5)
    qat.to("meta")  # moving the module moves the device constants the captured graph holds too
    devices = [n.kwargs["device"] for n in qat.graph_module.graph.nodes if n.kwargs.get("device") is not None]
    assert devices and all(torch.device(d).type == "meta" for d in devices)


@pytest.mark.parametrize("learn_scales", [False, True])
def test_qat_steps_lower_the_loss_and_convert_to_the_same_outputs(tiny_llama, learn_scales) -> None:
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    qat = prepare_qat(tiny_llama, W4, (IDS,), learn_scales=learn_scales)
    stream = torch.randint(0, 512, (48,), generator=torch.Generator().manual_seed(7)).repeat(30)  # learnable
    probe = stream[: 4 * 33].reshape(4, 33)
    with torch.no_grad():
        before = next_token_loss(qat, probe[:, :-1], probe[:, 1:]).item()
    scales0 = [p.detach().clone() for n, p in qat.named_parameters() if "_qat_" in n]
    cfg = TrainConfig(
        steps=12, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, weight_decay=0.0, progress=False
    )
    result = train(qat, stream, cfg)
    with torch.no_grad():
        after = next_token_loss(qat, probe[:, :-1], probe[:, 1:]).item()
    assert result.step == 12 and after < 0.8 * before
    scales = [p.detach() for n, p in qat.named_parameters() if "_qat_" in n]
    assert len(scales) == (14 if learn_scales else 0)
    assert all(not torch.equal(a, b) for a, b in zip(scales0, scales, strict=True))  # LSQ moved them
    compiled = convert_qat(qat)
    counts = compiled.node_counts()
    assert (
        counts["kiln.qlinear_w4a16"] == 14
        and "kiln.fake_quantize" not in counts
        and counts["kiln.attention"] == 2
    )
    assert not list(compiled.graph_module.parameters())
    x = torch.randint(0, 512, (3, 21), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), qat(x), rtol=1e-5, atol=1e-5)
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, state[k]), k  # training touched the QAT module's copies only
    rep = quant_report(tiny_llama, compiled, samples=[{"input_ids": x}])
    assert len(rep.layers) == 14  # errors of the trained, quantized weights against the original ones
    assert all(r.op == "qlinear_w4a16" and r.output_error > 0 and r.weight_error > 0 for r in rep.layers)


def test_bad_inputs_raise_config_errors(tiny_llama) -> None:
    with pytest.raises(ConfigError, match="convert_qat takes the QATModel"):
        convert_qat(tiny_llama)
    with pytest.raises(ConfigError, match="group size 128 does not divide"):
        prepare_qat(tiny_llama, "w4a16-g128", (IDS,))
    with pytest.raises(ConfigError, match="prepare_qat takes a kiln.QuantConfig"):
        prepare_qat(tiny_llama, 4, (IDS,))
    with pytest.raises(ConfigError, match="trainable='bias'.*use one of"):
        prepare_qat(tiny_llama, W4, (IDS,), trainable="bias")
    with pytest.raises(ConfigError, match="set learn_scales=True"):
        prepare_qat(tiny_llama, W4, (IDS,), trainable="scales")
