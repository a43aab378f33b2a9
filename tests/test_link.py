"""Compression chosen per link: the measurement rules (unit) and, between two hosts joined by a shaped link,
what actually travels compressed (network namespaces; skipped where they are unavailable)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mesh.transport.link import COMPRESS_BELOW, MAX_LINKS, MEASURE_MIN, REMEASURE_EVERY, Links, is_local
from tests.support.serve import start_serve
from tests.netns import netlab_or_skip

REPO = Path(__file__).resolve().parent.parent
PEER = "10.0.0.7:8288"


def test_loopback_is_never_compressed_in_auto() -> None:
    links = Links()
    for address in ("127.0.0.1:1", "127.3.4.5:8288", "[::1]:8288", "localhost:9"):
        assert is_local(address)
        links.observe(address, MEASURE_MIN, 1.0, compressed=False)  # measured very slow: still raw
        assert not links.compress(address)
    assert not is_local(PEER) and not is_local("gpu3:8288") and not is_local("garbage")


def test_unmeasured_and_fast_links_go_raw_slow_ones_compressed_with_periodic_remeasure() -> None:
    links = Links()
    assert not links.compress(PEER)  # never measured: the first big transfer measures it
    links.observe(PEER, MEASURE_MIN, MEASURE_MIN / (COMPRESS_BELOW * 4), compressed=False)
    assert not links.compress(PEER)
    slow = "10.0.0.8:8288"
    links.observe(slow, 64 * MEASURE_MIN, 64 * MEASURE_MIN / 125e6, compressed=False)  # 1 Gbit/s
    decisions = []
    for _ in range(3 * REMEASURE_EVERY):
        decisions.append(links.compress(slow))
        if not decisions[-1]:  # the raw turn re-measures: still 1 Gbit/s
            links.observe(slow, 64 * MEASURE_MIN, 64 * MEASURE_MIN / 125e6, compressed=False)
    assert decisions.count(False) == 3 and all(decisions[i] for i in range(REMEASURE_EVERY - 1))
    # a re-measurement that finds the link fast again turns compression off
    for _ in range(20):
        links.observe(slow, MEASURE_MIN, MEASURE_MIN / 2e9, compressed=False)
    assert not links.compress(slow) and links.rate(slow) > COMPRESS_BELOW


def test_a_raw_turn_that_lands_on_a_small_transfer_stays_owed_until_a_big_one_measures() -> None:
    links = Links()
    links.observe(PEER, MEASURE_MIN, MEASURE_MIN / 100e6, compressed=False)  # measured slow once
    for i in range(4 * REMEASURE_EVERY):  # then "big, small" forever, on a link that is now fast
        big = i % 2 == 0
        if not links.compress(PEER):
            links.observe(PEER, MEASURE_MIN if big else 1000, (MEASURE_MIN if big else 1000) / 1.2e9, False)
    assert links.rate(PEER) > COMPRESS_BELOW and not links.compress(PEER)


def test_only_big_raw_transfers_measure() -> None:
    links = Links()
    links.observe(PEER, MEASURE_MIN - 1, 10.0, compressed=False)  # small: latency, not throughput
    links.observe(PEER, 64 * MEASURE_MIN, 100.0, compressed=True)  # compressed: lz4's pace, not the link's
    links.observe(PEER, 64 * MEASURE_MIN, 0.0, compressed=False)
    assert links.rate(PEER) == 0.0 and links.snapshot() == {}


def test_modes_override_and_the_table_is_bounded() -> None:
    assert Links("lz4").compress("127.0.0.1:1") and not Links("off").compress(PEER)
    with pytest.raises(ValueError, match="auto, off, lz4"):
        Links("zstd")
    links = Links()
    for i in range(MAX_LINKS + 50):
        links.observe(f"10.1.{i // 250}.{i % 250}:1", MEASURE_MIN, 1.0, compressed=False)
    assert len(links.snapshot()) == MAX_LINKS


CLIENT = r'''
import json, sys, time
import numpy as np
from mesh.transport.peer import PeerClient
from mesh.transport.wire import RAW
address, secret = sys.argv[1], sys.argv[2].encode()
rng = np.random.default_rng(3)
# 8-bit image bytes (a smooth gradient plus noise): lz4 shrinks them to about 80%
img = (np.linspace(0, 200, 8 << 20) + rng.normal(0, 2, 8 << 20)).clip(0, 255).astype(np.uint8).tobytes()
out = {}
with PeerClient(address, secret, timeout=60) as c:
    for i in range(3):
        t0 = time.monotonic()
        c.put(f"img/{i}", img)
        out[f"put{i}"] = time.monotonic() - t0
    sizes = {k.key: k.stored_size for k in c.list_keys("img/")}
    out["stored"] = [sizes[f"img/{i}"] for i in range(3)]
    out["rate"] = c.links.rate(address)
    header, chunks = c.get_chunks("img/0", local_only=True)  # stored raw; the node packs it for this link
    out["get_codecs"] = sorted({ch.codec for ch in chunks})
    out["get_ok"] = c.get("img/0").data == img
    out["raw"] = RAW
print(json.dumps(out))
'''


def test_a_slow_link_gets_compressed_transfers_both_ways(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("link-secret\n")
    with netlab_or_skip(2) as lab:
        node, reader = lab.hosts
        lab.shape(reader, "200mbit")
        served = start_serve(tmp_path, "node", secret_file=secret, listen=f"{node.addr}:7431",
                             wrap=lab.argv(node, []), cwd=REPO)
        try:
            run = lab.run(reader, [sys.executable, "-c", CLIENT, f"{node.addr}:7431", "link-secret"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
            out = json.loads(run.stdout)
        finally:
            served.close()
    size = 8 << 20
    # The first put measured the link (raw); 25 MB/s is slow, so the next ones went lz4.
    assert out["stored"][0] == size
    assert out["stored"][1] < 0.9 * size and out["stored"][2] < 0.9 * size
    assert 5e6 < out["rate"] < 40e6
    assert out["get_codecs"] != [out["raw"]] and out["get_ok"]  # the node compressed the raw entry on the way
