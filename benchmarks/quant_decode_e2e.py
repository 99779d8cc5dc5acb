"""The end-to-end part of ``quant_gemm.py``: batch-1 decode of the bf16 and the int4 model through kiln's
``ModelRunner`` (CUDA graphs on a GPU), timed per token and checked against reference ``qlinear``s."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quant_gemm import Bench

HBM_TBS = 3.0  # H100 SXM HBM3, ~3.35 TB/s peak; ~3.0 is what copies reach


class ReferenceQLinear:
    """``torch.fx.Interpreter`` of a step graph with every ``kiln::qlinear_*`` run by its plain-torch reference.

    ``fp32``: the reference on fp32 activations and weights (an oracle for the kernels, which sum
    exact fp32 products), its output cast back to the graph's dtype; else the op's own reference,
    which dequantizes the weights to the activations' dtype (bf16) first.
    """

    def __init__(self, gm: object, fp32: bool = False) -> None:
        import torch

        from kiln.quantize import ops as ref

        def in_fp32(fn: Callable) -> Callable:
            def run(x, *args):  # type: ignore[no-untyped-def]
                *rest, bias = args
                return fn(x.float(), *rest, bias.float() if bias is not None else None).to(x.dtype)

            return run

        refs = {torch.ops.kiln.qlinear_w4a16.default: ref.qlinear_w4a16_reference,
                torch.ops.kiln.qlinear_w8a16.default: ref.qlinear_w8a16_reference}  # fmt: skip
        if fp32:
            refs = {k: in_fp32(v) for k, v in refs.items()}

        class Interp(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):  # type: ignore[no-untyped-def]
                fn = refs.get(target)
                return fn(*args, **kwargs) if fn is not None else super().call_function(target, args, kwargs)

        self.interp = Interp(gm)  # type: ignore[arg-type]

    def __call__(self, *inputs: object) -> object:
        return self.interp.run(*inputs)


def time_steps(runner: object, ctx: int, n: int, blocks: list[int], bench: Bench) -> float:
    """Milliseconds per decode step over ``n`` steps at positions ``ctx .. ctx + n - 1``."""
    import torch

    from kiln.runtime.model_runner import SequenceStep

    if not bench.quick:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(n):
        runner.execute([SequenceStep(token_ids=[7 + i], start_position=ctx + i, block_ids=blocks)])  # type: ignore[attr-defined]
    if not bench.quick:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / n


def decode_e2e(bench: Bench, args: argparse.Namespace) -> list[tuple[str, float]]:
    """Per-token decode time of the bf16 and the int4 model through kiln's ModelRunner."""
    import torch

    with torch.no_grad():
        return _decode_e2e(bench, args)


def _decode_e2e(bench: Bench, args: argparse.Namespace) -> list[tuple[str, float]]:
    import dataclasses
    import inspect

    import torch

    import kiln
    from kiln.backends.triton import _utils
    from kiln.backends.triton import quant_gemm as qg
    from kiln.models.presets import from_config, get_preset
    from kiln.quantize import PerGroup, QuantConfig, QuantSpec
    from kiln.runtime.model_runner import ModelRunner, SequenceStep

    if "compile_config" not in inspect.signature(ModelRunner).parameters:
        raise SystemExit(
            "kiln.runtime.ModelRunner takes no compile_config: this kiln cannot run a quantized step graph"
        )
    if bench.quick:  # llama-tiny with an MLP width a group of 32 divides
        cfg = dataclasses.replace(get_preset("llama-tiny"), intermediate_size=128, num_hidden_layers=1)
        quant = QuantConfig.preset(
            "w4a16-g128", weights=QuantSpec(dtype="int4", granularity=PerGroup(32), symmetric=False)
        )
    else:
        cfg = get_preset("llama-8b")
        quant = QuantConfig.preset("w4a16-g128")
    g = quant.weights.granularity.group_size  # type: ignore[union-attr]
    variants: list[tuple[str, QuantConfig | None]] = [("bf16", None), (f"int4-g{g}", quant)]
    if args.lm_head:
        variants.append((f"int4-g{g} + LM head", dataclasses.replace(quant, skip=())))
    # (QUANT_PDL, PDL_RELEASE_LATE) per variant: the default, or the --quant-pdl-variants A/B
    default_mode = (_utils.QUANT_PDL, qg.PDL_RELEASE_LATE)
    pdl_modes = dict.fromkeys((name for name, _ in variants), default_mode)
    if args.quant_pdl_variants:  # the other two of: no PDL, PDL released after the K loop / at the start
        modes = {"without PDL": (False, True), "PDL, released after the K loop": (True, True),
                 "PDL, released at the start": (True, False)}  # fmt: skip
        shown = default_mode if default_mode[0] else (False, True)  # without PDL the release point is moot
        for label, mode in modes.items():
            if mode != shown:
                variants.append((f"int4-g{g} {label}", quant))
                pdl_modes[variants[-1][0]] = mode
    t0 = time.perf_counter()
    model = from_config(cfg, dtype=torch.bfloat16, device=bench.device)
    print(f"  model {args.model_name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B "
          f"parameters drawn in {time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip
    bs = 16
    ctx, steps = args.context, args.steps
    blocks = list(range(-(-(ctx + steps + 1) // bs)))
    results: list[tuple[str, float]] = []
    logits: dict[str, torch.Tensor] = {}
    for name, qcfg in variants:
        _utils.QUANT_PDL, qg.PDL_RELEASE_LATE = pdl_modes[name]
        t0 = time.perf_counter()
        runner = ModelRunner(model, block_size=bs, num_blocks=len(blocks) + 1,
                             compile_config=kiln.CompileConfig(kv_cache=True, quant=qcfg))  # fmt: skip
        stats = runner.compiled.stats
        qsec = sum(stats.get(p, {}).get("seconds", 0.0) for p in ("insert-qdq", "lower-qdq"))
        read = step_bytes(runner.gm)
        print(f"  {name}: compiled in {time.perf_counter() - t0:.1f}s (quantization passes {qsec:.1f}s); "
              f"a step reads {read / 1e9:.2f} GB of weights", flush=True)  # fmt: skip
        step = [SequenceStep(token_ids=[7], start_position=ctx, block_ids=blocks)]
        inputs = runner.build_inputs(step)
        out = runner.step_gm(*inputs)
        logits[name] = (out[0] if isinstance(out, (list, tuple)) else out)[0, -1].float()
        if qcfg is not None:  # the kernels' step against the same graph with the reference qlinear
            check_logits(bench, name, logits, runner.step_gm, inputs)
        t0 = time.perf_counter()
        runner.enable_cuda_graphs(max_num_seqs=1, max_model_len=len(blocks) * bs, capture=not bench.quick,
                                  torch_compile=args.torch_compile)  # fmt: skip
        print(f"  {name}: decode graph ready in {time.perf_counter() - t0:.1f}s", flush=True)
        time_steps(runner, ctx, 1 if bench.quick else 4, blocks, bench)  # warm up
        ms = statistics.median(
            time_steps(runner, ctx, steps, blocks, bench) for _ in range(1 if bench.quick else 3)
        )
        results.append((name, ms))
        roof = read / (HBM_TBS * 1e9)
        print(f"  {name}: {ms:.3f} ms per token ({1e3 / ms:.0f} tokens/s) at context {ctx}; weight-read roofline "
              f"{roof:.3f} ms ({100 * roof / ms:.0f}% of it)", flush=True)  # fmt: skip
        del runner
        if not bench.quick:
            torch.cuda.empty_cache()
    _utils.QUANT_PDL, qg.PDL_RELEASE_LATE = default_mode
    return results


def check_logits(bench: Bench, name: str, logits: dict, step_gm: object, inputs: list) -> None:
    """The quantized step's logits: kernels vs the reference ``qlinear`` (bf16 weights) vs an fp32-qlinear oracle.

    Random weights make the 32 layers chaotic: one rounding difference early on grows by the
    last layer, so both the kernels and the op's own reference (weights dequantized to bf16) sit
    some distance from the oracle (the same graph, each ``qlinear`` in fp32). The kernels pass when
    they are no farther from the oracle than the bf16 reference is (or within 3e-2 of it).
    """
    import torch

    def last(out: object) -> torch.Tensor:
        return (out[0] if isinstance(out, (list, tuple)) else out)[0, -1].float()  # type: ignore[index]

    ref16 = last(ReferenceQLinear(step_gm)(*inputs))
    oracle = last(ReferenceQLinear(step_gm, fp32=True)(*inputs))
    got = logits[name]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    e_kern, e_ref, e_pair = rel(got, oracle), rel(ref16, oracle), rel(got, ref16)
    print(f"  {name} logits, max error relative to max |logit|: kernels vs fp32-qlinear oracle {e_kern:.4f}, "
          f"bf16 reference qlinear vs oracle {e_ref:.4f}, kernels vs bf16 reference {e_pair:.4f}; top-1: kernels "
          f"{'=' if int(got.argmax()) == int(oracle.argmax()) else '!='} oracle, bf16 reference "
          f"{'=' if int(ref16.argmax()) == int(oracle.argmax()) else '!='} oracle")  # fmt: skip
    bench.check(f"decode logits {name}: kernels vs fp32-qlinear oracle", got, oracle, max(3e-2, e_ref))
    a, b = got, logits["bf16"]
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    print(f"  {name} vs bf16 model (random weights): cosine {cos:.4f}, top-1 "
          f"{'equal' if int(a.argmax()) == int(b.argmax()) else 'different'}")  # fmt: skip


def step_bytes(gm: object) -> int:
    """Bytes of the weights a decode step reads: every parameter and buffer but the embedding table."""
    import torch

    seen: set[int] = set()
    total = 0
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:  # type: ignore[attr-defined]
        if not isinstance(t, torch.Tensor) or id(t) in seen or "embed" in name:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
