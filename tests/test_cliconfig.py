"""Issue 22, items 6 to 10, end to end: one config file for every `mesh` command, errors that say what to do,
a --data-dir the node cannot write, and counts that agree. Real `mesh serve` processes and real CLI calls.

The default config path (/etc/comfy-mesh/mesh.toml) is moved with MESH_CONFIG_DEFAULT, so no test needs root
or touches /etc.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from mesh.transport.tls import init_tls
from tests.conftest import SECRET, free_port
from tests.support.cli import run_cli
from tests.support.poll import poll
from tests.support.serve import ServeProcess, start_serve


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh: "), r.stderr
    return lines[0]


def mesh(*args: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=60, **kwargs)  # type: ignore[arg-type]


# -- item 6: one config for everything -----------------------------------------------------------------------------

def test_the_provider_keys_mesh_checks_are_the_provider_s() -> None:
    """mesh/settings.py lists the provider's keys (it may not import provider/): the lists must agree, or a
    provider setting in the shared file would be called unknown by `mesh`, or a typo of one accepted."""
    from mesh.settings import PROVIDER_KEYS
    from provider.config import ProviderConfig

    assert PROVIDER_KEYS == {f.name for f in fields(ProviderConfig)}


@pytest.fixture
def tls_fleet_config(tmp_path: Path, secret_file: Path) -> Iterator[tuple[Path, ServeProcess]]:
    """A mutual-TLS node with a secret, started by a plain `mesh serve` that finds everything in the default
    config file (MESH_CONFIG_DEFAULT points at it, as /etc/comfy-mesh/mesh.toml would be found)."""
    certs = tmp_path / "tls"
    init_tls(certs, ["n1"])
    config = tmp_path / "etc-mesh.toml"
    port = free_port()
    config.write_text(f'secret_file = "{secret_file}"\n'
                      f'tls_cert = "{certs}/client.pem"\ntls_key = "{certs}/client-key.pem"\ntls_ca = "{certs}/ca.pem"\n'
                      f'max_memory = "256MiB"\n'
                      f'[serve]\nlisten = "127.0.0.1:{port}"\nnode_id = "n1"\n'
                      f'tls_cert = "{certs}/n1.pem"\ntls_key = "{certs}/n1-key.pem"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_CONFIG_DEFAULT"] = str(config)
    node = start_serve(tmp_path, "n1", env=env, listen=f"127.0.0.1:{port}")
    try:
        yield config, node
    finally:
        node.kill()


def test_every_command_reads_the_default_config_file_on_a_tls_fleet(tls_fleet_config: tuple[Path, ServeProcess],
                                                                     tmp_path: Path) -> None:
    """Seen: CLI commands ignored the config file (a TLS fleet needed the secret and three TLS options on every
    call) and there was no default path (a plain `mesh serve` started an open node on loopback)."""
    config, node = tls_fleet_config
    log = node.log()
    assert "auth on" in log and "tls mutual" in log and "mesh node n1" in log  # serve read the default file
    env = {"MESH_CONFIG_DEFAULT": str(config)}
    value = tmp_path / "v.bin"
    value.write_bytes(os.urandom(100_000))
    r = mesh("put", "k", str(value), env=env)  # no --node, no secret, no TLS option: all from the file
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out.bin"
    assert mesh("get", "k", "-o", str(out), env=env).returncode == 0 and out.read_bytes() == value.read_bytes()
    r = mesh("status", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["node_id"] == "n1", r.stderr
    # --config and MESH_CONFIG name another file (here: none at all), and win over the default path: then the
    # node is TLS-only and the error says so, and what to set.
    for how in ({"MESH_CONFIG": ""}, {}):
        args = ("--config", "", "status") if not how else ("status",)
        r = mesh(*args, "--node", node.address, env={**env, **how})
        line = one_line(r)
        assert r.returncode == 1 and "seems to serve TLS only" in line and "MESH_TLS_CERT" in line, line


@pytest.mark.parametrize("text, key, place", [
    ('max_memroy = "1GiB"\n', "max_memroy (did you mean max_memory?)", "at the top level"),
    ('[serve]\nheartbeats = 1\n', "heartbeats (did you mean heartbeat?)", "in [serve]"),
    ('[servr]\nheartbeat = 1\n', "servr (did you mean serve?)", "at the top level"),
    ('[serve]\nnode = "127.0.0.1:1"\n', "node", "in [serve]"),
])
def test_unknown_keys_anywhere_are_errors_naming_key_and_file(tmp_path: Path, text: str, key: str,
                                                              place: str) -> None:
    """Seen: an unknown top-level key (`max_memroy`) was ignored, silently (only [serve] was checked)."""
    toml = tmp_path / "mesh.toml"
    toml.write_text(text)
    for args in (("status",), ("config",), ("serve",), ("--node", "127.0.0.1:1", "keys")):
        r = mesh(*args, env={"MESH_CONFIG": str(toml)})
        line = one_line(r)
        assert r.returncode == 2 and f"config file {toml}" in line and f"{place}: {key}" in line, (args, line)
    r = mesh("status", env={"MESH_CONFIG_DEFAULT": str(toml)})  # the default file is checked as strictly
    assert r.returncode == 2 and "(the default path)" in one_line(r)


def test_mesh_config_validates_and_shows_tls_secret_source_id_and_address(tmp_path: Path,
                                                                          secret_file: Path) -> None:
    """Seen: `mesh config` showed MESH_MAX_MEMORY=lots with exit 0, and said nothing of TLS, the node id or the
    address peers would dial."""
    r = mesh("config", env={"MESH_MAX_MEMORY": "lots", "MESH_HEARTBEAT": "fast"})
    assert r.returncode == 2
    assert "--max-memory (MESH_MAX_MEMORY): not a size: 'lots'" in r.stderr
    assert "MESH_HEARTBEAT must be a float" in r.stderr  # every problem, not just the first
    r = mesh("serve", env={"MESH_MAX_MEMORY": "lots"})  # serve refuses it the same way, before starting
    assert r.returncode == 2 and "--max-memory (MESH_MAX_MEMORY): not a size" in one_line(r)
    r = mesh("config", "--json", env={"MESH_SEEDS": "10.0.0.5:8288"})  # an open node with seeds: serve refuses
    assert r.returncode == 2 and any("without a cluster secret" in p for p in json.loads(r.stdout)["problems"])

    certs = tmp_path / "tls"
    init_tls(certs, ["n1"])
    toml = tmp_path / "mesh.toml"
    toml.write_text(f'secret_file = "{secret_file}"\n[serve]\nlisten = "127.0.0.1:9123"\nnode_id = "gpu7"\n'
                    f'tls_cert = "{certs}/n1.pem"\ntls_key = "{certs}/n1-key.pem"\ntls_ca = "{certs}/ca.pem"\n')
    r = mesh("config", "--json", env={"MESH_CONFIG": str(toml)})
    assert r.returncode == 0, r.stdout + r.stderr
    view = json.loads(r.stdout)
    assert view["problems"] == [] and view["node_id"] == "gpu7" and view["advertise"] == "127.0.0.1:9123"
    assert view["tls"]["enabled"] and view["tls"]["mutual"]
    assert view["tls"]["tls_cert"] == {"value": f"{certs}/n1.pem", "from": f"tls_cert in {toml}"}
    assert view["secret_source"] == f"secret_file {secret_file} in {toml}"
    assert view["cli_node"] == {"value": "127.0.0.1:9123", "from": f"[serve] listen in {toml}"}
    r = mesh("config", env={"MESH_CONFIG": str(toml), "MESH_SECRET": "s3cr3t-value"})
    assert r.returncode == 0 and "secret: MESH_SECRET (the environment)" in r.stdout
    assert "tls: mutual" in r.stdout and "node id: gpu7" in r.stdout and "advertised address: 127.0.0.1:9123" in r.stdout
    assert "s3cr3t-value" not in r.stdout + r.stderr and SECRET.decode() not in r.stdout  # never the secret
    broken = tmp_path / "broken.toml"
    broken.write_text(f'tls_cert = "{tmp_path}/missing.pem"\ntls_key = "{certs}/client-key.pem"\n')
    r = mesh("status", env={"MESH_CONFIG": str(broken)})  # a file from the config file is named as from there
    assert r.returncode == 1 and f"missing.pem (tls_cert in {broken}) does not exist" in one_line(r)


def test_mesh_config_shows_the_default_id_a_start_would_use_and_writes_nothing(tmp_path: Path) -> None:
    """The default id is drawn once and kept in the data dir (mesh/node_id.py): `mesh config` shows the kept one,
    or the pattern before the first start, and never draws or writes one itself."""
    data = tmp_path / "data"
    r = mesh("config", "--json", env={"MESH_DATA_DIR": str(data)})
    view = json.loads(r.stdout)
    assert r.returncode == 0 and view["problems"] == [], r.stdout + r.stderr
    assert view["node_id"].endswith("-<random>") and "kept in" in view["node_id_from"], view
    assert not data.exists()  # not even the folder: the node makes it at its first start
    data.mkdir()
    (data / "node-id").write_text("gpu3-0a1b2c3d\n")
    view = json.loads(mesh("config", "--json", env={"MESH_DATA_DIR": str(data)}).stdout)
    assert (view["node_id"], view["node_id_from"]) == ("gpu3-0a1b2c3d", f"kept in {data / 'node-id'}")


def test_global_options_work_anywhere_on_the_line(tmp_path: Path, secret_file: Path) -> None:
    """Seen: `mesh serve --log-format json` and `-v` after the command were rejected (exit 2)."""
    # A seed nobody answers at: its failed pings are logged at debug level, which only -v shows.
    node = start_serve(tmp_path, "json", "--log-format", "json", "-v", "--max-memory", "64MiB",
                       "--seeds", f"127.0.0.1:{free_port()}", secret_file=secret_file)
    try:
        def records() -> list[dict[str, str]]:
            return [json.loads(line) for line in node.log().splitlines() if line.strip()]  # all JSON

        poll(lambda: any(r["level"] == "DEBUG" for r in records()), "a debug line, in JSON", timeout=20)
        assert any("serving on" in r["message"] for r in records())
        for args in (("-v", "status"), ("status", "-v", "--node", node.address, "--timeout", "5",
                                        "--secret-file", str(secret_file))):
            r = mesh(*args, env={"MESH_NODE": node.address, "MESH_SECRET_FILE": str(secret_file)})
            assert r.returncode == 0 and node.node_id in r.stdout, (args, r.stderr)
    finally:
        node.kill()


# -- item 8: a --data-dir the node cannot write -----------------------------------------------------------------

@pytest.fixture
def unwritable_dir() -> Iterator[tuple[Path, list[str]]]:
    """(a data dir that the `mesh serve` run through `wrap` cannot write, wrap): a folder read-only to its owner.
    Root writes it anyway, so as root the node runs in a user namespace of its own (`unshare --user`): still the
    folder's owner, without the capability that overrides permissions, as a service user would be."""
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data"
        data.mkdir()
        os.chmod(data, 0o555)
        try:
            yield data, (["unshare", "--user"] if os.geteuid() == 0 else [])
        finally:
            os.chmod(data, 0o755)


def test_a_data_dir_the_node_cannot_write_is_refused_at_start(unwritable_dir: tuple[Path, list[str]]) -> None:
    """Seen: accepted; every put then logged Permission denied and the values were RAM only, silently."""
    data, wrap = unwritable_dir
    r = run_cli("serve", "--listen", "127.0.0.1:0", "--min-free-ram", "0", "--max-memory", "64MiB",
                "--data-dir", str(data), wrap=wrap, timeout=20)
    line = one_line(r)
    assert r.returncode == 2, line
    assert f"cannot use --data-dir {data} (MESH_DATA_DIR): Permission denied" in line and "chown" in line, line
    assert not list(data.iterdir())


def test_a_default_config_this_user_cannot_read_is_an_error_not_an_open_node(
        unwritable_dir: tuple[Path, list[str]]) -> None:
    """Seen (README recipe run as a non-root admin): /etc/comfy-mesh is root:comfy-mesh 0750, so for anyone else
    the default file did not exist: the CLI spoke plaintext to a TLS node, and `mesh serve` would have started an
    open loopback node. Now it is an error naming the file and what to do."""
    folder, wrap = unwritable_dir
    config = folder / "mesh.toml"
    os.chmod(folder, 0o755)
    config.write_text('secret = "s"\n')
    os.chmod(folder, 0o000)  # like /etc/comfy-mesh to a user outside its group
    try:
        for args in (["status"], ["config"], ["serve", "--listen", "127.0.0.1:0"]):
            r = run_cli(*args, env={"MESH_CONFIG_DEFAULT": str(config)}, wrap=wrap, timeout=20)
            line = one_line(r)
            assert r.returncode == 2, (args, r.stdout, line)
            assert f"cannot read the config file {config} (the default path): Permission denied: run as root" in line
    finally:
        os.chmod(folder, 0o755)


def test_failed_disk_writes_show_in_status(tmp_path: Path, secret_file: Path) -> None:
    """A disk tier that stops taking values (here: a value larger than --max-disk) is a warning in `mesh
    status` and in its disk line, not only a log line per put."""
    node = start_serve(tmp_path, "disk", "--max-memory", "64MiB", "--data-dir", str(tmp_path / "data"),
                       "--max-disk", "1MiB", secret_file=secret_file)
    try:
        big = tmp_path / "big"
        big.write_bytes(os.urandom(2 << 20))
        cli = {"node": node.address, "secret_file": secret_file}
        assert run_cli("put", "big", str(big), **cli).returncode == 0  # type: ignore[arg-type]
        r = run_cli("status", **cli, env={"COLUMNS": "200"})  # type: ignore[arg-type]
        assert r.returncode == 0
        assert "warning: disk tier: 1 value not written to disk since start" in r.stderr, r.stderr
        assert "does not fit --max-disk" in r.stderr and "RAM only" in r.stderr
        assert "1 failed write" in r.stdout
        status = json.loads(run_cli("status", "--json", **cli).stdout)  # type: ignore[arg-type]
        assert status["disk"]["errors"] == 1 and any(w.startswith("disk tier:") for w in status["warnings"])

        def held() -> tuple[int, int]:  # `mesh peers` counts the RAM-only value, its keys and its bytes
            row = json.loads(run_cli("peers", "--json", **cli).stdout)[0]  # type: ignore[arg-type]
            return row["keys"], row["bytes"]

        poll(lambda: held()[0] == 1, "the node reports the value it holds in RAM only", timeout=20)
        assert held()[1] >= 2 << 20
    finally:
        node.kill()


# -- item 10: counts and wording ----------------------------------------------------------------------------

def test_status_peers_and_stats_agree_and_read_well(tmp_path: Path, secret_file: Path) -> None:
    """Seen: `mesh peers` counted disk-only keys but RAM-only bytes (after a restart: 2 keys, 0 B), `mesh status`
    had no disk line, `mesh stats` showed max_memory 768 MiB for --max-memory 1GiB unexplained and
    `disk_entries 0 B`, and `1 passes`, `1 keys`."""
    data = tmp_path / "data"
    args = ("--max-memory", "1GiB", "--data-dir", str(data), "--node-id", "d1")
    node = start_serve(tmp_path, "d1", *args, secret_file=secret_file)
    cli = {"node": node.address, "secret_file": secret_file}
    try:
        value = tmp_path / "v"
        for key in ("a", "b"):
            value.write_bytes(os.urandom(300_000))
            assert run_cli("put", key, str(value), **cli).returncode == 0  # type: ignore[arg-type]
    finally:
        node.stop()
    node = start_serve(tmp_path, "d1", *args, secret_file=secret_file, listen=node.address)  # RAM empty, disk not
    try:
        stats = json.loads(run_cli("stats", "--json", **cli).stdout)["counters"]  # type: ignore[arg-type]
        assert stats["entries"] == 0 and stats["disk_entries"] == 2

        def peer_row() -> dict[str, object]:
            rows = json.loads(run_cli("peers", "--json", **cli).stdout)  # type: ignore[arg-type]
            return next(r for r in rows if r["node_id"] == "d1")

        poll(lambda: peer_row()["keys"] == 2, "the node reports what it holds", timeout=20)
        assert peer_row()["bytes"] == stats["disk_bytes_used"]  # same tier as the keys: 0 B before
        peers = run_cli("peers", **cli, env={"COLUMNS": "200"})  # type: ignore[arg-type]
        assert "keys held" in peers.stdout and "bytes held" in peers.stdout

        status = run_cli("status", **cli, env={"COLUMNS": "200"})  # type: ignore[arg-type]
        assert status.returncode == 0
        disk_line = next(line for line in status.stdout.splitlines() if "│ disk" in line)
        assert "of 16.0 GiB in 2 keys" in disk_line, status.stdout
        assert "(1.0 GiB --max-memory)" in status.stdout
        out = run_cli("stats", **cli, env={"COLUMNS": "200"}).stdout  # type: ignore[arg-type]
        row = {m.group(1): m.group(2).strip() for m in re.finditer(r"│ (\w+)\s+│ (.*?)│", out)}
        assert row["disk_entries"] == "2" and row["disk_errors"] == "0" and row["entries"] == "0"
        assert row["max_memory"].startswith("768.0 MiB (for owned keys: --max-memory 1.0 GiB less the near cache")
        assert row["disk_bytes_used"].endswith("KiB") and row["max_disk"] == "16.0 GiB"
        for text in (status.stdout, out, peers.stdout):
            assert not re.search(r"\b1 (passes|keys|copies|puts|replicas|members|values)\b", text), text
    finally:
        node.kill()


@pytest.fixture
def pair(serve: Callable[..., ServeProcess], secret_file: Path) -> tuple[ServeProcess, ServeProcess]:
    """Two nodes that see each other ALIVE."""
    a = serve("--node-id", "a")
    b = serve("--node-id", "b", "--seeds", a.address)

    def both_alive() -> bool:
        r = run_cli("peers", "--json", node=b.address, secret_file=secret_file)
        return r.returncode == 0 and sorted(m["node_id"] for m in json.loads(r.stdout) if m["state"] == "ALIVE") \
            == ["a", "b"]

    poll(both_alive, "a and b see each other", timeout=30)
    return a, b


def test_put_shows_owners_and_acks_and_mesh_owners_shows_who_holds_it(pair: tuple[ServeProcess, ServeProcess],
                                                                      secret_file: Path, tmp_path: Path) -> None:
    """Seen: `mesh put` did not say which nodes own and acknowledged the key; there was no `mesh owners`."""
    a, b = pair
    value = tmp_path / "v"
    value.write_bytes(os.urandom(50_000))
    cli = {"node": b.address, "secret_file": secret_file}
    r = run_cli("put", "img/1", str(value), "--json", **cli)  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    put = json.loads(r.stdout)
    assert sorted(put["owners"]) == ["a", "b"] and put["acked"] and set(put["acked"]) <= {"a", "b"}
    r = run_cli("put", "img/2", str(value), **cli)  # type: ignore[arg-type]
    assert re.search(r"owners: [ab], [ab]; acknowledged by [ab]", r.stdout), r.stdout

    def owners() -> dict[str, object]:
        r = run_cli("owners", "img/1", "--json", **cli)  # type: ignore[arg-type]
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert owners()["owners"] == put["owners"]  # the same ring the put was routed by
    poll(lambda: all(m["holds"] for m in owners()["members"]), "both owners hold img/1 (one in the background)")
    view = owners()
    assert [(m["node_id"], m["state"], m["rank"]) for m in view["members"]] == \
        [(o, "ALIVE", i + 1) for i, o in enumerate(put["owners"])]
    human = run_cli("owners", "img/1", **cli, env={"COLUMNS": "200"})  # type: ignore[arg-type]
    assert "primary owner" in human.stdout and "owner 2" in human.stdout and "yes" in human.stdout
    missing = run_cli("owners", "nothing", **cli)  # type: ignore[arg-type]
    assert missing.returncode == 3 and "primary owner" in missing.stdout and "no" in missing.stdout


def test_mesh_owners_says_when_an_owner_cannot_be_asked(pair: tuple[ServeProcess, ServeProcess],
                                                        secret_file: Path, tmp_path: Path) -> None:
    """An owner that does not answer is 'unknown' with the reason, never a 'no' that reads like a lost copy."""
    import signal

    a, b = pair
    value = tmp_path / "v"
    value.write_bytes(b"x" * 1000)
    assert run_cli("put", "k", str(value), node=b.address, secret_file=secret_file).returncode == 0
    a.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        # Soon after, a is still in b's ring (ALIVE or SUSPECT): asked, no answer. Later it is DEAD and out of
        # the ring: not an owner any more, and not listed unless it holds a copy. Either way never a "no".
        human = run_cli("owners", "k", node=b.address, secret_file=secret_file, rpc_timeout=3,
                        env={"COLUMNS": "250"})
        assert human.returncode == 0, human.stderr  # b holds it
        row_a = [line for line in human.stdout.splitlines() if line.startswith("│ a ")]
        assert not row_a or ("unknown: node" in row_a[0] and "unreachable" in row_a[0]), human.stdout
        r = run_cli("owners", "k", "--json", node=b.address, secret_file=secret_file, rpc_timeout=3)
        assert r.returncode == 0, r.stderr
        rows = {m["node_id"]: m for m in json.loads(r.stdout)["members"]}
        if "a" in rows:
            assert rows["a"]["holds"] is None and "unreachable" in rows["a"]["error"], rows["a"]
        assert rows["b"]["holds"] is True
    finally:
        a.process.send_signal(signal.SIGCONT)
