"""The `mesh` command: run a node (`mesh serve`) or inspect and operate any node over gRPC.

Global options go before or after the command: `mesh --node HOST:PORT --secret-file F stats --json`, `mesh serve
-v`. Below a flag and its MESH_* variable, every command takes them from the config file (mesh/settings.py).
Everything a node sends is printed through `safe()`: keys and meta are anyone's text, and must not reach the
terminal as escape sequences or rich markup.
Errors are one line on stderr and a non-zero exit: 1 for a failed operation, 2 for usage, 3 for a missing key.
"""

from __future__ import annotations

import os

# gRPC's C core prints its own line for errors this command already reports in one line of its own.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mesh  # noqa: E402
from mesh.address import WILDCARDS, join_hostport, split_hostport, with_port
from mesh.files import write_atomic
from mesh.node_id import describe_default
from mesh.transport.auth import SECRET_ENV, SECRET_FILE_ENV, Keyring, load_keyring, load_secrets
from mesh.cluster.routing import ClusterConfig
from mesh.transport.link import AUTO, MODES
from mesh.membership.driver import Timing, ring_weights
from mesh.node import DEFAULT_PORT, ConfigError, Node, NodeConfig, advertised_host, check_data_dir, validate
from mesh.storage.eviction import DEFAULT_POLICY, POLICIES
from mesh.pb.mesh_pb2 import MemberState
from mesh.transport.peer import MeshError, PeerClient
from mesh.settings import (CONFIG_ENV, DEFAULT_CONFIG, ConfigFile, SettingError, load_config, resolve,
                           settings_of)
from mesh.transport.tls import TlsConfig, init_tls, load_tls, subject_name
from mesh.units import format_size, parse_size
from mesh.transport.wire import Limits

NODE_ENV = "MESH_NODE"
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- output helpers ----------------------------------------------------------------------------------------

def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def safe(value: object) -> str:
    """Text from a node, printable as it is: control characters (ESC, OSC, newlines...) become \\xNN."""
    return str(value).translate(_CONTROL)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(safe(title)), title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(escape(safe(v)) for v in row))
    Console().print(table)


class _ProgressBar:
    """A rich progress bar with bytes/s, shown only for long transfers on a terminal."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < 8 * 1024 * 1024:
            return
        if self._bar is None:
            from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TimeRemainingColumn
            from rich.text import Text

            class Speed(ProgressColumn):  # rich's TransferSpeedColumn counts in GB; everything here is GiB
                def render(self, task: Any) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text("?" if speed is None else f"{format_size(int(speed))}/s", style="progress.data.speed")

            self._bar = Progress("[progress.description]{task.description}", BarColumn(),
                                 DownloadColumn(binary_units=True), Speed(), TimeRemainingColumn(), transient=True)
            self._task = self._bar.add_task(self.label, total=total)
            self._bar.start()
        self._bar.update(self._task, completed=done)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS files as `_resolve_client` found them; an error names the config file where one came from it."""
    sources = getattr(args, "sources", {})
    given_by = {dest[4:]: sources[dest] for dest in ("tls_cert", "tls_key", "tls_ca") if dest in sources}
    return load_tls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name, given_by=given_by)


def _client(args: argparse.Namespace, limits: Limits | None = None) -> PeerClient:
    node = with_port(args.node, DEFAULT_PORT)  # `--node host` means the default port, not gRPC's 443
    return PeerClient(node, _keyring(args), limits, timeout=_call_timeout(args), tls=_tls(args))


# -- commands ----------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = _serve_config(args)
    except ValueError as e:  # a size that does not parse, limits that contradict each other
        raise ConfigError(str(e)) from None
    # Signals are handled before the node starts: it answers peers during start(), and a SIGTERM in that window
    # must drain and stop it like any other, not kill it mid-start.
    stopping = threading.Event()
    started: list[Node] = []
    _handle_signals(args, stopping, started)
    node = Node(config).start()
    started.append(node)
    return _run_node(node, args, stopping)


def _serve_config(args: argparse.Namespace) -> NodeConfig:
    return NodeConfig(
        listen=args.listen, node_id=args.node_id or "", advertise=args.advertise or "",
        max_memory=parse_size(args.max_memory), min_free_ram=parse_size(args.min_free_ram),
        data_dir=args.data_dir or "", max_disk=parse_size(args.max_disk), metrics_listen=args.metrics_listen or "",
        eviction=args.eviction,
        secret=_keyring(args),
        tls=_tls(args),
        limits=Limits(chunk_size=parse_size(args.chunk_size), max_blob_size=parse_size(args.max_blob_size),
                      max_chunk_size=parse_size(args.max_chunk_size),
                      max_message_size=parse_size(args.max_message_size), max_transfers=args.max_transfers,
                      max_inflight=parse_size(args.max_inflight), header_timeout=args.header_timeout,
                      idle_timeout=args.idle_timeout),
        cluster=ClusterConfig(name=args.cluster, replicas=args.replicas, write_acks=args.write_acks,
                              repair_interval=args.repair_interval),
        seeds=[s for s in (args.seeds or "").split(",") if s.strip()],
        zeroconf=args.zeroconf,
        zeroconf_interfaces=[i for i in (args.zeroconf_interfaces or "").split(",") if i] or None,
        timing=Timing(interval=args.heartbeat, suspect_after=args.suspect_after, dead_after=args.dead_after),
        compress=args.compress,
        revoked=[n.strip() for n in (args.revoke or "").split(",") if n.strip()],
    )


def _handle_signals(args: argparse.Namespace, stopping: threading.Event, started: list[Node]) -> None:
    """SIGINT or SIGTERM: stop (draining first with --drain-on-term); SIGHUP: reload the secrets."""

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("mesh").info("received %s, %s", signal.Signals(signum).name,
                                       "draining" if args.drain_on_term else "stopping")
        stopping.set()

    def on_hangup(_signum: int, _frame: object) -> None:
        """Reload the secret file: rotation (add the next secret, make it first, drop the old) without a restart."""
        if not started:
            logging.getLogger("mesh").warning("SIGHUP: secrets not reloaded: the node is still starting")
            return
        keyring = started[0].keyring
        try:
            keys = load_secrets(args.secret_file)
            if keyring is None or keys is None:
                raise ValueError("this node runs without a secret; restart it to add one")
            keyring.replace(keys)
            logging.getLogger("mesh").info("reloaded the cluster secrets: %d known, signing with key %s",
                                           len(keys), keyring.current[0])
        except ValueError as e:
            logging.getLogger("mesh").warning("SIGHUP: secrets not reloaded: %s", e)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)


def _run_node(node: Node, args: argparse.Namespace, stopping: threading.Event) -> int:
    """Serve until `stopping` (a signal) or the node stops by itself (a drain asked over gRPC)."""
    if args.ready_file:
        # Written whole, then renamed, so a watcher never reads a half-written file.
        ready = Path(args.ready_file)
        partial = ready.with_name(ready.name + ".partial")
        partial.write_text(json.dumps({"address": node.address, "node_id": node.node_id,
                                       "metrics": node.metrics.address}))
        os.replace(partial, ready)
    while not stopping.wait(0.5) and not node.stopped.is_set():
        pass
    if args.drain_on_term and not node.stopped.is_set():
        node.drain()
    node.stop()
    return 0


def _member_rows(members: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"node_id": m.node_id, "address": m.address, "state": MemberState.Name(m.state),
             "last_heard_seconds": round(m.last_heard_age, 2), "keys": m.keys, "bytes": m.bytes,
             "capacity": m.capacity, "incarnation": m.incarnation} for m in members]


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        health = c.health(timeout=min(_call_timeout(args), 5.0))
        s = c.stats()
    counters = dict(s.counters)
    members = _member_rows(s.members)
    states = {st: sum(1 for m in members if m["state"] == st) for st in ("ALIVE", "SUSPECT", "DEAD", "LEFT")}
    data = {"node_id": s.node_id, "address": s.address, "version": s.version, "health": health,
            "cluster": s.cluster, "replicas": s.replicas, "members": states,
            "uptime_seconds": round(s.uptime_seconds, 1), "entries": int(counters.get("entries", 0)),
            "bytes_used": int(counters.get("bytes_used", 0)), "max_memory": int(counters.get("max_memory", 0)),
            "near_bytes_used": int(counters.get("near_bytes_used", 0)),
            "near_max_memory": int(counters.get("near_max_memory", 0)),
            "repair": {"passes": int(counters.get("repair_passes", 0)), "repaired": int(counters.get("repaired", 0)),
                       "under_replicated": int(counters.get("under_replicated", 0)),
                       "pending": int(counters.get("repair_pending", 0)),
                       "hints": int(counters.get("hints", 0)),
                       "hinted_puts": int(counters.get("hinted_puts", 0))},
            "disk": _disk_view(counters), "warnings": list(s.warnings)}
    if args.json:
        _emit_json(data)
    else:
        for warning in s.warnings:
            print(safe(f"warning: {warning}"), file=sys.stderr)
        repair = data["repair"]
        _table(f"mesh node {s.node_id}", ["field", "value"], [
            ("address", s.address), ("health", health), ("version", s.version),
            ("cluster", f"{s.cluster} ({_count(s.replicas, 'replica')})"),
            ("members", ", ".join(f"{v} {k.lower()}" for k, v in states.items() if v)),
            ("uptime", f"{s.uptime_seconds:.0f} s"), ("keys in RAM", data["entries"]),
            ("repair", f"{_count(repair['passes'], 'pass', 'passes')}, "
                       f"{_count(repair['repaired'], 'copy', 'copies')} repaired, "
                       f"{repair['under_replicated']} missing at the last pass, {repair['pending']} pending"),
            ("hints", f"{_count(repair['hints'], 'key')} held for owners that lack them "
                      f"({_count(repair['hinted_puts'], 'put')} taken while no owner was reachable)"),
            ("memory", f"{format_size(data['bytes_used'])} of {format_size(data['max_memory'])} owned, "
                       f"{format_size(data['near_bytes_used'])} of {format_size(data['near_max_memory'])} near "
                       f"cache ({format_size(data['max_memory'] + data['near_max_memory'])} --max-memory)"),
            ("disk", _disk_line(data["disk"])),
        ])
    return 0


def _count(n: int, singular: str, plural: str = "") -> str:
    """'1 key', '2 keys', '1 pass', '0 passes'."""
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _disk_view(counters: dict[str, float]) -> dict[str, int] | None:
    """The disk tier as `mesh status --json` shows it; None for a RAM-only node (no disk counters)."""
    if "max_disk" not in counters:
        return None
    return {name: int(counters.get(counter, 0)) for name, counter in (
        ("keys", "disk_entries"), ("bytes_used", "disk_bytes_used"), ("max_disk", "max_disk"),
        ("errors", "disk_errors"), ("corrupt", "disk_corrupt"), ("evictions", "disk_evictions"))}


def _disk_line(disk: dict[str, int] | None) -> str:
    if disk is None:
        return "off: RAM only, a restart comes back empty (--data-dir keeps values on disk)"
    line = f"{format_size(disk['bytes_used'])} of {format_size(disk['max_disk'])} in {_count(disk['keys'], 'key')}"
    if disk["errors"]:
        line += f", {_count(disk['errors'], 'failed write')} (in RAM only: see the warning)"
    return line


def cmd_peers(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.stats()
    rows = _member_rows(s.members)
    if args.json:
        _emit_json(rows)
    else:
        # keys and bytes of the same tiers: each key once, wherever it is held (RAM, disk), as its node reported
        _table(f"members seen by {s.node_id}", ["id", "address", "state", "last heard", "keys held", "bytes held"], [
            (r["node_id"], r["address"], r["state"], f"{r['last_heard_seconds']:.1f} s ago", r["keys"],
             format_size(r["bytes"])) for r in rows])
    return 0


def cmd_ring(args: argparse.Namespace) -> int:
    from mesh.cluster.ring import Ring

    with _client(args) as c:
        s = c.stats()
    owners = ring_weights(s.members)
    shares = Ring(owners).shares()
    rows = [{"node_id": n, "share": round(shares.get(n, 0.0) * 100, 2), "weight": owners[n]} for n in sorted(owners)]
    if args.json:
        _emit_json({"replicas": s.replicas, "members": rows})
    else:
        _table(f"ring of {_count(len(rows), 'member')}, {_count(s.replicas, 'replica')} (primary ownership)",
               ["id", "share", "capacity"],
               [(r["node_id"], f"{r['share']:.1f} %", format_size(r["weight"])) for r in rows])
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as c:
        reply = c.drain()
    if args.json:
        _emit_json({"handed_off": reply.handed_off, "failed": reply.failed})
    else:
        print(f"drained {args.node}: handed {_count(reply.handed_off, 'value')} to their owners, {reply.failed} failed")
    return 0 if reply.failed == 0 else EXIT_FAILED


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of one node: rates since the last refresh, and the members as it sees them."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.markup import escape
    from rich.table import Table

    def view(s: Any, rates: dict[str, float]) -> Group:
        head = Table(title=escape(safe(f"{s.node_id} ({s.address}), up {_duration(s.uptime_seconds)}")),
                     title_justify="left")
        for col in ("gets/s", "hits/s", "misses/s", "puts/s", "in", "out", "compute saved", "memory",
                    "missing copies"):
            head.add_column(col)
        c = s.counters
        head.add_row(*(f"{rates.get(n, 0.0):.1f}" for n in ("gets", "hits", "misses", "puts")),
                     f"{format_size(int(rates.get('bytes_in', 0)))}/s", f"{format_size(int(rates.get('bytes_out', 0)))}/s",
                     f"{rates.get('compute_seconds_saved', 0.0):.1f} s/s",
                     f"{format_size(int(c.get('bytes_used', 0)))} of {format_size(int(c.get('max_memory', 0)))}",
                     str(int(c.get("under_replicated", 0))))
        members = Table()
        for col in ("id", "address", "state", "heard", "keys", "bytes"):
            members.add_column(col)
        for m in _member_rows(s.members):
            members.add_row(*(escape(safe(v)) for v in (m["node_id"], m["address"], m["state"],
                                                          f"{m['last_heard_seconds']:.1f} s", m["keys"],
                                                          format_size(m["bytes"]))))
        classes = Table(title="served by class type (since start)", title_justify="left")
        for col in ("class type", "hits", "bytes", "compute saved"):
            classes.add_column(col)
        for class_type, row in _class_rows(c)[:10]:
            classes.add_row(escape(safe(class_type)), f"{int(row['hits']):,}", format_size(int(row["bytes_out"])),
                            _duration(row["seconds_saved"]))
        tables = [head, members] + ([classes] if classes.row_count else [])
        return Group(*tables, *(f"warning: {escape(safe(w))}" for w in s.warnings))

    names = ("hits", "misses", "puts", "bytes_in", "bytes_out", "remote_hits", "near_hits", "compute_seconds_saved")
    done = 0
    with _client(args) as client, Live(console=Console(), auto_refresh=False) as live:
        before, then = None, time.monotonic()
        while True:
            s = client.stats()
            now = time.monotonic()
            rates: dict[str, float] = {}
            if before is not None:
                dt = max(now - then, 1e-6)  # a counter that went down: the node restarted, no rate this time
                rates = {n: max(0.0, s.counters.get(n, 0.0) - before.get(n, 0.0)) / dt for n in names}
                rates["gets"] = rates["hits"] + rates["misses"]
            before, then = dict(s.counters), now
            live.update(view(s, rates), refresh=True)
            done += 1
            if args.iterations and done >= args.iterations:
                return 0
            time.sleep(args.interval)


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.stats()
    counters = {k: (int(v) if float(v).is_integer() else v) for k, v in sorted(s.counters.items())}
    if args.json:
        _emit_json({"node_id": s.node_id, "address": s.address, "counters": counters})
    else:
        notes = _stat_notes(counters)
        _table(f"stats of {s.node_id} ({s.address}), up {_duration(s.uptime_seconds)}", ["counter", "value"],
               [(name, _human(name, value) + notes.get(name, "")) for name, value in counters.items()])
    return 0


def _stat_notes(counters: dict[str, Any]) -> dict[str, str]:
    """Why a counter differs from the setting it is named after: `--max-memory 1GiB` shows max_memory 768 MiB,
    because a quarter of the budget holds copies of keys this node reads but does not own (the near cache)."""
    notes: dict[str, str] = {}
    owned, near = counters.get("max_memory"), counters.get("near_max_memory")
    if owned is not None and near:
        configured = format_size(owned + near)
        notes["max_memory"] = f" (for owned keys: --max-memory {configured} less the near cache)"
        notes["near_max_memory"] = f" (the near cache: {near / (owned + near):.0%} of --max-memory {configured})"
    return notes


def _is_size(name: str) -> bool:
    """Whether a counter counts bytes: `disk_bytes_used` and `max_disk` do, `disk_entries` and `disk_errors` not."""
    words = name.split("_")
    return "bytes" in words or words[-1] in ("memory", "ram") or name.endswith("max_disk")


def _class_rows(counters: Mapping[str, float]) -> list[tuple[str, dict[str, float]]]:
    """The store's `class.<type>.<name>` counters as one row per class type, most compute saved first."""
    rows: dict[str, dict[str, float]] = {}
    for name, value in counters.items():
        if name.startswith("class."):
            class_type, _, counter = name[len("class."):].rpartition(".")
            rows.setdefault(class_type, {"hits": 0.0, "bytes_out": 0.0, "seconds_saved": 0.0})[counter] = value
    return sorted(rows.items(), key=lambda r: (-r[1]["seconds_saved"], r[0]))


def _human(name: str, value: float) -> str:
    """A counter as a person reads it: sizes in KiB/MiB/GiB, times in ms or s, counts with separators."""
    if _is_size(name):
        return format_size(int(value))
    if name.endswith("seconds") or name.endswith("seconds_saved"):
        return _duration(float(value))
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _short_key(key: str, keep: int = 12) -> str:
    """A provider key `cm1/comfyui-V/NS/<64 hex>` shortened to fit a terminal: the hash's first characters."""
    head, _, tail = key.rpartition("/")
    return f"{head}/{tail[:keep]}…" if len(tail) > keep + 4 else key


def _identity(text: str, full: bool) -> str:
    """A value's identity (provider/identity.py: "label=xxh3:<hex>; pack:<name>@<hex>") as a table cell: each
    file or pack with its hash's first characters, unless --full."""
    if full or not text:
        return text
    parts = []
    for part in text.split("; "):
        name, sep, digest = part.rpartition("xxh3:") if "xxh3:" in part else part.rpartition("@")
        parts.append(f"{name}{sep}{digest[:8]}" if sep else part)
    return "; ".join(parts)


def cmd_keys(args: argparse.Namespace) -> int:
    prefix = args.prefix
    with _client(args) as c:
        keys = c.list_keys(prefix=prefix, limit=0 if (args.namespace or args.class_type) else args.limit)
    if args.namespace:  # provider keys are cm1/comfyui-<version>/<namespace>/<hash>
        keys = [k for k in keys if k.key.count("/") == 3 and k.key.split("/")[2] == args.namespace]
    if args.class_type:
        keys = [k for k in keys if k.meta.get("class_type") == args.class_type]
    if args.limit:
        keys = keys[:args.limit]
    rows = [{"key": k.key, "raw_size": k.raw_size, "stored_size": k.stored_size,
             "age_seconds": round(k.age_seconds, 1), "meta": dict(k.meta), "writers": list(k.writers)}
            for k in keys]
    if args.json:
        _emit_json(rows)
    else:
        _table(_count(len(rows), "key") + ("" if args.full else " (hashes shortened: --full shows them whole)"),
               ["key", "class", "identity", "size", "stored", "age", "written by"], [
                   (r["key"] if args.full else _short_key(r["key"]), r["meta"].get("class_type", ""),
                    _identity(r["meta"].get("identity", ""), args.full),
                    format_size(r["raw_size"]), format_size(r["stored_size"]), _duration(r["age_seconds"]),
                    " > ".join(r["writers"]))
                   for r in rows])
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        st = path.stat()
        path.open("rb").close()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a put reads the file twice (checksum, then sending): a device or pipe
        raise CliError(f"{path} is not a regular file: save what you want to store to a file first", EXIT_USAGE)
    size = st.st_size
    if any("=" not in m for m in args.meta):
        raise CliError("--meta takes NAME=VALUE", EXIT_USAGE)
    meta = dict(m.split("=", 1) for m in args.meta)
    meta.setdefault("content", "bytes")
    started = time.perf_counter()
    with _client(args) as c:
        # The node's limit, not this client's: a node started with another --max-blob-size would otherwise be
        # sent the whole file (read once for its checksum first) only to refuse it. 0: a node from before the
        # field, whose limit this client cannot know (its own stands, and the node still checks).
        limit = c.stats().max_blob_size or c.limits.max_blob_size
        if size > limit:
            raise CliError(f"{path} holds {format_size(size)}, more than the largest value node {c.address} "
                           f"accepts ({format_size(limit)}, its --max-blob-size)")
        with _ProgressBar(f"put {args.key}", not args.json) as bar:
            try:
                reply = c.put_file(args.key, path, meta, progress=bar, max_size=limit)  # streamed: constant memory
            except MeshError:
                # The file is read twice (checksum, then sending): written to meanwhile, what was sent does not
                # match what was announced, and the node says DATA_LOSS or a wrong chunk count. That is the file.
                if _changed(st, path):
                    raise CliError(f"{path} changed while it was read: nothing was stored; put it again once it "
                                   "is written") from None
                raise
    seconds = time.perf_counter() - started
    result = {"key": args.key, "bytes": size, "stored": reply.stored, "existed": reply.existed,
              "replicas": reply.replicas, "hinted": reply.hinted, "seconds": round(seconds, 4),
              "owners": list(reply.owners), "acked": list(reply.acked)}
    if args.json:
        _emit_json(result)
    else:
        verb = "already stored" if reply.existed else "stored"
        print(safe(f"{verb} {args.key}: {format_size(size)} in {seconds:.3f} s"))
        if reply.owners:
            print(safe(_put_owners_line(list(reply.owners), list(reply.acked), reply.existed)))
        if reply.hinted:
            print(safe(f"no owner of {args.key} was reachable: the node keeps it and hands it to them when they "
                       f"are back (mesh status: hints)"), file=sys.stderr)
    return 0


def _put_owners_line(owners: list[str], acked: list[str], existed: bool) -> str:
    """Where a put went: 'owners: a, b; acknowledged by a (b: written in the background)'."""
    line = f"owners: {', '.join(owners)}"
    if existed:
        return line + " (the value was already there: `mesh owners KEY` shows which hold it)"
    rest = [o for o in owners if o not in acked]
    line += f"; acknowledged by {', '.join(acked) or 'none'}"
    return line + (f" ({', '.join(rest)}: written in the background)" if rest and acked else "")


def cmd_owners(args: argparse.Namespace) -> int:
    """The owners of a key in the ring of the node asked, their state, and which members hold a copy: each
    member is asked for its own store (local_only), so this is what is there, not what routing would find.
    Members are asked at once, each within half the call timeout (at most OWNER_ASK_TIMEOUT), so one that
    does not answer is 'unknown' with its reason and the command still ends within --timeout."""
    from concurrent.futures import ThreadPoolExecutor

    from mesh.cluster.ring import Ring

    with _client(args) as c:
        s = c.stats()
    members = {m.node_id: m for m in s.members}
    owners = Ring(ring_weights(s.members)).owners(args.key, s.replicas)
    keyring, tls = _keyring(args), _tls(args)
    timeout = min(_call_timeout(args) / 2, OWNER_ASK_TIMEOUT)

    def ask(node_id: str) -> tuple[bool | None, str]:
        m = members[node_id]
        if MemberState.Name(m.state) not in ("ALIVE", "SUSPECT"):
            return None, ""  # not asked: it is not in the mesh now
        try:
            with PeerClient(m.address, keyring, timeout=timeout, tls=tls) as peer:
                return peer.has([args.key], timeout=timeout, local_only=True)[0], ""
        except MeshError as e:
            return None, str(e)

    order = [*owners, *sorted(set(members) - set(owners))]
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(order)))) as pool:
        answers = dict(zip(order, pool.map(ask, order)))
    rows = []
    for node_id in order:
        held, error = answers[node_id]
        if node_id in owners or held:
            m = members[node_id]
            rows.append({"node_id": node_id, "address": m.address, "state": MemberState.Name(m.state),
                         "owner": node_id in owners, "rank": owners.index(node_id) + 1 if node_id in owners else 0,
                         "holds": held, "error": error})
    if args.json:
        _emit_json({"key": args.key, "replicas": s.replicas, "asked": s.node_id, "owners": owners, "members": rows})
    else:
        _table(f"owners of {args.key} in the ring of {s.node_id} ({_count(s.replicas, 'replica')})",
               ["id", "address", "state", "role", "holds a copy"], [
                   (r["node_id"], r["address"], r["state"],
                    ("primary owner" if r["rank"] == 1 else f"owner {r['rank']}") if r["owner"] else "not an owner",
                    "yes" if r["holds"] else "no" if r["holds"] is False else f"unknown: {r['error'] or 'not alive'}")
                   for r in rows])
    return 0 if any(r["holds"] for r in rows) else EXIT_NOT_FOUND  # held nowhere: as `mesh get` of a missing key


OWNER_ASK_TIMEOUT = 10.0  # seconds `mesh owners` waits for one member's answer, at most


def _changed(before: os.stat_result, path: Path) -> bool:
    """Whether the file at `path` is no longer the one `before` described (size, modification time, inode)."""
    try:
        now = path.stat()
    except OSError:
        return True  # removed or replaced by something unreadable meanwhile
    return (now.st_size, now.st_mtime_ns, now.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino)


def cmd_get(args: argparse.Namespace) -> int:
    if not args.output and not args.describe:
        raise CliError("give -o FILE to write the value, or --describe to show its structure", EXIT_USAGE)
    started = time.perf_counter()
    # A value above --max-size is refused from its header, before a byte of it is allocated or written: a node
    # may hold a value far larger on disk than on the wire (2 GiB of zeros crosses as 8 MiB).
    try:
        limits = Limits(max_blob_size=parse_size(args.max_size))
    except ValueError as e:
        raise CliError(f"--max-size: {e}", EXIT_USAGE) from None
    if args.output and args.output != "-" and not args.describe:
        # Streamed to a file beside the target, renamed once verified: constant memory, never a partial file.
        with _client(args, limits) as c, _ProgressBar(f"get {args.key}", not args.json) as bar:
            header = c.get_to_file(args.key, args.output, progress=bar)
        if header is None:
            raise CliError(f"key not found: {safe(args.key)}", EXIT_NOT_FOUND)
        seconds = time.perf_counter() - started
        if args.json:
            _emit_json({"key": args.key, "bytes": header.raw_size, "file": args.output, "seconds": round(seconds, 4)})
        else:
            print(f"wrote {format_size(header.raw_size)} to {args.output} in {seconds:.3f} s")
        return 0
    with _client(args, limits) as c, _ProgressBar(f"get {args.key}", not args.json) as bar:
        blob = c.get(args.key, progress=bar)
    if blob is None:
        raise CliError(f"key not found: {safe(args.key)}", EXIT_NOT_FOUND)
    seconds = time.perf_counter() - started
    if args.describe:
        from mesh import codec  # only here: the node and every other command never import the codec

        content = blob.header.meta.get("content", "")
        try:
            rows = codec.describe(blob.data)
        except codec.BlobFormatError as e:
            if content.startswith("comfy-value/") or not content:  # it should be one: a damaged value, say why
                raise CliError(f"{args.key} is not a tensor-tree blob: {e}") from None
            # The metadata says what it is (`mesh put` writes content=bytes): describe it by that, not as a
            # codec error ("bad magic") about a value that never claimed to be one.
            rows = [{"path": "", "type": "bytes", "bytes": len(blob.data), "content": content}]
        if args.json:
            _emit_json({"key": args.key, "bytes": len(blob.data), "meta": dict(blob.header.meta), "leaves": rows})
        else:
            print(safe(f"{args.key}: {format_size(len(blob.data))}, "
                       + ", ".join(f"{k}={v}" for k, v in blob.header.meta.items())))
            print("\n".join(safe(line) for line in format_description(rows).splitlines()))
    if args.output:
        out = Path(args.output)
        if str(out) == "-":
            sys.stdout.buffer.write(blob.data)
        else:
            out.write_bytes(blob.data)
        if not args.json and str(out) != "-":
            print(f"wrote {format_size(len(blob.data))} to {out} in {seconds:.3f} s")
        elif args.json and not args.describe:
            _emit_json({"key": args.key, "bytes": len(blob.data), "file": str(out), "seconds": round(seconds, 4)})
    return 0


def format_description(rows: list[dict[str, Any]]) -> str:
    """Rows from mesh.codec.describe() as aligned text, one line per leaf: display is the CLI's business, so the
    codec keeps to data."""
    paths = [r["path"] or "(value)" for r in rows]
    width = max(map(len, paths), default=0)
    lines = []
    for path, r in zip(paths, rows):
        if "dtype" in r:
            detail = f"{r['dtype']}{r['shape']}  {format_size(r['bytes'])}"
            detail += "  shuffled" if r.get("shuffle") else ""
            detail += "  as 8-bit levels" if r.get("levels") else ""
            detail += "  big-endian" if r.get("byteorder") == "big" else ""
        elif r["type"] == "bytes":
            detail = format_size(r["bytes"])
            if "content" in r:  # a whole value of raw bytes, described by its metadata
                detail += f"  raw bytes, as its metadata says (content={r['content']}): -o FILE writes them"
        elif "len" in r:
            detail = "empty"
        else:
            detail = _short_value(r["value"])
        lines.append(f"{path:<{width}}  {r['type']:<7}  {detail}")
    return "\n".join(lines)


def _short_value(v: object, limit: int = 80) -> str:
    """A scalar leaf's repr, cut to fit a line; a huge int by its size (str() of one is slow, and capped)."""
    if type(v) is int and v.bit_length() > 128:
        return f"<{v.bit_length()}-bit int>"
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_delete(args: argparse.Namespace) -> int:
    keys = list(dict.fromkeys(args.keys))  # a key named twice is one key
    with _client(args) as c:
        existed = c.delete_keys(keys)
    missing = [k for k, yes in zip(keys, existed) if not yes]
    if args.json:
        _emit_json({"deleted": len(keys) - len(missing), "missing": missing})
    else:
        print(f"deleted {len(keys) - len(missing)} of {_count(len(keys), 'key')}"
              + (f"; not found: {', '.join(safe(k) for k in missing)}" if missing else ""))
    return EXIT_NOT_FOUND if missing else 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete, on every member, each value whose provenance names the writer: what a revoked member wrote."""
    with _client(args) as c:
        deleted = c.purge(args.writer, timeout=_call_timeout(args))
    if args.json:
        _emit_json({"writer": args.writer, "deleted": deleted})
    else:
        print(safe(f"purged {_count(deleted, 'value')} written by {args.writer} (every member answered)"))
    return 0


# -- configuration: flags, MESH_* variables, the shared TOML file, defaults -----------------------------------------

_TLS_ENV = {"tls_cert": "MESH_TLS_CERT", "tls_key": "MESH_TLS_KEY", "tls_ca": "MESH_TLS_CA",
            "tls_server_name": "MESH_TLS_SERVER_NAME"}
# `mesh serve` settings that are byte sizes: checked where they are read, so a bad one names its setting.
_SIZES = ("max_memory", "min_free_ram", "max_disk", "chunk_size", "max_blob_size", "max_chunk_size",
          "max_message_size", "max_inflight")


def _configure(args: argparse.Namespace, problems: list[str] | None = None) -> None:
    """Every command: read the config file (--config, MESH_CONFIG, else the default path), then fill what the
    flags left open: the node to talk to, the secret and TLS files (`_resolve_client`), and for `serve` and
    `config` every serve setting. With `problems` (`mesh config`), bad values are listed there, not raised."""
    cfg = load_config(args.config, os.environ, args.serve_settings)
    args.config_file = cfg
    _resolve_client(args, cfg)
    if args.command in ("serve", "config"):
        args.settings_sources = resolve(args, args.serve_settings, os.environ, cfg.merged(), cfg.path, problems)
        for dest in _SIZES:
            try:
                parse_size(getattr(args, dest))
            except ValueError as e:
                setting = args.serve_settings[dest]
                error = SettingError(f"{setting.flag} ({_named_source(args.settings_sources[dest])}): {e}")
                if problems is None:
                    raise error from None
                problems.append(str(error))
                setattr(args, dest, setting.default)


def _named_source(source: str) -> str:
    """'env MESH_X' -> 'MESH_X', 'file P' -> 'in P': how an error names where a value came from."""
    if source.startswith("env "):
        return source[4:]
    return f"in {source[5:]}" if source.startswith("file ") else source


def _resolve_client(args: argparse.Namespace, cfg: ConfigFile) -> None:
    """The node, the cluster secret and the TLS files of any command: a flag, else its MESH_* variable, else the
    config file. So on a fleet whose file names them, `mesh status` needs no option at all. Records where each
    came from (args.sources) for `mesh config`; the secret itself is never kept there."""
    env, file = os.environ, cfg.merged()
    sources: dict[str, str] = {}
    in_file = f"in {cfg.path}"
    if args.node is not None:
        sources["node"] = "--node"
    elif env.get(NODE_ENV):
        args.node, sources["node"] = env[NODE_ENV], NODE_ENV
    elif "node" in file:
        args.node, sources["node"] = str(file["node"]), f"node {in_file}"
    elif "listen" in cfg.serve:  # the node this host's `mesh serve` runs, wherever it listens
        host, port = split_hostport(str(cfg.serve["listen"]))
        args.node = join_hostport("127.0.0.1" if host in WILDCARDS else host, port)
        sources["node"] = f"[serve] listen {in_file}"
    else:
        args.node, sources["node"] = f"127.0.0.1:{DEFAULT_PORT}", "default"
    args.file_secret = ""
    if args.secret_file is not None:
        sources["secret"] = f"--secret-file {args.secret_file}"
    elif SECRET_FILE_ENV in env:
        sources["secret"] = f"{SECRET_FILE_ENV} ({env[SECRET_FILE_ENV]})"
    elif SECRET_ENV in env:
        sources["secret"] = f"{SECRET_ENV} (the environment)"
    elif "secret_file" in file:
        args.secret_file = str(file["secret_file"])
        sources["secret"] = f"secret_file {args.secret_file} {in_file}"
    elif "secret" in file:  # the provider reads a secret from the same file: every command does too
        args.file_secret = str(file["secret"])
        sources["secret"] = f"secret {in_file}"
    else:
        sources["secret"] = "none"
    for dest, env_name in _TLS_ENV.items():
        if getattr(args, dest) is not None:
            sources[dest] = "--" + dest.replace("_", "-")
        elif env_name in env:
            sources[dest] = env_name
        elif dest in file:
            setattr(args, dest, str(file[dest]))
            sources[dest] = f"{dest} {in_file}"
    args.sources = sources


def _keyring(args: argparse.Namespace) -> Keyring | None:
    """The cluster secrets as `_resolve_client` found them: a file, MESH_SECRET, or a secret in the config file."""
    return load_keyring(args.secret_file) or (Keyring([args.file_secret.encode()]) if args.file_secret else None)


def _default_node_id(args: argparse.Namespace, problems: list[str]) -> tuple[str, str]:
    """What `mesh serve` names itself without --node-id (Node._pick_node_id), writing nothing."""
    if args.revoke and args.tls_cert:
        try:
            return subject_name(Path(args.tls_cert).read_bytes()), "its certificate's name (--revoke)"
        except (OSError, ValueError) as e:
            problems.append(f"--tls-cert: {e}")
    try:
        return describe_default(args.data_dir)
    except ValueError as e:
        problems.append(str(e))
        return "?", "the kept id cannot be read"


def _config_view(args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    """What `mesh serve` would run as here: TLS, where the secret comes from (never the secret), the node id and
    the address peers would dial; whatever cannot work is added to `problems`, naming the setting."""
    tls: dict[str, Any] = {"enabled": False}
    try:
        node_config = _serve_config(args)
        validate(node_config)
    except (ValueError, OSError) as e:  # ConfigError, a size or a file that does not work
        problems.append(str(e))
        node_config = None
    if args.tls_cert or args.tls_key or os.environ.get("MESH_TLS_CERT") or os.environ.get("MESH_TLS_KEY"):
        tls = {"enabled": True, "mutual": bool(args.tls_ca or os.environ.get("MESH_TLS_CA")),
               **{dest: {"value": getattr(args, dest) or os.environ.get(env, ""),
                         "from": args.sources.get(dest, "default")} for dest, env in _TLS_ENV.items()}}
    advertise = args.advertise or ""
    if not advertise:
        try:
            host, port = split_hostport(args.listen)
            advertise = join_hostport(advertised_host(host, ""), port) if port else f"{advertised_host(host, '')}:<port>"
        except ValueError as e:
            problems.append(str(e))
    if args.data_dir:
        try:
            check_data_dir(args.data_dir, create=False)
        except ConfigError as e:
            problems.append(str(e))
    if args.node_id:
        node_id, node_id_from = args.node_id, args.settings_sources.get("node_id", "--node-id")
    else:
        node_id, node_id_from = _default_node_id(args, problems)
    secret = (args.secret_file or os.environ.get(SECRET_FILE_ENV)
              or ("(MESH_SECRET)" if os.environ.get(SECRET_ENV) else "")
              or ("(secret in the config file)" if args.file_secret else "none: an open node"))
    return {"config_file": {"path": args.config_file.path, "why": args.config_file.why},
            "node_id": node_id, "node_id_from": node_id_from,
            "advertise": advertise, "tls": tls, "secret_file": secret, "secret_source": args.sources["secret"],
            "cli_node": {"value": args.node, "from": args.sources["node"]}, "valid": node_config is not None}


def cmd_config(args: argparse.Namespace) -> int:
    problems: list[str] = list(args.problems)
    view = _config_view(args, problems)
    rows = [{"setting": dest, "flag": setting.flag, "env": setting.env, "value": getattr(args, dest),
             "from": args.settings_sources[dest]} for dest, setting in sorted(args.serve_settings.items())]
    if args.json:
        _emit_json({"settings": rows, **view, "tls_cert": args.tls_cert or os.environ.get("MESH_TLS_CERT"),
                    "problems": problems})
    else:
        cfg = args.config_file
        _table(f"mesh serve settings (flag > env > file > default); config file: "
               f"{cfg.where() if cfg.path else 'none'}", ["setting", "value", "from", "env"],
               [(r["flag"], r["value"], r["from"], r["env"]) for r in rows])
        tls = view["tls"]
        print(safe(f"node id: {view['node_id']} ({view['node_id_from']})"))
        print(safe(f"advertised address: {view['advertise'] or '?'}"))
        print(safe(f"secret: {view['secret_source']}" if view["secret_source"] != "none"
                   else "secret: none: an open node (loopback only; `mesh secret FILE`, then --secret-file or "
                        "MESH_SECRET_FILE)"))
        print(safe("tls: off" if not tls["enabled"] else
                   f"tls: {'mutual' if tls['mutual'] else 'on'}: " + ", ".join(
                       f"{d[4:].replace('_', ' ')} {tls[d]['value']} ({tls[d]['from']})"
                       for d in _TLS_ENV if tls[d]["value"])))
        print(safe(f"other commands talk to: {view['cli_node']['value']} ({view['cli_node']['from']})"))
        for problem in problems:
            print(safe(f"mesh: invalid: {problem}"), file=sys.stderr)
    return EXIT_USAGE if problems else 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if not nodes:
        raise CliError("give --nodes NAME[,NAME...]", EXIT_USAGE)
    hosts = [h.strip() for h in (args.hosts or "").split(",") if h.strip()]
    try:
        written = init_tls(Path(args.directory), nodes, hosts=hosts, days=args.days, force=args.force)
    except FileExistsError as e:
        raise CliError(str(e)) from None
    if args.json:
        _emit_json({"written": [str(p) for p in written]})
    else:
        for path in written:
            print(f"wrote {path}")
        d = Path(args.directory)
        print(f"on node NAME: mesh --tls-cert {d}/NAME.pem --tls-key {d}/NAME-key.pem --tls-ca {d}/ca.pem serve ...")
        print(f"CLI and ComfyUI: --tls-cert {d}/client.pem --tls-key {d}/client-key.pem --tls-ca {d}/ca.pem "
              f"(or MESH_TLS_CERT, MESH_TLS_KEY, MESH_TLS_CA); keep ca-key.pem off the nodes")
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    """A new cluster secret (32 random bytes, base64) in a file only its owner can read, written in one step."""
    path = Path(args.file)
    if path.is_symlink() or path.exists():
        if not args.force:
            raise CliError(f"{path} exists: keep it, or --force to replace it (every node and ComfyUI then needs the "
                           "new one; see README, Rotating the secret)", EXIT_USAGE)
        if not path.is_symlink() and not path.is_file():  # --force replaces a secret file, never /dev/null
            raise CliError(f"{path} is not a regular file: not replaced", EXIT_USAGE)
    if path.parent.exists() and not path.parent.is_dir():
        raise CliError(f"cannot write {path}: {path.parent} is not a folder")
    secret = base64.b64encode(os.urandom(32)) + b"\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, secret, 0o600, exclusive=not args.force)  # never overwritten without --force
    except FileExistsError:
        raise CliError(f"{path} appeared while the secret was written: not replaced", EXIT_USAGE) from None
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None
    if args.json:
        _emit_json({"written": str(path)})
    else:
        print(f"wrote a new cluster secret to {path} (readable by its owner only)")
        print(f"nodes: mesh --secret-file {path} serve ...; ComfyUI: MESH_SECRET_FILE={path}; the CLI: "
              f"mesh --secret-file {path} ...")
    return 0


def cmd_install_comfyui(args: argparse.Namespace) -> int:
    """The provider into ComfyUI's custom_nodes, comfy-mesh into ComfyUI's Python: mesh/install_comfyui.py."""
    from mesh.install_comfyui import InstallError, install

    try:
        return install(args.comfyui_dir, args.python, copy=args.copy, force=args.force)
    except InstallError as e:
        raise CliError(str(e)) from None


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (journald, Loki, CloudWatch)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


# -- parser --------------------------------------------------------------------------------------------------

# dest of every global option: they work before the command and after it (`mesh -v serve`, `mesh serve -v`).
GLOBAL_OPTIONS = ("node", "secret_file", "tls_cert", "tls_key", "tls_ca", "tls_server_name", "config", "timeout",
                  "verbose", "log_format")


def _add_global_options(p: argparse.ArgumentParser, after_command: bool = False) -> None:
    """The global options, on the top parser or (after_command: hidden, and set only when given, so that one
    given before the command stands) on a command's. Their defaults are filled in later (`_resolve_client`):
    a flag, else its variable, else the config file."""
    def add(*flags: str, default: Any = None, **kwargs: Any) -> None:
        if after_command:
            kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            kwargs["default"] = default
        p.add_argument(*flags, **kwargs)

    add("--node", help=f"node to talk to, HOST:PORT (env {NODE_ENV}, else `node` in the config file; default "
                       f"127.0.0.1:{DEFAULT_PORT})")
    add("--secret-file", help=f"cluster secret file (env {SECRET_FILE_ENV} or {SECRET_ENV}, else secret_file in the "
                              f"config file)")
    add("--tls-cert", help="PEM certificate: serve and dial TLS only (env MESH_TLS_CERT, else tls_cert in the config "
                           "file)")
    add("--tls-key", help="PEM private key of --tls-cert (env MESH_TLS_KEY)")
    add("--tls-ca", help="PEM CA: verify peers against it and require client certificates (env MESH_TLS_CA)")
    add("--tls-server-name", help="name verified in node certificates (default comfy-mesh; '' = the host dialled; "
                                  "env MESH_TLS_SERVER_NAME)")
    add("--config", help=f"TOML settings file (env {CONFIG_ENV}; default {DEFAULT_CONFIG} when it exists, '' for "
                         f"none); flags, then MESH_* variables, then it, win")
    add("--timeout", type=_seconds,
        help="seconds the whole command may take (each call, and all of them); default: 60 per call")
    add("-v", "--verbose", action="store_true", default=False, help="debug logging")
    add("--log-format", choices=["text", "json"], default=os.environ.get("MESH_LOG_FORMAT", "text"),
        help="log lines as text or as one JSON object each (env MESH_LOG_FORMAT)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mesh", description="comfy-mesh: a shared cache for ComfyUI fleets",
                                allow_abbrev=False)
    _add_global_options(p)
    p.add_argument("--version", action="version",
                   version=f"comfy-mesh {mesh.__version__} (protocol {mesh.PROTOCOL_VERSION})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        sp.set_defaults(fn=fn)
        _add_global_options(sp, after_command=True)
        if name != "serve":
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    s = command("serve", cmd_serve, "run a mesh node in the foreground")
    s.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", help="HOST:PORT to serve on (port 0: any)")
    s.add_argument("--node-id", help="id of this node, unique in the mesh (default: HOSTNAME-RANDOM, kept in "
                                     "--data-dir/node-id so a restart keeps it; new at each start without "
                                     "--data-dir; with --revoke, the certificate's name)")
    s.add_argument("--max-memory", default="4GiB", help="byte budget of the blob store (default 4GiB)")
    s.add_argument("--data-dir", default="",
                   help="keep blobs on disk here too: a restarted node serves what it had (env MESH_DATA_DIR; "
                        "default: RAM only)")
    s.add_argument("--max-disk", default="16GiB",
                   help="byte budget of --data-dir (env MESH_MAX_DISK; default 16GiB)")
    s.add_argument("--eviction", choices=POLICIES, default=DEFAULT_POLICY,
                   help="what a full store (RAM and disk) drops first: cost (the value that saves the fewest compute "
                        "seconds per byte, GreedyDual-Size-Frequency) or lru (env MESH_EVICTION; default cost)")
    s.add_argument("--metrics-listen", default="",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (env MESH_METRICS_LISTEN)")
    s.add_argument("--min-free-ram", default="1GiB", help="evict while the host has less RAM available (1GiB)")
    s.add_argument("--chunk-size", default="1MiB", help="raw bytes per chunk sent (default 1MiB)")
    s.add_argument("--max-blob-size", default="2GiB", help="largest value accepted (default 2GiB)")
    s.add_argument("--max-chunk-size", default="16MiB", help="largest raw chunk accepted (default 16MiB)")
    s.add_argument("--max-message-size", default="20MiB", help="gRPC message cap (default 20MiB)")
    s.add_argument("--max-transfers", type=int, default=16, help="concurrent Get/Put streams (default 16)")
    s.add_argument("--compress", choices=MODES, default=AUTO,
                   help="lz4 per transfer: auto (only where the measured link is slower than lz4), off, or lz4 "
                        "(always; values put through this node are stored compressed) (env MESH_COMPRESS)"),
    s.add_argument("--max-inflight", default="0",
                   help="bytes all concurrent puts may hold before they are stored (default 0: --max-memory)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a put may take to send its header before it is cancelled (default 10)")
    s.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds a transfer may stall before it is cancelled (default 30)")
    s.add_argument("--ready-file", help="write {address, node_id} as JSON here once serving (for scripts)")
    s.add_argument("--advertise", help="HOST:PORT peers should dial (default: the listen address)")
    s.add_argument("--cluster", default="default", help="cluster name; nodes of other clusters are ignored")
    s.add_argument("--seeds", default="",
                   help="comma-separated HOST:PORT or dns:NAME:PORT of nodes to join (env MESH_SEEDS)")
    s.add_argument("--zeroconf", action="store_true", help="advertise and discover peers with mDNS")
    s.add_argument("--revoke", default="",
                   help="comma-separated certificate names of members this node refuses, with what they wrote "
                        "(needs mutual TLS; env MESH_REVOKE)")
    s.add_argument("--zeroconf-interfaces", help="comma-separated addresses for mDNS (default: all)")
    s.add_argument("--replicas", type=int, default=2, help="owners per key (default 2)")
    s.add_argument("--write-acks", type=int, default=1, help="owners a put waits for (default 1)")
    s.add_argument("--repair-interval", type=float, default=10.0,
                   help="seconds between anti-entropy passes; one also runs after every membership change (10)")
    s.add_argument("--heartbeat", type=float, default=0.5,
                   help="SWIM probe period: seconds between this node's probes of one member (default 0.5)")
    s.add_argument("--suspect-after", type=float, default=2.0,
                   help="with --dead-after: a suspicion lasts at least dead-after minus suspect-after seconds (2)")
    s.add_argument("--dead-after", type=float, default=5.0,
                   help="see --suspect-after; SWIM stretches the window with log(members) (5)")
    s.add_argument("--drain-on-term", action="store_true",
                   help="on SIGTERM, hand keys to their new owners before stopping")

    p.set_defaults(serve_settings=settings_of(s, skip=("ready_file", *GLOBAL_OPTIONS)))
    command("config", cmd_config, "the settings `mesh serve` would run with here and where each comes from, TLS, "
                                  "the secret's source, node id and advertised address; exit 2 naming any invalid one")
    command("status", cmd_status, "health and summary of a node")
    command("stats", cmd_stats, "counters of a node")
    t = command("top", cmd_top, "a live view of a node: rates, memory, members (Ctrl-C to leave)")
    t.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    t.add_argument("--iterations", type=int, default=0, help="stop after this many refreshes (0: never)")
    k = command("keys", cmd_keys, "list the keys a node stores, with sizes and ages")
    k.add_argument("--prefix", default="", help="only keys starting with this")
    k.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    k.add_argument("--namespace", default="", help="only provider keys of this MESH_NAMESPACE")
    k.add_argument("--class-type", default="", help="only values of this ComfyUI class type (e.g. VAEDecode)")
    k.add_argument("--full", action="store_true", help="whole keys, even where they wrap")
    pt = command("put", cmd_put, "store a file's bytes under KEY")
    pt.add_argument("key")
    pt.add_argument("file")
    pt.add_argument("--meta", action="append", default=[], metavar="K=V", help="content metadata (repeatable)")
    g = command("get", cmd_get, "fetch KEY bit-exactly into a file, or describe a tensor blob")
    g.add_argument("key")
    g.add_argument("-o", "--output", help="file to write ('-' for stdout)")
    g.add_argument("--describe", action="store_true", help="print the structure of a ComfyUI value blob")
    g.add_argument("--max-size", default="2GiB",
                   help="largest value to accept, refused before it is allocated (default 2GiB)")
    d = command("delete", cmd_delete, "delete KEYs")
    d.add_argument("keys", nargs="+")
    pg = command("purge", cmd_purge, "delete on every member what one writer wrote (`mesh keys` shows who wrote what)")
    pg.add_argument("--writer", required=True, help="a member id or certificate name from a value's provenance")
    ow = command("owners", cmd_owners, "which members own KEY in the ring, their state, and which hold a copy")
    ow.add_argument("key")
    command("peers", cmd_peers, "members of the mesh as a node sees them")
    command("ring", cmd_ring, "ownership share of each member")
    command("drain", cmd_drain, "make a node leave: hand its keys to their new owners, then stop")
    tls = sub.add_parser("tls", help="TLS certificates for a mesh", description="TLS certificates for a mesh")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True, metavar="COMMAND")
    ti = tls_sub.add_parser("init", help="write a new CA and a certificate per node (and one for clients)",
                            description="write a new CA and a certificate per node (and one for clients)")
    ti.set_defaults(fn=cmd_tls_init)
    _add_global_options(ti, after_command=True)
    ti.add_argument("directory")
    ti.add_argument("--nodes", required=True, help="comma-separated node names (one certificate each)")
    ti.add_argument("--hosts", default="", help="extra comma-separated DNS names or IPs for every certificate")
    ti.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    ti.add_argument("--force", action="store_true", help="overwrite existing files")
    ti.add_argument("--json", action="store_true", help="machine-readable output")
    sc = command("secret", cmd_secret, "write a new cluster secret to FILE (0600), for every node and ComfyUI")
    sc.add_argument("file")
    sc.add_argument("--force", action="store_true", help="replace an existing file")
    ic = command("install-comfyui", cmd_install_comfyui, "add the comfy-mesh provider to a ComfyUI folder")
    ic.add_argument("comfyui_dir", help="the ComfyUI folder (with main.py and custom_nodes/)")
    ic.add_argument("--python", help="ComfyUI's Python: install this comfy-mesh into it (from its checkout or wheel) "
                                      "and check that it imports")
    ic.add_argument("--copy", action="store_true", help="copy provider/ instead of linking it")
    ic.add_argument("--force", action="store_true", help="replace an existing custom_nodes/comfy_mesh")
    return p


CALL_TIMEOUT = 60.0  # seconds one call may take when --timeout is not given
MAX_TIMEOUT = 1e6


def _seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above 0, at most MAX_TIMEOUT."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_TIMEOUT:g} seconds, not {text}")
    return value


def _call_timeout(args: argparse.Namespace) -> float:
    return args.timeout if args.timeout is not None else CALL_TIMEOUT


class CommandTimeout(Exception):
    """--timeout ran out for the command as a whole (a file that never ends, a long queue of calls)."""


@contextlib.contextmanager
def _whole_command_deadline(args: argparse.Namespace) -> Iterator[None]:
    """With --timeout, the whole command ends by then: each call has that deadline, and a SIGALRM stops what no
    call bounds (reading the file to put, many calls in turn). Not for `serve` and `top`, which run until
    stopped."""
    if args.timeout is None or args.command in ("serve", "top") or threading.current_thread() is not \
            threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise CommandTimeout(f"the command ran past --timeout {args.timeout:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(args.timeout, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_NO_CONFIG = ("tls", "secret", "install-comfyui")  # commands that neither run nor call a node


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    for noisy in ("grpc", "zeroconf", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command not in _NO_CONFIG:
            args.problems = []
            _configure(args, args.problems if args.command == "config" else None)
        with _whole_command_deadline(args):
            return args.fn(args)
    except CommandTimeout as e:
        print(f"mesh: {e}", file=sys.stderr)
        return EXIT_FAILED
    except SettingError as e:
        print(f"mesh: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as e:
        print(f"mesh: {e}", file=sys.stderr)
        return e.exit_code
    except ConfigError as e:
        print(f"mesh: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MeshError as e:
        print(f"mesh: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as e:
        print(f"mesh: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
