"""Prompt-lookup speculation without a host round trip per step (asynchronous speculative decoding).

In lockstep speculation the host must see each step's verified tokens before it can draft,
schedule and launch the next step, so all of its Python work adds to the GPU's time. For
prompt lookup (``SpeculativeConfig(method="ngram")``) with greedy requests, everything the
next step needs can be made on the device instead, as vLLM v1 does for asynchronous
scheduling: after each step one kernel (:func:`spec_advance`)

1. verifies the step's drafts against the target's argmax rows (greedy acceptance:
   the longest matching prefix, then the target's own token),
2. appends the accepted tokens to the request's token history kept on the device,
3. looks up the next drafts there (the same n-gram rule as
   :class:`kiln.runtime.drafters.NgramDrafter`), and
4. writes the next step's input tokens: the new last token, then ``k`` drafts.

The host schedules the next step before it knows how many drafts were accepted: it counts
every draft as accepted (an upper bound, which is what blocks are allocated for) and the
runner's feed (:class:`kiln.runtime.step_inputs.DeviceFeed`) rolls the positions, slots and sequence lengths of the
fed tokens back on the device by the rejections the previous step counted. The host learns
the tokens one step later (one device-to-host copy per step) and takes back its over-count
then, exactly as lockstep verification does.

Drafts are always ``k`` tokens per request: where the lookup finds fewer, the rest are
padding that verification counts as rejected (their positions are rolled back like any
rejected draft), so the step's shape never depends on the device's results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kiln.runtime.drafters import NgramDrafter

#: Columns of :func:`spec_advance`'s host-bound result after the ``k + 1`` tokens.
NUM_OUT, DRAFTED, ROLLBACK = 0, 1, 2
#: Columns of the per-sequence step description (``info``) that :func:`spec_advance` reads.
SLOT, FIRST_ROW, NUM_VERIFIED, DRAFT_ROW = 0, 1, 2, 3


class DeviceHistory:
    """Per-request token histories on the device, for :func:`spec_advance`.

    A request gets a slot when it first samples in asynchronous speculative mode; its known
    tokens are uploaded once then, and every later token is appended on the device.
    """

    def __init__(self, num_slots: int, max_len: int, num_drafts: int, device: torch.device) -> None:
        self.num_drafts = num_drafts
        self.tokens = torch.zeros(num_slots, max_len + num_drafts + 1, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.real = torch.zeros(num_slots, dtype=torch.int64, device=device)  # drafts last proposed (not padding)
        self.device = device
        self._free = list(range(num_slots - 1, -1, -1))
        self.slots: dict[str, int] = {}

    def slot(self, request_id: str, tokens: list[int]) -> int:
        """The request's slot; a new one is filled with ``tokens`` (the request's known tokens)."""
        s = self.slots.get(request_id)
        if s is not None:
            return s
        if not self._free:
            raise RuntimeError("no free token-history slot for asynchronous speculation (more live requests "
                               "than slots)")  # fmt: skip
        s = self.slots[request_id] = self._free.pop()
        t = torch.tensor(tokens, dtype=torch.int64)
        if self.device.type == "cuda":
            t = t.pin_memory()
        self.tokens[s, : len(tokens)].copy_(t, non_blocking=True)
        self.lengths[s] = len(tokens)
        self.real[s] = 0
        return s

    def release(self, request_id: str) -> None:
        s = self.slots.pop(request_id, None)
        if s is not None:
            self._free.append(s)

    def clear(self) -> None:
        for rid in list(self.slots):
            self.release(rid)


def spec_advance(
    best: Tensor, input_ids: Tensor, info: Tensor, history: DeviceHistory, min_n: int, max_n: int
) -> tuple[Tensor, Tensor]:
    """Verify, append, look up and feed, for every sequence of a step (see the module docstring).

    ``best`` (rows,): the target's argmax per logits row; ``input_ids`` (T,): the step's tokens;
    ``info`` (S, 4) int64: per sequence its history slot (-1: it sampled nothing), its first
    logits row, how many drafts it verified, and the token row of its first draft.
    Returns ``(result, nxt)``: result (S, k + 4) = the tokens made (first ``num_out``), then
    num_out, the real drafts verified, the positions to roll back; nxt (S, k + 1) = the next
    step's input tokens (the new last token, then k drafts). The histories advance in place.
    """
    if best.device.type == "cuda":
        from kiln.backends.triton.spec_kernels import spec_advance_triton

        return spec_advance_triton(best, input_ids, info, history, min_n, max_n)
    return spec_advance_reference(best, input_ids, info, history, min_n, max_n)


def spec_advance_reference(
    best: Tensor, input_ids: Tensor, info: Tensor, history: DeviceHistory, min_n: int, max_n: int
) -> tuple[Tensor, Tensor]:
    """:func:`spec_advance` one sequence at a time in plain Python (the CPU path and the kernels' reference)."""
    k = history.num_drafts
    result = torch.zeros(info.shape[0], k + 4, dtype=torch.int64)
    nxt = torch.zeros(info.shape[0], k + 1, dtype=torch.int64)
    lookup = NgramDrafter(min_n=min_n, max_n=max_n).lookup
    best_l, ids_l = best.tolist(), input_ids.tolist()
    for i, (slot, r0, kd, d0) in enumerate(info.tolist()):
        if slot < 0:
            continue
        real = min(kd, int(history.real[slot]))
        drafts = ids_l[d0 : d0 + kd]
        a = 0
        while a < real and drafts[a] == best_l[r0 + a]:
            a += 1
        made = [*drafts[:a], best_l[r0 + a]]
        length = int(history.lengths[slot])
        history.tokens[slot, length : length + a + 1] = torch.tensor(made)
        length += a + 1
        history.lengths[slot] = length
        proposal = lookup(history.tokens[slot, :length].tolist(), k)
        history.real[slot] = len(proposal)
        result[i, : a + 1] = torch.tensor(made)
        result[i, k + 1 + NUM_OUT] = a + 1
        result[i, k + 1 + DRAFTED] = real
        result[i, k + 1 + ROLLBACK] = kd - a
        nxt[i, 0] = made[-1]
        nxt[i, 1 : 1 + len(proposal)] = torch.tensor(proposal, dtype=torch.int64)
    dev = best.device
    return result.to(dev), nxt.to(dev)


__all__ = ["DeviceHistory", "spec_advance", "spec_advance_reference"]
