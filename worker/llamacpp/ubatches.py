"""How llama.cpp cuts a step over per-slot KV streams into graph evaluations, and the padding that makes them fewer.

With a KV stream per sequence, llama_decode evaluates a batch in ubatches (`split_equal`, sequential): each takes
sequences of consecutive ids, in the order they first appear in the batch, and the same number of tokens from each.
A step of prompt chunks of unequal lengths, or of busy slots with idle ones between them, is then several
evaluations, each paying the model's fixed cost again (H200, 1B shape: a step of 4 slots decoding with an idle one
between each took 7.75 ms, side by side 2.27).

Padding evens the step out: a sequence's part is followed by filler tokens at the positions after it, and an idle
sequence between busy ones gets filler alone, so that the step is one run of consecutive ids with equal counts.
Filler asks for no logits and its cells are freed right after the step is queued: later tokens overwrite them, and
nothing attends to them (causal attention: the part's own tokens come first). It costs its tokens' compute, weighed
against the evaluations it saves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# An evaluation's fixed cost in prompt tokens' compute: 1.5-3 ms a graph evaluation against ~30 us a prompt token
# (llama-bench pp512: 33k tokens/s), H200, 1B shape.
EVAL_TOKENS = 64
MAX_EVEN_LENGTHS = 6


def count_ubatches(layout: Sequence[tuple[int, int]], n_ubatch: int) -> int:
    """The ubatches llama.cpp's sequential split_equal makes of a batch of (seq_id, tokens) parts, each part's tokens
    side by side, in this order."""
    remaining = [n for _, n in layout]
    count = 0
    while True:
        chosen: list[int] = []
        last = -2
        for i, (seq, _) in enumerate(layout):
            if remaining[i] and (not chosen or seq == last + 1):
                chosen.append(i)
                last = seq
        if not chosen:
            return count
        take = min(min(remaining[i] for i in chosen), max(1, n_ubatch // len(chosen)))
        for i in chosen:
            remaining[i] -= take
        count += 1


def plan_filler(parts: Sequence[tuple[int, int, int]], next_pos: Mapping[int, int], *, room: int, n_ubatch: int,
                capacity: int) -> dict[int, int]:
    """Filler tokens for each sequence (seq_id → count) that make the step cheapest, or {} when none pays.

    `parts` are the step's (seq_id, tokens, first position) in batch order; `next_pos` the next position of each
    sequence without a part (an idle slot) whose id lies between the busy ones; `room` the positions one sequence
    may hold, `capacity` the batch's tokens. A padded step is laid out in sequence order."""
    if len(parts) < 2:
        return {}
    length = {seq: n for seq, n, _ in parts}
    lo, hi = min(length), max(length)
    if hi - lo + 1 == len(parts) and len(set(length.values())) == 1:
        return {}  # one run of equal parts (a steady decode step): one evaluation already
    end = {seq: pos + n for seq, n, pos in parts}
    # A ubatch attends over as many cells as its longest stream holds: an idle sequence longer than every busy one
    # would widen the step's attention. Such a one is not filled.
    widest = max(end.values())
    end.update({seq: p for seq, p in next_pos.items() if seq not in length and p <= widest})
    longest = max(length.values())
    spread = sorted({n for n in length.values() if n > 1})
    if len(spread) > MAX_EVEN_LENGTHS:  # the planning runs before each step: a few lengths to try, the longest kept
        step = len(spread) / MAX_EVEN_LENGTHS
        spread = sorted({spread[int(i * step)] for i in range(MAX_EVEN_LENGTHS)} | {spread[-1]})
    prompts = [seq for seq, n in length.items() if n > 1]

    def targets(run: tuple[int, int], to: int) -> dict[int, int]:
        """Every sequence of the run to `to` tokens; outside it, idle ones between busy ones to one."""
        out = {}
        for seq in range(lo, hi + 1):
            have = length.get(seq, 0)
            want = to if run[0] <= seq <= run[1] else max(have, 1)
            out[seq] = max(want, have)
        return out

    candidates = [targets((lo, hi), longest), targets((lo - 1, lo - 1), 0)]  # all even; only the holes filled
    # The prompt chunks' run evened out to one of their lengths (longer chunks' rest is evaluated after), decoders
    # outside it as they are
    if prompts:
        candidates += [targets((min(prompts), max(prompts)), to) for to in spread]
    best: dict[int, int] = {}
    best_cost = count_ubatches([(seq, n) for seq, n, _ in parts], n_ubatch) * EVAL_TOKENS
    tried: set[tuple[int, ...]] = set()
    for target in candidates:
        key = tuple(target.values())
        if key in tried or any(seq not in end for seq in target):  # tried, or an idle sequence not to fill
            continue
        tried.add(key)
        filler = {seq: want - length.get(seq, 0) for seq, want in target.items() if want > length.get(seq, 0)}
        if not filler or sum(target.values()) > capacity or any(end[s] + n > room for s, n in filler.items()):
            continue
        cost = count_ubatches(sorted(target.items()), n_ubatch) * EVAL_TOKENS + sum(filler.values())
        if cost < best_cost:
            best, best_cost = filler, cost
    return best
