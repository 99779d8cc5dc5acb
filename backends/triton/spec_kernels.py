"""The device side of asynchronous prompt-lookup speculation: one program per sequence of a step.

:func:`spec_advance_triton` is :func:`kiln.runtime.spec_async.spec_advance` on the GPU (its
plain-Python reference is :func:`kiln.runtime.spec_async.spec_advance_reference`): greedy
verification of the step's drafts, the accepted tokens appended to the request's history,
the n-gram lookup of the next drafts over that history (``NgramDrafter``'s rule: the
longest n-gram from ``max_n`` down to ``min_n`` that occurred before, its latest
occurrence followed by a full ``k`` tokens, else its latest one), and the next step's input
tokens, in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.backends.triton._utils import check_triton_device, interpret_mode, next_power_of_2

_INTERPRET = interpret_mode()
_BLOCK = 512  # history positions searched per loop iteration


@triton.jit
def _spec_advance_kernel(
    best_ptr, ids_ptr, info_ptr, hist_ptr, len_ptr, real_ptr, out_ptr, nxt_ptr,
    stride_hist,
    K: tl.constexpr, KP: tl.constexpr, MIN_N: tl.constexpr, MAX_N: tl.constexpr, NP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    slot = tl.load(info_ptr + i * 5)
    r0 = tl.load(info_ptr + i * 5 + 1)
    kd = tl.load(info_ptr + i * 5 + 2)
    d0 = tl.load(info_ptr + i * 5 + 3)
    given = tl.load(info_ptr + i * 5 + 4)
    j = tl.arange(0, KP)
    out_row = out_ptr + i * (K + 5)
    nxt_row = nxt_ptr + i * (K + 1)
    if slot >= 0:
        hist = hist_ptr + slot * stride_hist
        length = tl.load(len_ptr + slot)
        real = tl.minimum(kd, tl.where(given >= 0, given, tl.load(real_ptr + slot)))
        preds = tl.load(best_ptr + r0 + j, mask=j <= kd, other=-1)
        drafts = tl.load(ids_ptr + d0 + j, mask=j < kd, other=-2)
        mismatch = (preds != drafts) | (j >= real)
        a = tl.min(tl.where(mismatch, j, KP), axis=0)  # accepted drafts: the first mismatch
        bonus = tl.sum(tl.where(j == a, preds, 0), axis=0)  # the target's token after them
        made = tl.where(j < a, drafts, bonus)
        tl.store(hist + length + j, made, mask=j <= a)
        tl.store(out_row + j, tl.where(j <= a, made, 0), mask=j < K + 1)
        tl.store(out_row + K + 1, a + 1)
        tl.store(out_row + K + 2, real)
        tl.store(out_row + K + 3, kd - a)
        length = length + a + 1
        tl.store(len_ptr + slot, length)
        tl.debug_barrier()  # the appended tokens are part of the history searched below

        # the suffix: the last MAX_N tokens (suffix[c] is token length - MAX_N + c)
        c = tl.arange(0, NP)
        suffix = tl.load(hist + length - MAX_N + c, mask=(c < MAX_N) & (length - MAX_N + c >= 0), other=-1)
        ns = tl.arange(0, NP)
        last_any = tl.full((NP,), -1, tl.int64)  # per n: the latest start of an earlier occurrence
        last_full = tl.full((NP,), -1, tl.int64)  # ... followed by K tokens
        for start in range(0, length, BLOCK):
            p = start + tl.arange(0, BLOCK).to(tl.int64)
            w0 = tl.load(hist + p, mask=p < length, other=-1)
            w1 = tl.load(hist + p + 1, mask=p + 1 < length, other=-1)
            w2 = tl.load(hist + p + 2, mask=p + 2 < length, other=-1)
            for n in tl.static_range(MIN_N, MAX_N + 1):
                # an n-gram at p equals the suffix's last n tokens: suffix[MAX_N - n + c] for c < n
                hit = p <= length - 1 - n
                hit &= w0 == tl.sum(tl.where(c == MAX_N - n, suffix, 0), axis=0)
                if n >= 2:
                    hit &= w1 == tl.sum(tl.where(c == MAX_N - n + 1, suffix, 0), axis=0)
                if n >= 3:
                    hit &= w2 == tl.sum(tl.where(c == MAX_N - n + 2, suffix, 0), axis=0)
                any_n = tl.max(tl.where(hit, p, -1), axis=0)
                full_n = tl.max(tl.where(hit & (p <= length - n - K), p, -1), axis=0)
                last_any = tl.where(ns == n, tl.maximum(last_any, any_n), last_any)
                last_full = tl.where(ns == n, tl.maximum(last_full, full_n), last_full)
        n_sel = tl.max(tl.where((last_any >= 0) & (ns >= MIN_N) & (ns <= MAX_N), ns, -1), axis=0)
        chosen = tl.where(last_full >= 0, last_full, last_any)
        p_sel = tl.sum(tl.where(ns == n_sel, chosen, 0), axis=0)
        first = p_sel + n_sel
        num = tl.where(n_sel >= 0, tl.minimum(length - first, K), 0)
        tl.store(real_ptr + slot, num)
        tl.store(out_row + K + 4, num)
        prop = tl.load(hist + first + j - 1, mask=(j >= 1) & (j - 1 < num), other=0)
        tl.store(nxt_row + j, tl.where(j == 0, bonus, prop), mask=j < K + 1)
    else:
        tl.store(out_row + j, tl.zeros((KP,), tl.int64), mask=j < K + 5)
        tl.store(nxt_row + j, tl.zeros((KP,), tl.int64), mask=j < K + 1)


def spec_advance_triton(best, input_ids, info, history, min_n: int, max_n: int):  # type: ignore[no-untyped-def]
    """:func:`kiln.runtime.spec_async.spec_advance` as one Triton launch (one program per sequence)."""
    if not 1 <= min_n <= max_n <= 3:
        raise ValueError(f"the device n-gram lookup takes 1 <= min_n <= max_n <= 3, got {min_n} and {max_n}")
    check_triton_device("spec_advance", _INTERPRET, best, input_ids, info, history.tokens)
    k = history.num_drafts
    s = info.shape[0]
    result = torch.empty(s, k + 5, dtype=torch.int64, device=best.device)
    nxt = torch.empty(s, k + 1, dtype=torch.int64, device=best.device)
    if s:
        _spec_advance_kernel[(s,)](
            best.to(torch.int64), input_ids.to(torch.int64), info, history.tokens, history.lengths, history.real,
            result, nxt, history.tokens.stride(0),
            K=k, KP=next_power_of_2(k + 5), MIN_N=min_n, MAX_N=max_n, NP=4, BLOCK=_BLOCK,
        )  # fmt: skip
    return result, nxt




@triton.jit
def _apply_feed_kernel(
    tok_ptr, stride_tok, seq_ptr, stride_seq, nt, tokens_ptr, back_ptr, stride_back,
    ids_ptr, pos_ptr, slots_ptr, lens_ptr, tables_ptr, stride_tables,
    BLOCK_SIZE: tl.constexpr, HAS_BACK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if pid < nt:  # one fed token: its input id, and (rolled back) its position and slot
        dst = tl.load(tok_ptr + pid)
        src = tl.load(tok_ptr + stride_tok + pid)
        tl.store(ids_ptr + dst, tl.load(tokens_ptr + src))
        if HAS_BACK:
            row = tl.load(tok_ptr + 2 * stride_tok + pid)
            seq = tl.load(tok_ptr + 3 * stride_tok + pid)
            p = tl.load(pos_ptr + dst) - tl.load(back_ptr + row * stride_back)
            tl.store(pos_ptr + dst, p)
            block = tl.load(tables_ptr + seq * stride_tables + p // BLOCK_SIZE).to(tl.int64)
            tl.store(slots_ptr + dst, block * BLOCK_SIZE + p % BLOCK_SIZE)
    elif HAS_BACK:  # one fed sequence: its length
        q = pid - nt
        seq = tl.load(seq_ptr + q)
        row = tl.load(seq_ptr + stride_seq + q)
        length = tl.load(lens_ptr + seq)
        tl.store(lens_ptr + seq, (length - tl.load(back_ptr + row * stride_back)).to(length.dtype))


def apply_feed_triton(views, feed, tok, seq, block_size: int) -> None:  # type: ignore[no-untyped-def]
    """:func:`kiln.runtime.step_inputs.apply_feed` as one Triton launch (a program per fed token and sequence)."""
    nt, ns = tok.shape[1], seq.shape[1]
    if not nt:
        return
    ids, pos = views["input_ids"][0], views["position_ids"][0]
    tables, lens, slots = views["block_tables"], views["seq_lens"], views["slot_mapping"]
    check_triton_device("apply_feed", _INTERPRET, tok, feed.tokens, ids)
    back = feed.rollback
    tokens = feed.tokens.contiguous()
    _apply_feed_kernel[(nt + (ns if back is not None else 0),)](
        tok, tok.stride(0), seq, seq.stride(0), nt, tokens, back if back is not None else tok,
        back.stride(0) if back is not None else 0, ids, pos, slots, lens, tables, tables.stride(0),
        BLOCK_SIZE=block_size, HAS_BACK=back is not None,
    )  # fmt: skip


__all__ = ["apply_feed_triton", "spec_advance_triton"]
