"""The prefix cache's host-memory tier (--cache-ram): the cache's own bookkeeping, then the scheduler saving what a
slot drops and restoring it for a later prompt, against the fake llama.cpp context of test_scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_scheduler import FakeContext, FakeVocab, check_accounting, end, run, submit, text
from worker.engine import scheduler as scheduler_module
from worker.engine.core import EngineCore
from worker.engine.host_cache import HostCache, HostEntry
from worker.engine.outputs import Started

# ---- the cache itself ----------------------------------------------------------------------------------------------


def entry(tokens: list[int], size: int = 10) -> HostEntry:
    return HostEntry(tokens, np.zeros(size, dtype=np.uint8), size)


def test_the_least_recently_used_entries_go_first_when_over_budget():
    cache = HostCache(30)
    a, b, c = entry([1] * 5), entry([2] * 5), entry([3] * 5)
    for e in (a, b, c):
        assert cache.put(e) == ([], [])
    cache.touch(a)  # used: b is now the oldest
    replaced, evicted = cache.put(entry([4] * 5, 15))
    assert replaced == [] and evicted == [b, c]
    assert cache.bytes == 25 and len(cache) == 2 and list(cache)[0] is a


def test_the_longest_prefix_of_a_prompt_is_found():
    cache = HostCache(None)
    short, long, other = entry([1, 2, 3]), entry([1, 2, 3, 4, 5, 6]), entry([9, 9, 9, 9, 9, 9, 9])
    for e in (short, long, other):
        cache.put(e)
    assert cache.longest_prefix([1, 2, 3, 4, 7]) == (long, 4)
    assert cache.longest_prefix([1, 2, 3, 4, 5, 6, 7, 8], limit=5) == (long, 5)
    assert cache.longest_prefix([5, 5]) == (None, 0)


def test_an_entry_a_longer_one_holds_whole_is_replaced():
    cache = HostCache(None)
    short, other = entry([1, 2, 3]), entry([1, 2, 7, 8])
    cache.put(short)
    cache.put(other)
    longer = entry([1, 2, 3, 4])
    assert cache.put(longer) == ([short], [])  # [1, 2, 7, 8] only shares a prefix: kept
    assert list(cache) == [other, longer] and cache.bytes == 20
    assert cache.covering([1, 2, 3]) is longer and cache.covering([1, 2, 3, 4, 5]) is None


def test_an_entry_over_the_whole_budget_is_not_kept_and_a_zero_budget_keeps_nothing():
    cache = HostCache(10)
    cache.put(entry([1], 5))
    assert not cache.fits(11) and cache.put(entry([2], 11)) == ([], [])
    assert len(cache) == 1
    empty = HostCache(0)
    assert not empty.fits(1) and empty.put(entry([1], 1)) == ([], []) and len(empty) == 0
    with pytest.raises(ValueError):
        HostCache(-1)


def test_discarding_and_touching_an_entry_no_longer_kept_changes_nothing():
    cache = HostCache(10)
    a = entry([1], 10)
    cache.put(a)
    cache.put(entry([2], 10))  # evicts a
    cache.touch(a)
    cache.discard(a)
    assert len(cache) == 1 and cache.bytes == 10


# ---- the scheduler with the tier -------------------------------------------------------------------------------------


class RamContext(FakeContext):
    """The fake context with llama_state_seq_get/set_data: a sequence's state is its tokens, position by position."""

    def __init__(self, pool: int) -> None:
        super().__init__(pool)
        self.fail_restore: bool | str = False
        self.saved: list[int] = []  # lengths of the sequences saved
        self.restored: list[int] = []

    def save_sequence(self, seq_id: int) -> np.ndarray | None:
        tokens = self.tokens(seq_id)
        assert sorted(self.kv.get(seq_id, set())) == list(range(len(tokens))), "a sequence saved with holes"
        self.saved.append(len(tokens))
        return np.array(tokens, dtype=np.int32).view(np.uint8) if tokens else None

    def restore_sequence(self, seq_id: int, state: np.ndarray) -> bool:
        assert seq_id not in self.kv, "restored into a sequence that holds cells"
        if self.fail_restore == "raise":
            raise MemoryError("no room")
        if self.fail_restore:
            return False
        tokens = state.view(np.int32).tolist()
        self.cells += [(pos, tok, {seq_id}) for pos, tok in enumerate(tokens)]
        self.restored.append(len(tokens))
        return True


class Recorder:
    def __init__(self) -> None:
        self.saved: list[int] = []
        self.restored: list[int] = []
        self.evicted = 0

    def job_admitted(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...
    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None: ...
    def job_finished(self, stop_reason: str) -> None: ...
    def job_failed(self, code: str) -> None: ...
    def prefix_evicted(self, cells: int) -> None: ...
    def draft_verified(self, proposed: int, accepted: int) -> None: ...

    def ram_saved(self, tokens: int, size: int) -> None:
        self.saved.append(tokens)

    def ram_restored(self, tokens: int) -> None:
        self.restored.append(tokens)

    def ram_evicted(self, size: int) -> None:
        self.evicted += 1


def ram_engine(budget: int | None = 1 << 20, parallel: int = 1, pool: int = 1024,
               **kw) -> tuple[EngineCore, RamContext, HostCache, Recorder]:
    ctx, cache, metrics = RamContext(pool), HostCache(budget), Recorder()
    core = EngineCore(ctx, FakeVocab(), ctx_size=pool, parallel=parallel, max_queue=1000, batch_size=64,
                      prefix_cache=True, host_cache=cache, metrics=metrics, **kw)  # type: ignore[arg-type]
    return core, ctx, cache, metrics


A = [(i % 23) + 1 for i in range(300)]  # two long prompts that share nothing
B = [25] * 300


def test_a_dropped_conversation_is_saved_and_a_prompt_it_prefixes_is_restored():
    core, ctx, cache, metrics = ram_engine()
    first = submit(core, "a1", A, max_tokens=3)
    run(core)
    submit(core, "b", B, max_tokens=3)  # takes the only slot: A's cells go to RAM first
    run(core)
    assert [e.tokens for e in cache] == [A]  # its prompt's cells only: the generated ones are not reusable
    assert ctx.saved == [300] and metrics.saved == [300]
    batches = len(ctx.batches)
    again = submit(core, "a2", A, max_tokens=3)
    run(core)
    assert isinstance(again[0], Started) and again[0].cached_tokens == 298 and end(again).cached_tokens == 298
    assert ctx.restored == [300] and metrics.restored == [298]
    assert [len(b[0].tokens) for b in ctx.batches[batches:]] == [2, 1, 1]  # its last 2 prompt tokens, then decodes
    assert text(again) == text(first)
    assert [e.tokens for e in cache] == [B, A]  # B went to RAM in its turn; A, just used, is the newest


def test_a_longer_prompt_it_prefixes_is_restored_and_computes_the_rest():
    core, _, _, _ = ram_engine()
    submit(core, "a1", A, max_tokens=3)
    run(core)
    submit(core, "b", B, max_tokens=3)
    run(core)
    more = submit(core, "a2", A + [5, 6, 7, 8], max_tokens=2)
    run(core)
    assert more[0].cached_tokens == 300


def test_a_zero_budget_saves_nothing_and_the_prompt_is_computed():
    core, ctx, cache, metrics = ram_engine(budget=0)
    submit(core, "a1", A, max_tokens=3)
    run(core)
    submit(core, "b", B, max_tokens=3)
    run(core)
    again = submit(core, "a2", A, max_tokens=3)
    run(core)
    assert len(cache) == 0 and metrics.saved == [] and again[0].cached_tokens == 0


@pytest.mark.parametrize("failure", [True, "raise"])
def test_a_failed_restore_drops_the_entry_and_computes_the_prompt(failure):
    core, ctx, cache, metrics = ram_engine()
    first = submit(core, "a1", A, max_tokens=3)
    run(core)
    submit(core, "b", B, max_tokens=3)
    run(core)
    ctx.fail_restore = failure
    again = submit(core, "a2", A, max_tokens=3)
    run(core)
    assert again[0].cached_tokens == 0 and text(again) == text(first)
    assert metrics.restored == [] and metrics.evicted == 1 and A not in [e.tokens for e in cache]
    assert core.scheduler.slots[0].kv_tokens[:300] == A


def test_short_sequences_and_small_losses_are_not_saved():
    core, ctx, cache, _ = ram_engine()
    submit(core, "short", [3] * 100, max_tokens=2)
    run(core)
    submit(core, "b", B, max_tokens=2)  # drops 100 cells: under RAM_MIN_TOKENS
    run(core)
    assert ctx.saved == []
    submit(core, "b2", B[:-10] + [1, 2, 3], max_tokens=2)  # keeps 290 of B's 300 prompt cells: loses too few
    run(core)
    assert ctx.saved == [] and len(cache) == 0


def test_a_sequence_another_slot_holds_is_not_saved_twice():
    core, ctx, cache, _ = ram_engine(parallel=2)
    submit(core, "a1", A, max_tokens=20)
    for _ in range(8):  # a1's prompt is in, and it is decoding: its slot is busy
        core.step()
    submit(core, "a2", A + [9], max_tokens=2)  # A's prefix is copied into the other slot
    run(core)
    assert ctx.copies == [(0, 1, 299)]
    submit(core, "b", B, max_tokens=2)
    run(core)
    submit(core, "b2", [24] * 300, max_tokens=2)
    run(core)
    assert len([e for e in cache if e.tokens[:300] == A]) == 1


def test_without_reusable_cells_nothing_goes_to_ram():
    """Sliding-window and recurrent models (Context.reusable says no) keep nothing: a restored state would not give
    the text a fresh run gives."""
    core, ctx, cache, _ = ram_engine()
    ctx.reusable = lambda src, n: False  # type: ignore[method-assign]
    submit(core, "a1", A, max_tokens=2)
    run(core)
    submit(core, "b", B, max_tokens=2)
    run(core)
    again = submit(core, "a2", A, max_tokens=2)
    run(core)
    assert ctx.saved == [] and again[0].cached_tokens == 0


def test_hundreds_of_random_jobs_with_a_small_ram_budget_keep_the_accounting_exact(monkeypatch):
    import random

    monkeypatch.setattr(scheduler_module, "RAM_MIN_TOKENS", 8)
    rng = random.Random(5)
    # each saved token is 4 bytes in the fake: room for a few sequences
    core, ctx, cache, metrics = ram_engine(budget=4 * 300, parallel=2, pool=256)
    prompts = [[rng.randrange(1, 20) for _ in range(rng.randrange(70, 150))] for _ in range(8)]
    for i in range(200):
        base = rng.choice(prompts)
        prompt = base[: rng.randrange(1, len(base) + 1)] + [rng.randrange(1, 20) for _ in range(rng.randrange(3))]
        got = submit(core, f"j{i}", prompt, max_tokens=rng.randrange(1, 20))
        for _ in range(rng.randrange(6)):
            core.step()
            core._publish()
            check_accounting(core)
        if i % 7 == 0:
            run(core)
            assert end(got).cached_tokens <= len(prompt) - 2
        assert cache.bytes <= 4 * 300
    run(core)
    assert metrics.saved and metrics.restored and metrics.evicted  # every path was taken


def test_on_a_gpu_the_reply_is_saved_too_and_one_prompt_token_is_computed():
    core, ctx, cache, _ = ram_engine(offloaded=True)
    first = submit(core, "a1", A, max_tokens=3)  # cells hold A and 2 of its 3 tokens (the last was never decoded)
    run(core)
    submit(core, "b", B, max_tokens=3)
    run(core)
    assert [len(e.tokens) for e in cache] == [302]
    reply = [A[-1] + 1, A[-1] + 2]  # the fake model's next tokens
    assert text(first).startswith("".join(chr(ord("a") + t % 26) for t in reply))
    turn2 = submit(core, "a2", A + reply + [9, 9], max_tokens=2)
    run(core)
    assert turn2[0].cached_tokens == 302
