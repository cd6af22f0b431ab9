"""The prefix tree's bookkeeping against a brute-force model of llama.cpp's unified KV cache (cells tagged with
sequence ids): no model, milliseconds."""

from __future__ import annotations

import random

from worker.engine.prefix_cache import Match, PrefixCache


def test_a_shared_prefix_is_counted_once_and_freed_with_its_last_sequence():
    cache = PrefixCache()
    cache.extend(0, [1, 2, 3, 4, 5])
    m = cache.match([1, 2, 3, 9])
    assert m.length == 3 and m.source() == 0
    cache.attach(1, m)
    cache.extend(1, [9, 9])
    assert cache.cells_used == 7
    assert cache.tokens_of(1) == [1, 2, 3, 9, 9] and cache.tokens_of(0) == [1, 2, 3, 4, 5]
    assert cache.unique_cells(0) == 2 and cache.unique_cells(1) == 2
    assert cache.release(0) == 2 and cache.cells_used == 5
    assert cache.match([1, 2, 3, 4]).length == 3
    assert cache.release(1) == 5 and cache.cells_used == 0
    cache.check()


def test_a_sequence_moved_to_another_id_keeps_its_cells():
    cache = PrefixCache()
    cache.extend(0, [1, 2, 3])
    cache.move(0, 40)
    assert cache.tokens_of(40) == [1, 2, 3] and 0 not in cache.leaf
    m = cache.match([1, 2, 3, 4])
    assert m.length == 3 and m.source() == 40
    cache.check()


def test_the_same_tokens_decoded_twice_are_two_sets_of_cells():
    cache = PrefixCache()
    cache.extend(0, [1, 2])
    cache.extend(1, [1, 2])  # decoded on its own, not copied: other cells
    assert cache.cells_used == 4
    assert cache.match([1, 2]).source() == 0
    cache.release(0)
    assert cache.match([1, 2]).source() == 1  # the twin is found once the first is gone
    cache.check()


def test_random_operations_match_a_model_of_tagged_cells():
    rng = random.Random(7)
    cache = PrefixCache()
    cells: dict[int, list[int]] = {}  # seq → its cells, in position order
    tokens: dict[int, list[int]] = {}
    next_cell = 0
    for _ in range(3000):
        op = rng.random()
        seq = rng.randrange(12)
        if op < 0.35:  # a new sequence, from the best cached prefix of a random prompt
            if seq in cells:
                continue
            prompt = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
            m = cache.match(prompt)
            best = max((_common(prompt, t) for t in tokens.values()), default=0)
            assert m.length <= best
            src = m.source()
            cache.attach(seq, m)
            cells[seq] = list(cells[src][: m.length]) if src is not None else []
            tokens[seq] = prompt[: m.length]
            assert src is None or tokens[src][: m.length] == prompt[: m.length]
        elif op < 0.75:  # decode some tokens into it
            if seq not in cells:
                continue
            new = [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
            cache.extend(seq, new)
            cells[seq] += list(range(next_cell, next_cell + len(new)))
            next_cell += len(new)
            tokens[seq] += new
        elif op < 0.85:  # a job ended: its sequence becomes a cache entry under another id
            dst = 100 + seq
            if seq not in cells or dst in cells:
                continue
            cache.move(seq, dst)
            cells[dst], tokens[dst] = cells.pop(seq), tokens.pop(seq)
        else:  # evicted, or freed
            victim = rng.choice(sorted(cells)) if cells else None
            if victim is None:
                continue
            before = set().union(*cells.values())
            unique = cache.unique_cells(victim)
            freed = cache.release(victim)
            cells.pop(victim)
            tokens.pop(victim)
            after = set().union(*cells.values()) if cells else set()
            assert freed == unique == len(before - after)
        cache.check()
        assert cache.cells_used == len(set().union(*cells.values()) if cells else set())
        for s, t in tokens.items():
            assert cache.tokens_of(s) == t


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def test_an_empty_match_has_no_source():
    cache = PrefixCache()
    assert cache.match([1, 2]) == Match(cache.root, 0) and cache.match([1]).source() is None
