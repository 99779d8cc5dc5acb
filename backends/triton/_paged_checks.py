"""Input validation and launch helpers of the paged-attention kernels (``paged_attention.py``)."""

from __future__ import annotations

import functools
from typing import NoReturn

import torch
import triton

from kiln.backends.triton._utils import check_triton_device, interpret_mode
from kiln.ops import KV_CACHE_QMAX, check_kv_scales

MAX_HEAD_DIM = 256
DECODE_MAX_SPLITS = 64
"""Most splits of one sequence's keys (the combine kernel holds (splits, D) fp32 in registers)."""
DECODE_AUTO_MAX_SPLITS = 64
"""Most splits the heuristic chooses (an explicit ``num_splits`` may go up to ``DECODE_MAX_SPLITS``), and
at most ``DECODE_COMBINE_MAX_ELEMS // head_dim`` (the combine kernel's (splits, D) fp32 tile in registers:
head dim 256 takes at most 32).

H100, 8 KV heads, D 128, bf16, batch 1: 64 splits 14.1-14.3 us at 4k keys against 32 splits' 15.4-15.7, and
32.2 us at 16k against 33.9 (session 13, two sweeps; sessions 10-11 had 64 within the spread of 32 at 16k)."""
DECODE_MIN_SPLIT_KEYS = 128
"""Fewest keys per split the heuristic chooses while the (sequence, KV head) groups fill less than half
the SMs: each program then streams a short stretch, and more of them in flight hide the memory latency.

H100, batch 1 at 1k keys: 8 splits (128 keys) 8.7-9.1 us against 4 splits' 10.6-11.3 (sessions 11 and
13); batch 4: 8 splits 15.6 us, 4 splits 16.1 (session 13). 64 keys (16 splits) measured the same as 128
at 1k, but would put a 272-key CUDA-graph step (the batch-1 decode benchmarks) on 5 splits and the
combine kernel where 128 keys keep 3 splits merged in the kernel."""
DECODE_COMBINE_MAX_ELEMS = 64 * 128
"""The largest (splits x head dim) the heuristic gives the combine kernel (64 splits of D 128 measured)."""
DECODE_LONG_CONTEXT_KEYS = 4096
"""From this many keys (the launch's ``max_seq_len``) on, the few-groups regime takes splits of
``DECODE_LONG_MIN_SPLIT_KEYS``: a long context's 64 splits need 64-key splits at 4k keys."""
DECODE_LONG_MIN_SPLIT_KEYS = 64
"""Fewest keys per split for long contexts with few groups (see ``DECODE_LONG_CONTEXT_KEYS``)."""
DECODE_WAVE_MIN_SPLIT_KEYS = 1024
"""Fewest keys per split once the groups fill half the SMs or more (a wave of programs unsplit): splits
then mostly add partial outputs to merge.

H100, session 13 (two sweeps on two machines): batch 16 (128 groups) 1 split 30.9-31.1 us at 1k keys against
4-5 splits' 33.4-33.5, 2 splits 95.4-96.4 us at 4k against 5 splits' 101.5; batch 64 (512 groups) 1 split
92.9 / 350.3 / 1379.5 us at 1k / 4k / 16k against 2 splits' 104.8 / 357.2 / 1384.7. (Session 10, before the
in-kernel merge was reworked, had measured the opposite at batch 64, 16k: 1512 against 1378 us.)"""
DECODE_PROGRAMS_PER_SM = 4
"""With fewer groups than half the SMs, the heuristic splits until about this many programs run per SM."""
DECODE_WAVE_PROGRAMS_PER_SM = 2
"""With more, about this many per SM, rounded down to a power-of-two split count (the counts measured)."""
DECODE_FUSED_MAX_SPLITS = 4
"""Most splits a decode launch always merges in the kernel (:func:`decode_combines_in_kernel`)."""
PREFILL_MAX_SPLITS = 16
"""Most splits of the keys of a prefill row block (each split is one more partial output per query row)."""
PREFILL_MIN_SPLIT_KEYS = 512
"""Fewest keys per prefill split: about eight key tiles, so a split's loop outweighs the combine."""
PREFILL_MIN_QUERY_LEN = 32
"""Shorter queries (decode-like steps, k + 1 verification rows) are not split: their steps are many and short."""
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QUANTIZED_CACHE_DTYPES = tuple(KV_CACHE_QMAX)  # int8, float8_e4m3fn: codes with kv_scales
_INTERPRET = interpret_mode()
SCALE_MODES = {"none": 0, "tensor": 1, "token": 2}
"""The kernels' ``SCALE_MODE`` constexpr for each :func:`kiln.ops.check_kv_scales` granularity."""


def _fail(name: str, msg: str) -> NoReturn:
    raise ValueError(f"{name}: {msg}")


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_cache(name: str, kv_cache: torch.Tensor) -> None:
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        _fail(name, f"kv_cache must be (2, num_blocks, block_size, Hkv, D), got {_describe(kv_cache)}")
    if kv_cache.dtype not in _SUPPORTED_DTYPES + _QUANTIZED_CACHE_DTYPES:
        _fail(
            name,
            f"kv_cache dtype {kv_cache.dtype} is not supported; use float16, bfloat16, float32, "
            "int8 or float8_e4m3fn (the last two with kv_scales)",
        )
    if not 1 <= kv_cache.shape[4] <= MAX_HEAD_DIM:
        _fail(name, f"head dim {kv_cache.shape[4]} is not supported; use 1..{MAX_HEAD_DIM}")


def _check_scales(name: str, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> int:
    """The ``SCALE_MODE`` of (cache, scales): 0 float cache, 1 static per-tensor, 2 per (token, KV head)."""
    if kv_scales is not None and not isinstance(kv_scales, torch.Tensor):
        _fail(name, f"kv_scales must be a tensor or None, got {_describe(kv_scales)}")
    try:
        mode = check_kv_scales(kv_cache, kv_scales)
    except ValueError as e:
        _fail(name, str(e))
    if kv_cache.dtype == torch.float8_e4m3fn and kv_cache.device.type == "cuda":
        if torch.cuda.get_device_capability(kv_cache.device) < (8, 9):
            _fail(name, "an fp8 e4m3 KV cache needs compute capability 8.9 or newer (Ada, Hopper); use int8")
    if kv_scales is not None:
        check_triton_device(name, _INTERPRET, kv_cache, kv_scales)
    return SCALE_MODES[mode]


def _scale_args(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> tuple:
    """Scale pointer and its (K/V, block, offset, head) strides for a kernel (the cache, unused, when absent)."""
    if kv_scales is None:
        return (kv_cache, 0, 0, 0, 0)
    if kv_scales.dim() == 1:  # (2,): per tensor
        return (kv_scales, kv_scales.stride(0), 0, 0, 0)
    return (kv_scales, *kv_scales.stride())


def _check_tokens(name: str, label: str, x: torch.Tensor, heads: int | None, d: int) -> None:
    """``x`` must be (1, H, T, D) of a supported dtype; ``heads`` (when given) and ``d`` must match."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
        _fail(name, f"{label} must be (1, H, T, D) with the tokens of all sequences on T, got {_describe(x)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        _fail(name, f"{label} dtype {x.dtype} is not supported; use float16, bfloat16 or float32")
    if x.shape[3] != d:
        _fail(name, f"{label} head dim {x.shape[3]} does not match the cache's {d}")
    if heads is not None and x.shape[1] != heads:
        _fail(name, f"{label} has {x.shape[1]} heads but the cache holds {heads} KV heads")


def _check_index(name: str, label: str, x: torch.Tensor, dims: int, size: tuple[int, ...] | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != dims or x.dtype != torch.int32:
        _fail(name, f"{label} must be a {dims}-D int32 tensor, got {_describe(x)}")
    if size is not None and tuple(x.shape[: len(size)]) != size:
        _fail(name, f"{label} must have leading shape {size} (num_seqs from seq_lens), got {tuple(x.shape)}")


def _check_attention_inputs(
    name: str,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor | None,
    kv_scales: torch.Tensor | None = None,
) -> int:
    """Validate the attention inputs; return the ``SCALE_MODE`` of the cache (see :func:`_check_scales`)."""
    _check_cache(name, kv_cache)
    _check_tokens(name, "q", q, None, kv_cache.shape[4])
    hq, hkv = q.shape[1], kv_cache.shape[3]
    if hkv == 0 or hq % hkv:
        _fail(
            name,
            f"query heads ({hq}) must be a multiple of the cache's KV heads ({hkv}) for grouped-query attention",
        )
    _check_index(name, "seq_lens", seq_lens, 1, None)
    num_seqs = seq_lens.shape[0]
    _check_index(name, "block_tables", block_tables, 2, (num_seqs,))
    if query_start_loc is not None:
        _check_index(name, "query_start_loc", query_start_loc, 1, (num_seqs + 1,))
    tensors = [q, kv_cache, block_tables, seq_lens] + (
        [query_start_loc] if query_start_loc is not None else []
    )
    check_triton_device(name, _INTERPRET, *tensors)
    return _check_scales(name, kv_cache, kv_scales)


def _check_out(name: str, out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        _fail(name, f"out must match q's shape, dtype and device {tuple(q.shape)} {q.dtype} {q.device}, "
                    f"got {tuple(out.shape)} {out.dtype} {out.device}")  # fmt: skip
    return out


def _check_count(name: str, label: str, value: object, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        _fail(name, f"{label} must be an int in [{lo}, {'inf' if hi is None else hi}], got {value!r}")
    return value  # type: ignore[return-value]


def _upcast_dot(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584): upcast, exactly.
    return _INTERPRET and dtype == torch.bfloat16


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    return kv_cache.stride()  # type: ignore[return-value]  # (K/V, block, offset, head, dim)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_fills_half_the_sms(num_seqs: int, num_kv_heads: int, num_sms: int) -> bool:
    """Whether the (sequence, KV head) groups of a decode launch alone fill half the SMs or more."""
    return 2 * num_seqs * num_kv_heads > num_sms


def decode_min_split_keys(
    num_seqs: int, num_kv_heads: int, num_sms: int, few: int | None = None, wave: int | None = None
) -> int:
    """The in-kernel key count of a split: ``few`` (``DECODE_MIN_SPLIT_KEYS``) while the groups fill less than
    half the SMs, else ``wave`` (``DECODE_WAVE_MIN_SPLIT_KEYS``). A launch that merges its splits in the kernel
    lets a sequence use only some of them (a CUDA graph sizes the splits for the cache's capacity): with few
    groups ``cdiv(length, this)`` of them, about this many keys each; once the groups fill half the SMs
    ``length // this`` (see :func:`decode_split_slack`), about this many or more each. Splits are cut on whole
    key tiles, so the last may hold fewer keys (or none). :func:`decode_num_splits` goes below it for long contexts
    (``DECODE_LONG_MIN_SPLIT_KEYS``); those launches have more splits than ``DECODE_FUSED_MAX_SPLITS`` and use
    the combine kernel, where this does not apply."""
    if decode_fills_half_the_sms(num_seqs, num_kv_heads, num_sms):
        return DECODE_WAVE_MIN_SPLIT_KEYS if wave is None else wave
    return DECODE_MIN_SPLIT_KEYS if few is None else few


def decode_split_slack(num_seqs: int, num_kv_heads: int, num_sms: int, min_keys: int) -> int:
    """The keys a sequence may hold past a multiple of ``min_keys`` before it takes one more split, in a launch
    that merges its splits in the kernel: it uses ``(length + this) // min_keys`` of them (at least 1).

    Few groups: ``min_keys - 1`` (a ceiling: more, shorter splits keep more programs in flight). Groups filling
    half the SMs: 0 (a floor: splits of about ``min_keys`` keys or more, the last cut short on whole tiles).
    H100, the TP-2 decode shard (batch 64, 4 KV heads, 256 groups, 1025 keys): its two splits of 576 + 449 keys took 55.8 us at their best tile
    (session 16) where one split of 1024 keys took 48.9-49.2 us (session 15); one key past 1024 doubled the
    partial outputs to merge and halved each program's stream.
    """
    return 0 if decode_fills_half_the_sms(num_seqs, num_kv_heads, num_sms) else max(0, min_keys - 1)


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, head_dim: int = 128
) -> int:
    """How many splits of each sequence's keys the decode kernel uses (flash-decoding's heuristic).

    Fewer (sequence, KV head) groups than half the SMs: enough splits for about
    ``DECODE_PROGRAMS_PER_SM`` programs per SM, none shorter than ``DECODE_MIN_SPLIT_KEYS`` keys
    (``DECODE_LONG_MIN_SPLIT_KEYS`` from ``DECODE_LONG_CONTEXT_KEYS`` keys on), at most
    ``DECODE_AUTO_MAX_SPLITS`` (one sequence on an H100, 132 SMs and 8 KV heads: 3 splits at 272 keys,
    8 at 1k, 16 at 2k, 64 from 4k up). More groups: about ``DECODE_WAVE_PROGRAMS_PER_SM`` per SM, none shorter than
    ``DECODE_WAVE_MIN_SPLIT_KEYS`` (whole multiples of it: :func:`decode_split_slack`), rounded down to a power
    of two (batch 16: 1 split under 2k keys, 2 from 2k up; batch 64: 1).
    """
    wave = decode_fills_half_the_sms(num_seqs, num_kv_heads, num_sms)
    per_sm = DECODE_WAVE_PROGRAMS_PER_SM if wave else DECODE_PROGRAMS_PER_SM
    by_occupancy = triton.cdiv(per_sm * num_sms, max(1, num_seqs * num_kv_heads))
    min_keys = decode_min_split_keys(num_seqs, num_kv_heads, num_sms)
    if not wave and max_seq_len >= DECODE_LONG_CONTEXT_KEYS:
        min_keys = min(min_keys, DECODE_LONG_MIN_SPLIT_KEYS)
    by_length = (max(1, max_seq_len) + decode_split_slack(num_seqs, num_kv_heads, num_sms, min_keys)) // min_keys
    most = min(DECODE_AUTO_MAX_SPLITS, max(1, DECODE_COMBINE_MAX_ELEMS // max(1, head_dim)))
    splits = max(1, min(by_occupancy, by_length, most))
    return 1 << (splits.bit_length() - 1) if wave else splits


def decode_combines_in_kernel(num_splits: int, num_seqs: int, num_kv_heads: int, num_sms: int) -> bool:
    """Whether a decode launch of ``num_splits`` splits merges them in its last-arriving split (else: the combine kernel).

    The in-kernel merge saves a launch but runs on the critical path of its (sequence, KV head)
    group, ``COMBINE_CHUNK`` partials per L2 round trip; the combine kernel loads each query head's
    partials at once. With few groups (about one wave: fewer than half the SMs) the merges are the
    kernel's tail, and above ``DECODE_FUSED_MAX_SPLITS`` splits the combine kernel wins. H100, 8 KV
    heads (benchmarks/RESULTS.md, session 11): batch 1 and 4 at 1k-16k keys 0.6-5.5 us faster with the
    combine kernel; batch 16 at 4k keys (5 splits, 128 groups) 112 us with it against 98.5 us
    merged in the kernel (session 10; another machine). Up to 4 splits the in-kernel path stays: a
    short context in a short-capacity graph writes its output directly and launches nothing more.
    """
    if num_splits <= 1:
        return False
    return num_splits <= DECODE_FUSED_MAX_SPLITS or decode_fills_half_the_sms(num_seqs, num_kv_heads, num_sms)


def prefill_num_splits(
    max_query_len: int, num_seqs: int, num_q_heads: int, max_seq_len: int, num_sms: int
) -> int:
    """How many splits of each row block's keys the prefill kernel uses.

    A prompt chunk computed over a long cached prefix (a question after a cached document: 128
    new tokens over 2k cached ones) has few query row blocks, so the plain grid (row blocks x
    sequences x query heads, 64 programs there) leaves most SMs idle while each program walks
    every cached key. As flash-decoding does for one query, the keys are then split until there
    are about two programs per SM, with about ``PREFILL_MIN_SPLIT_KEYS`` keys or more per split (counting
    ``max_seq_len``, the cache's capacity under a CUDA graph); a combine kernel merges the splits'
    partial outputs by their log-sum-exps. Long prompts (enough row blocks) and short queries
    (decode-like steps) keep one split and no combine.
    """
    if max_query_len < PREFILL_MIN_QUERY_LEN:
        return 1
    programs = triton.cdiv(max_query_len, 64) * max(1, num_seqs) * num_q_heads  # 64: a typical BLOCK_M
    if programs >= num_sms:
        return 1
    by_occupancy = triton.cdiv(2 * num_sms, programs)
    by_length = triton.cdiv(max(1, max_seq_len), PREFILL_MIN_SPLIT_KEYS)
    return max(1, min(by_occupancy, by_length, PREFILL_MAX_SPLITS))
