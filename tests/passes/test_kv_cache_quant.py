"""The kv-cache pass with a quantized (int8 / fp8) paged cache: IR, numerics, calibration, refusals."""

import dataclasses

import pytest
import torch

import kiln
from kiln.ops import KV_CACHE_QMAX, dequantize_kv, quantize_kv
from kiln.passes.kv_cache import KV_CACHE_DTYPES, kv_cache_spec, layout_of
from kiln.quantize import Calibration, PerAxis, PerTensor, PerToken, QuantConfig, QuantSpec

BLOCK = 4
INT8 = QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True)
FP8 = QuantSpec(dtype="fp8_e4m3", granularity=PerTensor())


class Toy(torch.nn.Module):
    """Two causal GQA attention layers on kiln::attention; optionally fake-quantizes K/V per (token, head)."""

    def __init__(
        self, fake_quant: torch.dtype | None = None, static: list[list[float]] | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({
            "q": torch.nn.Linear(16, 16), "k": torch.nn.Linear(16, 8), "v": torch.nn.Linear(16, 8),
            "o": torch.nn.Linear(16, 16),
        }) for _ in range(2))  # fmt: skip
        self.head = torch.nn.Linear(16, 50)
        self.fake_quant = fake_quant
        self.static = static  # per layer (k, v) scales: fake-quantize per tensor instead
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # records (k, v) when a list

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids) + torch.sin(position_ids[..., None].float() * 0.3)  # (1, T, 16)
        b, t, _ = x.shape
        for i, layer in enumerate(self.layers):
            q = layer["q"](x).view(b, t, 4, 4).transpose(1, 2)  # (B, 4, T, 4)
            k = layer["k"](x).view(b, t, 2, 4).transpose(1, 2) * 3  # (B, 2, T, 4)
            v = layer["v"](x).view(b, t, 2, 4).transpose(1, 2)
            if self.seen is not None:
                self.seen.append((k, v))
            if self.fake_quant is not None and self.static is not None:  # per tensor
                sk, sv = (torch.tensor(x_) for x_ in self.static[i])
                k = dequantize_kv(quantize_kv(k, self.fake_quant, sk)[0], sk)
                v = dequantize_kv(quantize_kv(v, self.fake_quant, sv)[0], sv)
            elif self.fake_quant is not None:  # per (token, head)
                k, v = (dequantize_kv(*quantize_kv(x_, self.fake_quant)) for x_ in (k, v))
            a = torch.ops.kiln.attention(q, k, v, None, True, None)
            x = x + layer["o"](a.transpose(1, 2).reshape(b, t, 16))
        return self.head(x)


def _compile(model: torch.nn.Module, spec: QuantSpec, data: torch.Tensor | None = None) -> kiln.CompiledModel:
    quant = QuantConfig(
        weights=None, kv_cache=spec, calibration=Calibration(data=data, seq_len=12, progress=False)
    )
    ids, pos = torch.randint(0, 50, (1, 6)), torch.arange(6)[None]
    return kiln.compile(model, (ids, pos), config=kiln.CompileConfig(kv_cache=True, quant=quant))


def _run(compiled: kiln.CompiledModel, tokens: list[int], num_blocks: int = 8) -> torch.Tensor:
    """Prefill all but the last token, then decode the last: the logits of both steps' last rows."""
    layout = layout_of(compiled.graph_module)
    shape = [(2, num_blocks, BLOCK, h) for h in layout.num_kv_heads]
    caches = [
        torch.randint(-100, 100, (*s, d)).to(layout.storage_dtype)
        for s, d in zip(shape, layout.head_dim, strict=True)
    ]
    scales = [torch.rand(s) + 0.5 for s in shape]  # stale garbage: must be overwritten before it is read
    blocks = list(range(num_blocks))[::-1]
    out = []
    for lo, hi in ((0, len(tokens) - 1), (len(tokens) - 1, len(tokens))):
        args = {
            "input_ids": torch.tensor([tokens[lo:hi]]), "position_ids": torch.arange(lo, hi)[None],
            "slot_mapping": torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(lo, hi)]),
            "block_tables": torch.tensor([blocks], dtype=torch.int32),
            "seq_lens": torch.tensor([hi], dtype=torch.int32),
            "query_start_loc": torch.tensor([0, hi - lo], dtype=torch.int32),
            "logits_indices": torch.tensor([hi - lo - 1]),
            **{f"kv_cache_{i}": c for i, c in enumerate(caches)}, **{f"kv_scales_{i}": s for i, s in enumerate(scales)},
        }  # fmt: skip
        with torch.no_grad():
            out.append(compiled.graph_module(*[args[n] for n in layout.input_names])[0][0, 0])
    return torch.stack(out)  # (2, V)


def test_int8_per_token_cache_is_visible_in_the_ir_and_layout() -> None:
    compiled = _compile(Toy().eval(), INT8)
    text, layout = compiled.ir, layout_of(compiled.graph_module)
    assert text.count("kiln.paged_attention(") == 2 and "kiln.attention(" not in text
    assert "%kv_cache_0: i8[2, blocks, block_size, 2, 4]" in text
    assert "%kv_scales_1: f32[2, blocks, block_size, 2]" in text
    assert (
        "%kv_cache_1, %slot_mapping, %block_tables, %seq_lens, %query_start_loc, None, %kv_scales_1)" in text
    )
    assert layout.input_names[2:6] == ("kv_cache_0", "kv_cache_1", "kv_scales_0", "kv_scales_1")
    assert layout.cache_dtype == torch.int8 and layout.per_token_scales and layout.kv_quant == INT8
    assert layout.bytes_per_block(BLOCK) == 2 * 2 * BLOCK * 2 * (
        4 * 1 + 4
    )  # layers x K/V x tokens x heads x (D + scale)
    assert compiled.stats["kv-cache"]["kv_cache_quantized"] == 2


def test_int8_step_graph_equals_the_model_with_fake_quantized_kv() -> None:
    # Per-token scales depend on the token alone, so the paged graph over an int8 cache computes
    # exactly the model whose K/V rows are quantized and dequantized: prefill and decode alike.
    model = Toy().eval()
    compiled = _compile(model, INT8)
    tokens = torch.randint(0, 50, (11,)).tolist()  # 10 prefilled over 3 blocks, then a decode
    got = _run(compiled, tokens)
    with torch.no_grad():
        fq = Toy(fake_quant=torch.int8).eval()
        fq.load_state_dict(model.state_dict())
        want = torch.stack([fq(torch.tensor([tokens[:n]]), torch.arange(n)[None])[0, -1] for n in (10, 11)])
        exact = torch.stack(
            [model(torch.tensor([tokens[:n]]), torch.arange(n)[None])[0, -1] for n in (10, 11)]
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, exact, rtol=1e-5, atol=1e-5)  # quantization happened ...
    torch.testing.assert_close(got, exact, rtol=0.05, atol=0.05)  # ... and cost little


def test_fp8_per_tensor_scales_are_calibrated_constants() -> None:
    model = Toy().eval()
    data = torch.randint(0, 50, (40,))
    compiled = _compile(model, FP8, data)
    text, layout = compiled.ir, layout_of(compiled.graph_module)
    assert "%kv_cache_0: f8e4m3[2, blocks, block_size, 2, 4]" in text and "kv_scales" not in str(
        layout.input_names
    )
    assert '%kv_scales_0 = weight "kv_scales_0" : f32[2]' in text
    assert compiled.stats["kv-cache"]["kv_scales_calibrated"] == 2
    # the scales are amax / 448 of each layer's keys and values over the calibration windows
    model.seen = []
    with torch.no_grad():
        for w in (data[:12], data[14:26], data[28:40]):  # samples_of's 3 evenly spread windows of 12
            model(w[None], torch.arange(12)[None])
    for i in range(2):
        seen = model.seen[i::2]
        want = [
            max(x[j].abs().max().item() for x in seen) / KV_CACHE_QMAX[torch.float8_e4m3fn] for j in (0, 1)
        ]
        got = getattr(compiled.graph_module, f"kv_scales_{i}").tolist()
        assert got == pytest.approx(want, rel=1e-6) and layout.static_kv_scales[i] == pytest.approx(
            want, rel=1e-6
        )
    # and the graph equals the model with K/V fake-quantized at those scales
    tokens = torch.randint(0, 50, (9,)).tolist()
    model.seen = None
    fq = Toy(
        torch.float8_e4m3fn, [getattr(compiled.graph_module, f"kv_scales_{i}").tolist() for i in range(2)]
    )
    fq.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = torch.stack([fq(torch.tensor([tokens[:n]]), torch.arange(n)[None])[0, -1] for n in (8, 9)])
        exact = torch.stack([model(torch.tensor([tokens[:n]]), torch.arange(n)[None])[0, -1] for n in (8, 9)])
    got = _run(compiled, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < (got - exact).norm() / exact.norm() < 0.2  # 9%: 3 mantissa bits on D = 4 heads


def test_fp8_without_calibration_uses_unit_scales_as_vllm() -> None:
    compiled = _compile(Toy().eval(), FP8)
    assert layout_of(compiled.graph_module).static_kv_scales == ((1.0, 1.0), (1.0, 1.0))
    assert compiled.stats["kv-cache"]["kv_scales_calibrated"] == 0


def test_unquantized_graph_is_unchanged() -> None:
    ids, pos = torch.randint(0, 50, (1, 6)), torch.arange(6)[None]
    compiled = kiln.compile(Toy().eval(), (ids, pos), config=kiln.CompileConfig(kv_cache=True))
    layout = layout_of(compiled.graph_module)
    assert (
        "kv_scales" not in compiled.ir and layout.kv_quant is None and layout.storage_dtype == torch.float32
    )
    assert "%query_start_loc, None, None)" in compiled.ir  # no scale, no kv_scales (given as None)


def test_refusals_say_what_to_change() -> None:
    ids, pos = torch.randint(0, 50, (1, 6)), torch.arange(6)[None]
    with pytest.raises(kiln.ConfigError, match=r"CompileConfig\(kv_cache=True"):
        kiln.compile(
            Toy().eval(),
            (ids, pos),
            config=kiln.CompileConfig(quant=QuantConfig(weights=None, kv_cache=INT8)),
        )
    with pytest.raises(kiln.PassError, match="need calibration data"):
        _compile(Toy().eval(), QuantSpec(dtype="int8", granularity=PerTensor()))
    bad = {
        "int4": QuantSpec(dtype="int4", granularity=PerToken(), dynamic=True),
        "symmetric=True": QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True, symmetric=False),
        "set dynamic=True": QuantSpec(dtype="int8", granularity=PerToken()),
        "set dynamic=False": dataclasses.replace(FP8, dynamic=True),
        r"PerToken\(\) \(one per token": QuantSpec(dtype="int8", granularity=PerAxis(0)),
    }
    for message, spec in bad.items():
        with pytest.raises(kiln.ConfigError, match=message):
            QuantConfig(weights=None, kv_cache=spec)
    with pytest.raises(kiln.ConfigError, match="kv_cache_dtype='int16'"):
        kv_cache_spec("int16")
    assert kv_cache_spec("auto") is None and kv_cache_spec("int8") == INT8 and kv_cache_spec("fp8") == FP8
    assert set(KV_CACHE_DTYPES) >= {"int8", "fp8", "fp8_e4m3"}
