"""The paged decode kernel's autotune list (``kiln.backends.triton._paged_kernels``): which tiles are timed for which cache.

Pure host logic: the pruning hook the autotuner calls, given configs built from the tile tables.
"""

from __future__ import annotations

import torch
import triton

from kiln.backends.triton import _paged_kernels as pk


def test_decode_autotune_times_the_measured_tiles_for_a_float_cache() -> None:
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in pk.DECODE_TILES]

    def tiles(cache_dtype: torch.dtype, head_dim: int = 128) -> set[tuple[int, int, int]]:
        cache = torch.empty(2, 1, 16, 1, head_dim, dtype=cache_dtype)
        got = pk._prune_decode_configs(configs, {"Cache": cache}, HEAD_DIM_PAD=head_dim)
        return {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in got}

    assert tiles(torch.bfloat16) == tiles(torch.float16) == set(pk.DECODE_FLOAT_TILES)
    assert tiles(torch.int8) == set(pk.DECODE_TILES)  # quantized caches: every tile (not swept)
    # shared memory still bounds them: head dim 256, fp32 (2 KB a key and value row): stages x rows <= 100
    assert all(n * s * 2 * 256 * 4 <= 200 * 1024 for n, _, s in tiles(torch.float32, 256))
