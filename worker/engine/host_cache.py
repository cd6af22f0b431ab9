"""The prefix cache's host-memory tier (llama-server's --cache-ram): sequences a slot was about to drop, saved to RAM
with the tokens they hold, so a later prompt they prefix is restored instead of computed.

Plain Python: an entry's state is whatever the context saved (llama.cpp's sequence state, a buffer of bytes); this
module only keeps the entries under a byte budget, least recently used first out, and finds the longest prefix.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count

import numpy as np

_ids = count()


@dataclass(eq=False)
class HostEntry:
    """A saved sequence: its KV cells' tokens, position by position, every one of them reusable by another prompt
    (on the CPU only cells computed in prompt steps are saved: see Scheduler._reusable_cells)."""

    tokens: list[int]
    state: np.ndarray  # the context's saved sequence (llama.cpp's state of it, bytes)
    size: int  # bytes of state
    entry_id: int = field(default_factory=lambda: next(_ids))

    @functools.cached_property
    def array(self) -> np.ndarray:
        """The tokens as int32: every admission compares the prompt with every entry (hundreds, at 8 GiB)."""
        return np.asarray(self.tokens, dtype=np.int32)


class HostCache:
    """Entries under `budget` bytes (None: no limit), least recently used evicted first."""

    def __init__(self, budget: int | None) -> None:
        if budget is not None and budget < 0:
            raise ValueError("a host cache budget is bytes >= 0, or None for no limit")
        self.budget = budget
        self._entries: collections.OrderedDict[int, HostEntry] = collections.OrderedDict()  # oldest use first
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[HostEntry]:
        return iter(list(self._entries.values()))

    def fits(self, size: int) -> bool:
        """Whether an entry of this size can be kept at all (evicting every other one if need be)."""
        return self.budget is None or size <= self.budget

    def covering(self, tokens: Sequence[int] | np.ndarray) -> HostEntry | None:
        """An entry that holds all of these tokens (they are a prefix of its own), if any."""
        wanted = np.asarray(tokens, dtype=np.int32)
        n = len(wanted)
        for entry in self._entries.values():
            if len(entry.tokens) >= n and shared_length(entry.array, wanted, n) == n:
                return entry
        return None

    def put(self, entry: HostEntry) -> tuple[list[HostEntry], list[HostEntry]]:
        """Keep an entry: (entries it replaces, because it holds all their tokens; entries evicted for room, least
        recently used first). One larger than the whole budget is not kept (fits() says so beforehand)."""
        if not self.fits(entry.size):
            return [], []
        replaced = [e for e in self._entries.values()
                    if len(e.tokens) <= len(entry.tokens) and shared_length(e.array, entry.array) == len(e.tokens)]
        for old in replaced:
            self._remove(old)
        evicted = []
        while self.budget is not None and self.bytes + entry.size > self.budget:
            _, oldest = next(iter(self._entries.items()))
            self._remove(oldest)
            evicted.append(oldest)
        self._entries[entry.entry_id] = entry
        self.bytes += entry.size
        return replaced, evicted

    def longest_prefix(self, prompt: Sequence[int] | np.ndarray,
                       limit: int | None = None) -> tuple[HostEntry | None, int]:
        """The entry sharing the longest prefix with the prompt (at most `limit` tokens of it) and that length;
        (None, 0) when none shares a token. A hit is not yet a use: touch() it once it is restored."""
        wanted = np.asarray(prompt, dtype=np.int32)
        best, best_n = None, 0
        for entry in self._entries.values():
            n = shared_length(entry.array, wanted, limit)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    def touch(self, entry: HostEntry) -> None:
        """The entry was used: it is the last to be evicted."""
        if entry.entry_id in self._entries:  # (not one evicted meanwhile)
            self._entries.move_to_end(entry.entry_id)

    def discard(self, entry: HostEntry) -> None:
        """Forget an entry (one llama.cpp would not restore)."""
        if entry.entry_id in self._entries:
            self._remove(entry)

    def _remove(self, entry: HostEntry) -> None:
        del self._entries[entry.entry_id]
        self.bytes -= entry.size


def shared_length(a: np.ndarray, b: np.ndarray, limit: int | None = None) -> int:
    """How many leading tokens two token arrays share (at most `limit`): a vectorised compare, microseconds for
    thousands of tokens, as this runs for every slot and entry at every admission."""
    n = min(len(a), len(b), len(a) if limit is None else limit)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
