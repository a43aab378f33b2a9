"""The blob store: byte budget, LRU eviction, RAM-pressure eviction (with a fake RAM probe), counters."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.storage.store import CHUNK_OVERHEAD, ENTRY_OVERHEAD, BlobStore, Entry, StoreFull
from mesh.transport.wire import RAW, StoredChunk, make_header


def entry(key: str, size: int, chunk: int = 1000) -> Entry:
    data = bytes(size)
    chunks = tuple(StoredChunk(RAW, len(data[o:o + chunk]), data[o:o + chunk]) for o in range(0, size, chunk))
    return Entry(make_header(key, data, chunk), chunks)


def cost(size: int, chunk: int = 1000, key: str = "a") -> int:
    """What the store charges for entry(key, size, chunk): the key counts, as any meta would."""
    n = -(-size // chunk)
    return ENTRY_OVERHEAD + len(key) + size + n * CHUNK_OVERHEAD


def keys(store: BlobStore) -> list[str]:
    return [e.header.key for e in store.items()]


def test_entry_size_counts_payload_and_overheads() -> None:
    e = entry("a", 2500)
    assert e.size == cost(2500) == ENTRY_OVERHEAD + 1 + 2500 + 3 * CHUNK_OVERHEAD


def test_meta_counts_against_the_budget() -> None:
    """A zero-byte value with a large meta once left the budget at a few bytes while RSS grew by the meta."""
    data = b""
    meta = {f"m{i}": "x" * 200 for i in range(60)}
    e = Entry(make_header("a", data, 1000, meta), ())
    assert e.size == ENTRY_OVERHEAD + 1 + sum(len(k) + len(v) for k, v in meta.items())
    s = BlobStore(e.size * 3)
    for key in "abcdef":
        s.put(Entry(make_header(key, data, 1000, meta), ()))
    assert s.used <= s.max_memory and len(s) == 3


def test_put_get_and_accounting() -> None:
    s = BlobStore(10_000)
    e = entry("a", 1000)
    assert s.put(e) is True
    assert "a" in s and len(s) == 1 and s.used == e.size
    assert s.get("a") is e
    assert s.get("missing") is None
    c = s.counters
    assert (c.puts, c.hits, c.misses, c.bytes_in, c.bytes_out) == (1, 1, 1, e.size, e.size)


def test_second_put_of_a_key_is_a_no_op() -> None:
    s = BlobStore(10_000)
    first = entry("a", 1000)
    assert s.put(first)
    assert s.put(entry("a", 2000)) is False  # values are immutable: the first one stays
    assert s.get("a") is first and s.used == first.size
    assert s.counters.conflicts_kept == 1 and s.counters.puts == 1  # another value: kept out, counted
    assert s.put(entry("a", 1000)) is False and s.counters.duplicate_puts == 1  # the same write again


def test_lru_evicts_least_recently_used_first() -> None:
    each = cost(1000)
    s = BlobStore(3 * each)
    for k in "abc":
        s.put(entry(k, 1000))
    s.get("a")  # a is now the most recently used: b is the oldest
    s.put(entry("d", 1000))
    assert keys(s) == ["c", "a", "d"]
    assert s.counters.evictions == 1 and s.used == 3 * each


def test_peek_does_not_touch_recency_nor_counters() -> None:
    each = cost(1000)
    s = BlobStore(2 * each)
    s.put(entry("a", 1000))
    s.put(entry("b", 1000))
    assert s.peek("a") is not None
    s.put(entry("c", 1000))
    assert keys(s) == ["b", "c"]  # a was peeked, not used: still the oldest, so evicted
    assert s.counters.hits == 0


def test_a_put_evicts_as_many_as_it_needs() -> None:
    small = cost(1000)
    s = BlobStore(4 * small)
    for k in "abcd":
        s.put(entry(k, 1000))
    s.put(entry("big", 2 * 1000 + 500))  # needs room of ~3 small ones
    assert "big" in s and s.used <= s.max_memory
    assert keys(s)[-1] == "big" and keys(s)[0] in ("c", "d")
    assert s.counters.evictions >= 2


def test_blob_larger_than_the_budget_is_refused_whole() -> None:
    s = BlobStore(10_000)
    s.put(entry("a", 1000))
    before = (keys(s), s.used)
    with pytest.raises(StoreFull):
        s.put(entry("huge", 10_000))  # payload alone fits, with overheads it does not
    assert (keys(s), s.used) == before  # nothing evicted for it, nothing half-stored
    assert "huge" not in s and s.counters.refused == 1


def test_exactly_the_budget_fits() -> None:
    s = BlobStore(cost(5000, key="exact"))
    s.put(entry("a", 100))
    s.put(entry("exact", 5000))
    assert keys(s) == ["exact"] and s.used == s.max_memory


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "get", "delete"]), st.integers(0, 12),
                              st.integers(0, 6000)), max_size=60))
def test_budget_is_never_exceeded_and_order_is_lru(ops: list[tuple[str, int, int]]) -> None:
    s = BlobStore(12_000)
    model: list[str] = []  # least recently used first
    for op, k, size in ops:
        key = f"k{k}"
        if op == "put":
            e = entry(key, size)
            if e.size > s.max_memory:
                with pytest.raises(StoreFull):
                    s.put(e)
                continue
            held = s.peek(key)
            stored = s.put(e)  # a held value is never replaced (mesh/storage/store.py: the conflict rule)
            assert stored == (held is None)
            if key in model:
                model.remove(key)
            model.append(key)
            model[:] = [m for m in model if m in s]  # evicted ones are gone...
            assert model[-1] == key
        elif op == "get":
            got = s.get(key)
            assert (got is not None) == (key in model)
            if got is not None:
                model.remove(key)
                model.append(key)
        else:
            assert s.delete([key]) == (1 if key in model else 0)
            if key in model:
                model.remove(key)
        assert keys(s) == model  # ...and only from the LRU end: the survivors keep their order
        assert s.used == sum(e.size for e in s.items()) <= s.max_memory


def test_delete_and_items_with_prefix_and_limit() -> None:
    s = BlobStore(100_000)
    for k in ["x/1", "x/2", "y/1", "x/3"]:
        s.put(entry(k, 10))
    assert keys(s) == ["x/1", "x/2", "y/1", "x/3"]
    assert [e.header.key for e in s.items(prefix="x/")] == ["x/1", "x/2", "x/3"]
    assert [e.header.key for e in s.items(prefix="x/", limit=2)] == ["x/1", "x/2"]
    assert s.delete(["x/2", "nope", "x/2"]) == 1
    assert keys(s) == ["x/1", "y/1", "x/3"] and s.counters.deletes == 1
    assert s.used == 3 * cost(10, key="x/1")


def test_stats_reports_counters_and_budget() -> None:
    s = BlobStore(50_000, min_free_ram=7, ram_probe=lambda: 10**12)
    s.put(entry("a", 100))
    s.get("a")
    st_ = s.stats()
    assert st_["entries"] == 1 and st_["bytes_used"] == cost(100) and st_["max_memory"] == 50_000
    assert st_["min_free_ram"] == 7 and st_["hits"] == 1 and st_["puts"] == 1


def test_invalid_budget() -> None:
    with pytest.raises(ValueError):
        BlobStore(0)


# -- RAM pressure ------------------------------------------------------------------------------------------------

class FakeRam:
    def __init__(self, available: int) -> None:
        self.available = available
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.available


def test_pressure_evicts_lru_blobs_covering_the_shortfall() -> None:
    ram = FakeRam(available=10**9)
    s = BlobStore(10**6, min_free_ram=1000, ram_probe=ram)
    for k in "abcde":
        s.put(entry(k, 1000))
    assert len(s) == 5 and s.counters.pressure_evictions == 0
    ram.available = 1000 - 2 * cost(1000) - 1  # short by a bit more than two blobs
    assert s.relieve_pressure() == 3
    assert keys(s) == ["d", "e"]
    assert s.counters.pressure_evictions == 3 and s.counters.evictions == 3


def test_put_under_pressure_makes_room_from_the_oldest() -> None:
    ram = FakeRam(available=10**9)
    s = BlobStore(10**6, min_free_ram=5000, ram_probe=ram)
    for k in "abc":
        s.put(entry(k, 1000))
    ram.available = 5000 - 1  # one byte short
    s.put(entry("d", 1000))
    assert keys(s) == ["b", "c", "d"]  # the put stored d, then freed the oldest blob
    assert s.counters.pressure_evictions == 1


def test_no_pressure_no_eviction_and_disabled_without_min_free_ram() -> None:
    ram = FakeRam(available=10**9)
    s = BlobStore(10**6, min_free_ram=1000, ram_probe=ram)
    s.put(entry("a", 1000))
    assert s.relieve_pressure() == 0 and "a" in s
    off = BlobStore(10**6, min_free_ram=0, ram_probe=FakeRam(0))
    off.put(entry("a", 1000))
    assert off.relieve_pressure() == 0 and "a" in off


def test_pressure_can_empty_the_store_but_no_further() -> None:
    s = BlobStore(10**6, min_free_ram=10**9, ram_probe=FakeRam(0))
    s.put(entry("a", 1000))  # evicted by the put's own pressure check
    assert len(s) == 0 and s.used == 0
    assert s.relieve_pressure() == 0


def test_concurrent_puts_gets_and_deletes_keep_the_books() -> None:
    s = BlobStore(40 * cost(1000))
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(300):
                key = f"k{(t * 7 + i) % 60}"
                s.put(entry(key, 1000))
                s.get(key)
                if i % 11 == 0:
                    s.delete([key])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors and not any(th.is_alive() for th in threads)
    assert s.used == sum(e.size for e in s.items()) <= s.max_memory
    assert len(s) == len(keys(s))
