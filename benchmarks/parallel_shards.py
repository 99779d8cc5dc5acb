"""Tensor-parallel shards, run one after another on one device: is the work conserved? (issue #10)

For Llama-1B- and Llama-8B-shaped models (``--layers`` decoder layers, the real vocabulary),
this compiles kiln's paged step graph (the one ``kiln.LLM`` runs) unsharded and as every
rank's shard for TP = 2, 4, 8, with and without sequence parallelism, all in one process
(``kiln.parallel.compile_shards``). Then:

1. check: the shards run side by side with their collectives done in this process
   (``run_lockstep``) reproduce the unsharded logits of a prefill and of the decode step after it;
2. time: with every collective replaced by a local stand-in (``strip_collectives``), each
   rank's shard and the unsharded graph, in the launch-ready form ``kiln.LLM`` runs (the longest
   query told on the host, ``specialize_attention``: no metadata read back), run a prefill step (one sequence of ``--prefill-tokens``)
   and a decode step (``--decode-batch`` sequences of ``--decode-context`` cached tokens each).
   On a GPU the time is the sum of the CUDA kernels' durations from ``torch.profiler`` (device
   compute, without launch gaps), mean over ``--reps`` calls after warm-up; on the CPU the
   median wall time.

The table gives, per model, phase and variant: the unsharded time, the sum of the shards'
times (what one device spends on all of them), their ratio (the target is <= 1.05: sharding
should add no work), the slowest shard (a step's compute on TP devices, before
communication), kernels per call of one shard, and the check's relative error.

    python benchmarks/parallel_shards.py            # H100, bf16: llama-1b and llama-8b shapes, 2 layers
    python benchmarks/parallel_shards.py --quick    # CPU smoke run: llama-tiny, fp32, TP = 2, 4
    python benchmarks/parallel_shards.py --quant w4a16-g128 --torch-compile --top-kernels 10  # quantized shards, inductor
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import kiln
from kiln.models.presets import from_config, get_preset
from kiln.parallel.tp_shards import compile_shards, run_lockstep, strip_collectives
from kiln.passes.kv_cache import layout_of
from kiln.runtime.model_runner import _compile
from kiln.runtime.step_inputs import specialize_attention


@dataclasses.dataclass
class Step:
    """A step's sequences: (tokens already cached, new tokens, block table)."""

    seqs: list[tuple[int, int, list[int]]]
    num_blocks: int


def prefill_step(tokens: int, block_size: int) -> Step:
    n = -(-tokens // block_size)
    return Step([(0, tokens, list(range(n)))], n)


def decode_step(batch: int, context: int, block_size: int) -> Step:
    per = context // block_size + 1
    return Step([(context, 1, list(range(i * per, (i + 1) * per))) for i in range(batch)], batch * per)


def step_inputs(gm: torch.fx.GraphModule, step: Step, block_size: int, caches: list[torch.Tensor], ids: torch.Tensor,
                constants: dict[str, Any]) -> list[Any]:  # fmt: skip
    """The paged step graph's flat inputs (as kiln.runtime.model_runner builds them)."""
    dev = caches[0].device
    pos, slots, starts, lens, last = [], [], [0], [], []
    width = max(len(b) for _, _, b in step.seqs)
    tables = torch.zeros(len(step.seqs), width, dtype=torch.int32)
    for i, (cached, new, blocks) in enumerate(step.seqs):
        pos += range(cached, cached + new)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        lens.append(cached + new)
        starts.append(starts[-1] + new)
        last.append(starts[-1] - 1)
    values = {
        "input_ids": ids[:, : len(pos)].to(dev), "position_ids": torch.tensor([pos], device=dev),
        "slot_mapping": torch.tensor(slots, device=dev), "block_tables": tables.to(dev),
        "seq_lens": torch.tensor(lens, dtype=torch.int32, device=dev),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32, device=dev),
        "logits_indices": torch.tensor(last, device=dev), **{f"kv_cache_{i}": c for i, c in enumerate(caches)}, **constants,
    }  # fmt: skip
    return [values[name] for name in layout_of(gm).input_names]


def new_caches(gm: torch.fx.GraphModule, blocks: int, block_size: int, device: torch.device) -> list[torch.Tensor]:
    layout = layout_of(gm)
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(2, blocks + 1, block_size, h, d, generator=gen, device=device).to(layout.dtype) * 0.5
            for h, d in zip(layout.num_kv_heads, layout.head_dim, strict=True)]  # fmt: skip


def measure(fn: Callable[[], Any], device: torch.device, reps: int, top: int = 0,
            label: str = "") -> tuple[float, float]:  # fmt: skip
    """(milliseconds per call, kernels per call): CUDA kernel time from the profiler, or CPU wall time.

    ``top`` > 0 prints the ``top`` kernels with the most device time per call (under ``label``).
    """
    for _ in range(3):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3, float("nan")
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    us = sum(e.time_range.elapsed_us() for e in kernels)  # kernels, memsets and copies on the device
    if top:
        per: dict[str, list[float]] = {}
        for e in kernels:
            per.setdefault(e.name, []).append(e.time_range.elapsed_us())
        print(f"    top kernels, {label}: {us / reps:.1f} us per call in {len(kernels) / reps:.0f} kernels")
        for name, ts in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:top]:
            print(f"      {sum(ts) / reps:8.1f} us  {len(ts) / reps:5.1f} x  {name[:90]}")
    return us / reps / 1e3, len(kernels) / reps


def _logits(out: Any) -> torch.Tensor:
    return (out[0] if isinstance(out, (list, tuple)) else out).float()


def check(base: Any, shards: list[Any], steps: list[Step], block_size: int, ids: torch.Tensor, consts: dict[str, Any],
          device: torch.device) -> float:  # fmt: skip
    """Largest relative error of the lockstep shards' logits over a prefill and the decode step after it."""
    blocks = max(s.num_blocks for s in steps)
    base_caches = new_caches(base.graph_module, blocks, block_size, device)
    rank_caches = [new_caches(s.graph_module, blocks, block_size, device) for s in shards]
    worst = 0.0
    with torch.no_grad():
        for step in steps:
            want = _logits(base.graph_module(*step_inputs(base.graph_module, step, block_size, base_caches, ids, consts)))
            ins = [step_inputs(s.graph_module, step, block_size, c, ids, consts) for s, c in zip(shards, rank_caches, strict=True)]
            got = _logits(run_lockstep([s.graph_module for s in shards], ins, per_rank=True)[0])
            worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    config = dataclasses.replace(get_preset(name), num_hidden_layers=args.layers)
    model = from_config(config, dtype=dtype, device=device)
    bs = args.block_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, max(args.prefill_tokens, args.decode_batch)), generator=gen)
    cap = kiln.capture(model, {"input_ids": ids[:, :8].to(device)})
    consts = dict(cap.constants)
    phases = {"prefill": prefill_step(args.prefill_tokens, bs), "decode": decode_step(args.decode_batch, args.decode_context, bs)}
    longer = prefill_step(args.prefill_tokens + 1, bs)  # the prompt's blocks plus room for one generated token
    check_steps = [prefill_step(args.prefill_tokens, bs), Step([(args.prefill_tokens, 1, longer.seqs[0][2])], longer.num_blocks)]

    def compiled(tp: int, sp: bool) -> list[Any]:
        par = kiln.ParallelConfig(tensor_parallel_size=tp, sequence_parallel=sp)
        quant = kiln.QuantConfig.preset(args.quant) if args.quant else None
        return compile_shards(cap, config=kiln.CompileConfig(kv_cache=True, parallel=par, quant=quant))

    def timed(gm: torch.fx.GraphModule, step: Step, label: str = "") -> tuple[float, float]:
        caches = new_caches(gm, step.num_blocks, bs, device)
        inputs = step_inputs(gm, step, bs, caches, ids, consts)
        # as kiln.LLM runs the step graph: its paged attention told the longest query on the host
        # (specialize_attention), so no step reads its metadata back from the device
        fn = specialize_attention(gm)
        inputs = [*inputs, max(new for _, new, _ in step.seqs)]
        if args.torch_compile:  # inductor, as kiln.LLM(torch_compile=True): one compile per graph and shape
            fn = _compile(fn, None, dynamic=False)
        top = args.top_kernels if label else 0
        with torch.no_grad():
            return measure(lambda: fn(*inputs), device, args.reps, top, label)

    (base,) = compiled(1, False)
    base_ms = {p: timed(base.graph_module, s, f"{name} {p} unsharded")[0] for p, s in phases.items()}
    rows = []
    for tp in args.tp:
        if config.num_attention_heads % tp:
            continue
        for sp in args.sp:
            shards = compiled(tp, sp)
            err = check(base, shards, check_steps, bs, ids, consts, device)
            for s in shards:
                strip_collectives(s.graph_module)
            for phase, step in phases.items():
                label = f"{name} {phase} tp={tp} sp={int(sp)} rank 0"
                per_rank = [timed(s.graph_module, step, label if i == 0 and tp == args.tp[0] else "")
                            for i, s in enumerate(shards)]  # fmt: skip
                total = sum(ms for ms, _ in per_rank)
                rows.append({"model": name, "phase": phase, "tp": tp, "sp": sp, "base_ms": base_ms[phase], "sum_ms": total,
                             "ratio": total / base_ms[phase], "max_ms": max(ms for ms, _ in per_rank),
                             "kernels": per_rank[0][1], "rel_err": err})  # fmt: skip
                print(f"  {name} {phase:7s} tp={tp} sp={int(sp)}: unsharded {base_ms[phase]:.3f} ms, shards {total:.3f} ms "
                      f"({total / base_ms[phase]:.3f}x), check {err:.1e}", flush=True)  # fmt: skip
            del shards
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: llama-tiny, fp32, small shapes, TP = 2, 4")
    p.add_argument("--models", default="llama-1b,llama-8b")
    p.add_argument("--tp", default="2,4,8")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-context", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sp", default="0,1", help="sequence parallelism off (0) and/or on (1)")
    p.add_argument("--torch-compile", action="store_true",
                   help="run every graph (unsharded and shards) under torch.compile (inductor), as kiln.LLM(torch_compile=True)")
    p.add_argument("--quant", default=None, help="quantize first with this preset (w8a16, w4a16-g128, fp8): the shards "
                   "hold slices of the codes and scales")
    p.add_argument("--top-kernels", type=int, default=0,
                   help="GPU: print the N kernels with the most time, unsharded and rank 0 at the first TP")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.tp, args.prefill_tokens, args.decode_batch, args.decode_context, args.block_size = (
            "llama-tiny", "2,4", 48, 4, 20, 4)  # fmt: skip
    args.tp = [int(t) for t in str(args.tp).split(",")]
    args.sp = [bool(int(v)) for v in str(args.sp).split(",")]
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # small CPU ops: one thread times the work, not thread hand-offs
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.manual_seed(0)
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# parallel_shards: {gpu}, torch {torch.__version__}, {dtype}, layers={args.layers}, "
          f"prefill {args.prefill_tokens} tokens, decode {args.decode_batch} x {args.decode_context} cached"
          f"{', torch.compile' if args.torch_compile else ''}{', ' + args.quant if args.quant else ''}", flush=True)  # fmt: skip
    rows = [r for name in args.models.split(",") for r in run_model(name, args, device, dtype)]
    print(f"\n{'model':10s} {'phase':7s} {'TP':>2s} {'SP':>2s} {'unsharded ms':>12s} {'sum shards ms':>13s} {'ratio':>6s} "
          f"{'max shard ms':>12s} {'kernels':>7s} {'rel err':>8s}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:10s} {r['phase']:7s} {r['tp']:2d} {int(r['sp']):2d} {r['base_ms']:12.3f} {r['sum_ms']:13.3f} "
              f"{r['ratio']:6.3f} {r['max_ms']:12.3f} {r['kernels']:7.0f} {r['rel_err']:8.1e}")  # fmt: skip
    ok_check = all(r["rel_err"] <= tol for r in rows)
    within = [r for r in rows if r["ratio"] <= 1.05]
    print(f"\nchecks (lockstep shards vs unsharded, rel err <= {tol:g}): {'pass' if ok_check else 'FAIL'}")
    names = sorted({"{model} {phase} tp={tp} sp={sp:d}".format(**r) for r in within})
    print(f"sum of shards <= 1.05x unsharded: {len(within)} of {len(rows)} ({', '.join(names) or 'none'})")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if ok_check else 1


if __name__ == "__main__":
    raise SystemExit(main())
