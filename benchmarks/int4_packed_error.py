"""How far the packed int4 GEMV (bf16x2 word sums, ``PACKED``) lands from the exact product, beside the fp32 form.

Both forms of ``wo_gemv_kernel`` run the same int4-g128 linear (round-to-nearest codes of random weights with
zero points, bf16 x, bf16 output) and are compared with the exact fp64 product of the same codes; errors are
divided by the exact output's RMS. On a machine without a GPU the kernels run in Triton's interpreter (the packed
form through its plain-op twin, which rounds each fma once to bf16 on the fp32 bits, as the PTX does); about 10 s
a draw. The
interpreter's fp32 -> bf16 store truncates where a GPU rounds to nearest, so there both forms' errors hold up to
twice the output's rounding; the difference between the two columns is what the packed word sums cost.

    python benchmarks/int4_packed_error.py              # K 4096, N 32, three draws
    python benchmarks/int4_packed_error.py --k 14336 --draws 2
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--draws", type=int, default=3)
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kiln.backends.triton import quant_gemm as qg
    from kiln.backends.triton.quant_gemm_tune import Candidate
    from kiln.quantize import ops as ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k, n, g = args.k, args.n, args.group
    if k % g or g % 8:
        print("K must be a multiple of the group, the group of 8", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    print(f"int4-g{g}, K {k}, N {n}, bf16 x; {'GPU' if dev == 'cuda' else 'interpreter'}; errors / RMS of the exact output")
    print("| draw | fp32 form, RMS | packed, RMS | the exact rounded to bf16, RMS | fp32 form, max | packed, max | "
          "the exact rounded to bf16, max |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for draw in range(args.draws):
        w = torch.randn(n, k, generator=gen).view(n, k // g, g)
        lo, hi = w.amin(-1), w.amax(-1)
        s = (hi - lo) / 15
        z = torch.round(-lo / s).clamp(0, 15)
        q = (torch.round(w / s[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
        wp, z8 = ref.pack_int4(q), z.to(torch.uint8)
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        exact = ((q.view(n, k // g, g).double() - z[..., None].double()) * s[..., None].double()).view(n, k)
        exact = x.double() @ exact.t()

        inputs = [t.to(dev) for t in (x, wp, s, z8)]
        f32, pk = (qg.qlinear_w4a16(*inputs, g, None, candidate=Candidate("gemv", dict(
            BLOCK_N=8, BLOCK_KW=16, num_warps=1 if dev == "cpu" else 4, SPLIT=4, PRMT=True, DEPTH=1, XPRE=False,
            STAGES=1, PACKED=packed))).double().cpu() for packed in (False, True))  # fmt: skip
        rms = exact.pow(2).mean().sqrt()
        bf = exact.to(torch.bfloat16).double()
        vals = [(f32 - exact).pow(2).mean().sqrt(), (pk - exact).pow(2).mean().sqrt(), (bf - exact).pow(2).mean().sqrt(),
                (f32 - exact).abs().max(), (pk - exact).abs().max(), (bf - exact).abs().max()]  # fmt: skip
        print(f"| {draw} | " + " | ".join(f"{float(v / rms):.1e}" for v in vals) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
