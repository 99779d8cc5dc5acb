"""Instruction counts of the quantized split-K GEMV's K loop, compiled offline for an H100 (no GPU needed).

The decode GEMVs of ``kiln.backends.triton.quant_splitk_kernels`` stream weights at only 60-65% of what a
kernel that merely loads them reaches (benchmarks/RESULTS.md, session 8), so what each K step costs in
instructions matters as much as its bytes. This script compiles :func:`wo_gemv_kernel` for sm_90 with
Triton's own ``ptxas`` (pointer and stride arguments marked 16-byte divisible, as the JIT specializes
them), disassembles it with ``nvdisasm`` and counts the SASS opcodes of its K loop (the first loop whose
back branch closes it): per step, per weight word and per code, and the ``BAR.SYNC`` / shared-memory
traffic a layout conversion inside the loop would show. No timing: the device runs say what is fast;
this says why.

    python benchmarks/gemv_sass.py                                  # int4-g128, 128 x 16 words, 4 warps
    python benchmarks/gemv_sass.py --xpre                           # the next step's x loaded ahead
    python benchmarks/gemv_sass.py --packed                         # int4 words summed in bf16x2 arithmetic
    python benchmarks/gemv_sass.py --kind int8 --block-n 32 --block-kw 64
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def compile_gemv(args: argparse.Namespace) -> tuple[bytes, int]:
    """The cubin of one GEMV configuration for sm_90, and the bytes of shared memory a program takes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kiln.backends.triton import quant_splitk_kernels as k2

    fn = k2.wo_gemv_kernel
    names = fn.arg_names
    int4 = args.kind == "int4"
    const = dict(
        WKIND=1 if int4 else 0, SMODE=2 if int4 else 1, HAS_ZP=int4, ZP_DEFAULT=0, HAS_BIAS=False,
        GW=args.group // 8 if int4 else 1, GROUP_PER_STEP=int4 and (args.group // 8) % args.block_kw == 0,
        X_CODES=False, XS_PER_ROW=False, HAS_XZP=False, IS_SPLIT=True, EVEN_K=True, XP=1, PRMT=True,
        DEPTH=args.depth, BLOCK_N=args.block_n, BLOCK_KW=args.block_kw, USE_ASM=True, USE_PDL=False,
        RELEASE_LATE=True, XPRE=args.xpre, STAGES=args.stages, PACKED=args.packed and int4,
    )  # fmt: skip
    types = {"x_ptr": "*i32", "xs_ptr": "*fp32", "xz_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp32",
             "z_ptr": "*u8", "b_ptr": "*fp32", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}  # fmt: skip
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n in ("stride_xm", "stride_wn", "stride_sn", "stride_zn",
                                                                 "stride_ym", "N", "KW")]  # fmt: skip
    src = ASTSource(
        fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )  # fmt: skip
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=args.warps, num_stages=1)
    )
    return compiled.asm["cubin"], int(compiled.metadata.shared)


def loop_opcodes(sass: str) -> list[str]:
    """Opcodes of the first loop: from the label a backward branch targets to that branch."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i + 1) < i:
            body = lines[labels[m.group(1)] : i + 1]
            ops = []
            for b in body:
                if m2 := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", b):
                    ops.append(m2.group(1))
            return ops
    raise RuntimeError("no loop found in the SASS")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=["int4", "int8"], default="int4")
    p.add_argument("--group", type=int, default=128, help="int4 group size (codes)")
    p.add_argument("--block-n", type=int, default=128)
    p.add_argument("--block-kw", type=int, default=16)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--xpre", action="store_true")
    p.add_argument("--packed", action="store_true", help="int4: each word summed in bf16x2 arithmetic (PACKED)")
    p.add_argument(
        "--stages", type=int, default=1, help="the K loop's num_stages (Triton's pipeliner; with --depth 0)"
    )
    args = p.parse_args()
    try:
        import triton

        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        cubin, shared = compile_gemv(args)
    except Exception as e:  # noqa: BLE001 - an offline compile needs Triton's NVIDIA backend and its tools
        print(f"cannot compile for sm_90 here: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout
        usage = subprocess.run(
            [str(nvdisasm.parent / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    ops = loop_opcodes(sass)
    words = args.block_n * args.block_kw / (32 * args.warps)  # weight words one thread decodes a step
    codes = words * (8 if args.kind == "int4" else 4)
    counts = collections.Counter(ops)
    print(f"{args.kind} GEMV, {args.block_n} x {args.block_kw} words, {args.warps} warps, depth {args.depth}, "
          f"xpre {args.xpre}, packed {args.packed}; triton {triton.__version__}, sm_90")  # fmt: skip
    print(f"K loop: {len(ops)} instructions a step per thread, {words:.0f} words / {codes:.0f} codes: "
          f"{len(ops) / words:.1f} per word, {len(ops) / codes:.2f} per code")  # fmt: skip
    print(f"barriers a step: {counts['BAR']}, shared loads / stores: {counts['LDS']} / {counts['STS']}, "
          f"global loads: {counts['LDG']}, async copies (LDGSTS): {counts['LDGSTS']}")  # fmt: skip
    if m := re.search(r"REG:(\d+)", usage):
        regs = int(m.group(1))
        # H100 SM: 65536 registers (allocated per warp in units of 256), 228 KB shared memory, 64 warps
        by_regs = 65536 // (args.warps * 32 * -(-regs // 8) * 8)
        by_smem = (228 * 1024) // max(1, shared + 1024)  # 1 KB reserved per block
        print(f"registers a thread: {regs}, shared memory a program: {shared} B; programs an SM can hold: "
              f"{min(by_regs, by_smem, 64 // args.warps)} (registers {by_regs}, shared memory {by_smem})")  # fmt: skip
    print("| opcode | count | per code |\n| --- | --- | --- |")
    for op, n in counts.most_common(14):
        print(f"| {op} | {n} | {n / codes:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
