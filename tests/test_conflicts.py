"""The conflict rule (mesh/storage/store.py): no clock and no writer's claim decides which value of a key stays,
and a delete refuses copies of what it removed, never a later put."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh.storage import store as store_module
from mesh.storage.store import TOMBSTONE_TTL, BlobStore, Entry, fresh_write_id
from mesh.transport.wire import RAW, StoredChunk, make_header


def value(key: str, payload: bytes, write_id: int | None = None, created: float = 0.0) -> Entry:
    header = make_header(key, payload, 1 << 16)
    header = replace(header, write_id=fresh_write_id() if write_id is None else write_id, created_unix=created)
    return Entry(header, (StoredChunk(RAW, len(payload), payload),))


def test_a_held_value_is_never_replaced_whatever_time_it_claims() -> None:
    s = BlobStore(1 << 20)
    first = value("k", b"first", created=2_000_000_000.0)
    assert s.put(first)
    for claim in (1.0, 0.0, 1_999_999_999.0):  # "written earlier": the old rule let the earliest claim win
        assert s.put(value("k", b"evil", created=claim)) is False
    assert s.get("k") is first
    assert s.counters.conflicts_kept == 3 and s.counters.puts == 1


def test_a_write_id_a_writer_picks_cannot_win_either() -> None:
    s = BlobStore(1 << 20)
    first = value("k", b"first", write_id=2**64 - 1)
    s.put(first)
    assert s.put(value("k", b"evil", write_id=1)) is False
    assert s.get("k") is first


def test_a_delete_refuses_copies_of_the_deleted_write_and_nothing_else() -> None:
    s = BlobStore(1 << 20)
    old = value("k", b"same bytes")
    s.put(old)
    assert s.delete(["k"], tombstone=True) == 1
    assert s.deleted(old.header)
    assert s.put(old) is False and s.would_take(old.header) is False  # a late replica copy of the deleted write
    assert s.counters.tombstoned == 1
    again = value("k", b"same bytes")  # a re-put after the delete: the same bytes, a new write
    assert not s.deleted(again.header) and s.would_take(again.header)
    assert s.put(again) and s.get("k") is again


def test_a_delete_of_a_key_held_nowhere_leaves_no_tombstone() -> None:
    s = BlobStore(1 << 20)
    assert s.delete(["k"], tombstone=True) == 0
    assert s.put(value("k", b"v"))


def test_tombstones_last_their_ttl_on_the_monotonic_clock_not_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    s = BlobStore(1 << 20)
    old = value("k", b"v")
    s.put(old)
    clock = {"mono": 1000.0}
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock["mono"])
    s.delete(["k"], tombstone=True)
    # a wall clock set ten minutes either way changes nothing
    for skew in (-600.0, 600.0):
        monkeypatch.setattr(store_module.time, "time", lambda skew=skew: 1_700_000_000.0 + skew)
        assert s.deleted(old.header)
    clock["mono"] += TOMBSTONE_TTL - 1
    assert s.deleted(old.header)
    clock["mono"] += 2
    assert not s.deleted(old.header)  # expired: the copy may come back (the documented bound)


def test_repair_drops_only_the_copy_a_co_owner_deleted_not_a_put_made_since() -> None:
    s = BlobStore(1 << 20)
    old = value("k", b"old")
    s.put(old)
    s.delete(["k"])
    new = value("k", b"new")
    s.put(new)  # between repair's look at the catalog and its delete
    assert s.delete_copy(old.header) is False and s.get("k") is new
    assert s.delete_copy(new.header) is True and s.deleted(new.header)


def test_a_value_from_before_write_ids_has_one_id_on_every_owner() -> None:
    from mesh.transport.wire import Header

    legacy = make_header("k", b"v", 1 << 16).to_pb()
    legacy.ClearField("write_id")
    a, b = Header.from_pb(legacy), Header.from_pb(legacy)
    assert a.write_id == b.write_id != 0  # named by key and checksum: copies agree, repair sees one write
    other = make_header("k", b"w", 1 << 16).to_pb()
    other.ClearField("write_id")
    assert Header.from_pb(other).write_id != a.write_id
