"""Cost-aware eviction (mesh/storage/eviction.py): the policy alone, then in the RAM store and the disk tier."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from mesh.storage.disk import DiskStore
from mesh.storage.eviction import DEFAULT_SECONDS, CostPolicy, LruPolicy, make_policy
from mesh.storage.store import BlobStore, Entry
from mesh.transport.wire import MAX_COMPUTE_SECONDS, KiB, RAW, Header, StoredChunk, iter_chunks, make_header


def entry(key: str, size: int, seconds: float, class_type: str = "") -> Entry:
    data = bytes(size)
    header = make_header(key, data, 64 * KiB, {"class_type": class_type} if class_type else None, seconds)
    return Entry(header, (StoredChunk(RAW, size, data),))


def test_a_cheap_value_does_not_push_out_an_expensive_one_of_the_same_size() -> None:
    p = CostPolicy()
    p.add("sampler", 1000, 40.0)
    p.add("blur1", 1000, 0.005)
    p.add("blur2", 1000, 0.005)  # the newest: LRU would drop the sampler first
    assert [p.victim(), p.victim()] == ["blur1", "blur2"]
    assert p.victim() == "sampler"


def test_lru_drops_the_least_recently_used_whatever_it_cost() -> None:
    p = LruPolicy()
    p.add("sampler", 1000, 40.0)
    p.add("blur", 1000, 0.005)
    assert p.victim() == "sampler"


def test_cost_is_per_byte() -> None:
    p = CostPolicy()
    p.add("big", 4000, 1.2)     # 0.3 ms per byte... per 1000 bytes
    p.add("small", 1000, 0.6)   # twice as much compute per byte
    assert p.victim() == "big"


def test_frequency_keeps_a_value_asked_for() -> None:
    p = CostPolicy()
    p.add("often", 1000, 1.0)  # the older: without frequency it would go first
    p.add("once", 1000, 1.0)
    for _ in range(3):
        p.touch("often")
    assert p.victim() == "once"


def test_a_stale_expensive_value_goes_eventually() -> None:
    """Aging: each eviction lifts L, every hit re-prices at the new L; a value nobody asks for stays where it was."""
    p = CostPolicy()
    p.add("stale", 1000, 10.0)  # worth ten cheap ones, asked for once
    live = [f"hot{i}" for i in range(4)]
    for k in live:
        p.add(k, 1000, 1.0)
    evicted: list[str] = []
    for round_ in range(100):  # bounded: a new cheap value per round, the hot ones asked for
        for k in live:
            p.touch(k)
        p.add(f"new{round_}", 1000, 1.0)
        victim = p.victim()
        assert victim is not None
        evicted.append(victim)
        if victim == "stale":
            break
    assert "stale" in evicted, "a value nobody asks for any more must not hold its room forever"
    assert evicted.index("stale") > 0  # but it outlived the cheap newcomers first
    assert not set(live) & set(evicted)


def test_a_value_without_a_cost_counts_as_the_mean_of_those_with_one() -> None:
    p = CostPolicy()
    assert p.default_cost() == DEFAULT_SECONDS
    p.add("a", 1000, 2.0)
    p.add("b", 1000, 4.0)
    p.add("unknown", 1000, 0.0)   # a CLI put, an older writer
    p.add("cheap", 1000, 0.01)
    assert p.default_cost() == pytest.approx((2.0 + 4.0 + 0.01) / 3)
    assert [p.victim(), p.victim()] == ["cheap", "a"]  # neither pinned nor the first to go
    assert p.victim() == "unknown"


def test_removed_and_re_added_keys_are_never_returned_stale() -> None:
    p = CostPolicy()
    for i in range(200):
        p.add(f"k{i}", 1000, 1.0 + i % 7)
        if i % 3 == 0:
            p.remove(f"k{i}")
        p.touch(f"k{i // 2}")
    seen = []
    while (k := p.victim()) is not None:
        seen.append(k)
    assert len(seen) == len(set(seen)) == 200 - len(range(0, 200, 3))
    assert not any(int(k[1:]) % 3 == 0 for k in seen)
    assert len(p) == 0


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="cost, lru"):
        make_policy("fifo")


def test_a_nonsense_cost_counts_as_unknown_and_a_huge_one_is_capped() -> None:
    h = make_header("k", b"x", 1024)
    assert replace(h, compute_seconds=float("nan")).compute_seconds == 0.0
    assert replace(h, compute_seconds=-3.0).compute_seconds == 0.0
    assert replace(h, compute_seconds=1e300).compute_seconds == MAX_COMPUTE_SECONDS
    assert Header.from_pb(replace(h, compute_seconds=2.5).to_pb()).compute_seconds == 2.5


@pytest.mark.parametrize("eviction,survivor", [("cost", "sampler"), ("lru", "blur3")])
def test_the_ram_store_evicts_by_the_policy(eviction: str, survivor: str) -> None:
    one = entry("x", 10 * KiB, 1.0).size
    store = BlobStore(3 * one + 100, eviction=eviction)
    store.put(entry("sampler", 10 * KiB, 40.0))
    for i in range(4):
        store.put(entry(f"blur{i}", 10 * KiB, 0.005))
    assert survivor in store and len(store) == 3 and store.used <= store.max_memory


def test_hits_count_the_compute_seconds_saved_per_class_type() -> None:
    store = BlobStore(1 << 20)
    store.put(entry("a", 1000, 1.5, "KSampler"))
    store.put(entry("b", 1000, 0.25, "ImageBlur"))
    store.put(entry("c", 1000, 0.0))  # unknown cost, no class: saves nothing we can count
    for key in ("a", "a", "b", "c"):
        assert store.get(key) is not None
    stats = store.stats()
    assert stats["compute_seconds_saved"] == pytest.approx(3.25)
    assert stats["class.KSampler.seconds_saved"] == pytest.approx(3.0)
    assert stats["class.KSampler.hits"] == 2 and stats["class.ImageBlur.hits"] == 1
    assert stats["class.KSampler.bytes_out"] == 2 * store.peek("a").size  # type: ignore[union-attr]


def _disk_entry(key: str, seconds: float) -> Entry:
    data = os.urandom(32 * KiB)
    chunks = tuple(iter_chunks(data, 64 * KiB))
    return Entry(replace(make_header(key, data, 64 * KiB, None, seconds),
                         stored_size=sum(len(c.data) for c in chunks)), chunks)


def test_the_disk_tier_evicts_by_cost_and_keeps_the_cost_across_a_restart(tmp_path: Path) -> None:
    first = _disk_entry("sampler", 40.0)
    disk = DiskStore(tmp_path, 10 << 20)
    disk.put(first.header, first.chunks)
    one = disk.used
    disk = DiskStore(tmp_path, 3 * one + 100)  # a restart, with room for three
    assert disk.header("sampler").compute_seconds == 40.0  # type: ignore[union-attr]
    for i in range(4):  # dearer than a value of unknown cost, cheaper than the sampler
        e = _disk_entry(f"vae{i}", 2.0)
        disk.put(e.header, e.chunks)
    assert "sampler" in disk and len(disk) == 3
    assert DiskStore(tmp_path, 10 << 20).header("sampler").compute_seconds == 40.0  # type: ignore[union-attr]


def test_a_file_written_before_the_cost_field_reads_back_as_unknown(tmp_path: Path) -> None:
    """The on-disk header is the BlobHeader protobuf: a file from before has no field 12, and reads as 0."""
    e = _disk_entry("old", 0.0)
    old = e.header.to_pb()
    old.ClearField("compute_seconds")  # what a writer from before the field wrote
    assert old.SerializeToString() == e.header.to_pb().SerializeToString()  # byte for byte: 0 is not written
    DiskStore(tmp_path, 10 << 20).put(e.header, e.chunks)
    again = DiskStore(tmp_path, 10 << 20)
    assert again.header("old").compute_seconds == 0.0 and again.get("old") is not None  # type: ignore[union-attr]
