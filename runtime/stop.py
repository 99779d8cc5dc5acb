"""Stop strings: find where generated text must end.

Stop strings are matched on the detokenized text, not on tokens (a string can span
tokens, and one token can hold several strings' starts), so the engine checks them after
detokenizing each step's new tokens, as vLLM's detokenizer does, then truncates the text
and ends the request with ``Scheduler.finish_request(id, FINISHED_STOPPED, stop)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class StopMatch(NamedTuple):
    """Where a stop string was found: the text ends at ``index`` (exclusive of the stop string)."""

    index: int  # position in the text where the stop string starts
    stop: str  # which stop string matched


def find_stop_string(text: str, stops: Sequence[str], *, new_text_len: int | None = None) -> StopMatch | None:
    """The earliest occurrence of any of ``stops`` in ``text``, or None.

    With ``new_text_len`` (how many characters the last step appended) only matches that
    end inside the new text are searched, so checking every step costs O(new text) and a
    stop string split across two steps is still found. Ties at one index go to the
    longest stop string.
    """
    if not stops:
        return None
    start = 0
    if new_text_len is not None:
        start = max(0, len(text) - new_text_len - max(len(s) for s in stops) + 1)
    best: StopMatch | None = None
    for stop in stops:
        i = text.find(stop, start)
        if i >= 0 and (best is None or i < best.index or (i == best.index and len(stop) > len(best.stop))):
            best = StopMatch(i, stop)
    return best


__all__ = ["StopMatch", "find_stop_string"]
