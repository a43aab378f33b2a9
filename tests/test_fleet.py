"""What an operator meets on real hosts: addresses, seeds, settings and their errors, metrics, logs."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh import node as node_module
from mesh.node import ConfigError, advertised_host
from mesh.transport.peer import PeerClient
from tests.conftest import SECRET, free_port, poll
from tests.support.cli import run_cli
from tests.support.serve import ServeProcess


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]




def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("comfy-mesh ") and "protocol" in r.stdout


@pytest.mark.parametrize("args, names", [
    (["--heartbeat", "0"], "--heartbeat"),
    (["--replicas", "0"], "--replicas"),
    (["--replicas", "2", "--write-acks", "5"], "--write-acks"),
    (["--suspect-after", "3", "--dead-after", "2"], "--dead-after"),
    (["--listen", "localhost:99999"], "--listen"),
    (["--max-transfers", "0"], "--max-transfers"),
])
def test_settings_that_cannot_work_are_usage_errors(args: list[str], names: str) -> None:
    r = run("serve", *args)
    assert r.returncode == 2 and names in one_line(r)


def test_usage_errors_exit_2_and_options_are_never_guessed(tmp_path: Path) -> None:
    r = run("--secret", "x", "stats")  # once taken as --secret-file x
    assert r.returncode == 2 and "No such file" not in r.stderr and "usage:" in r.stderr
    assert run("get", "k").returncode == 2  # neither -o nor --describe


def test_errors_are_one_line_naming_the_cause(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    taken = serve()
    r = run("serve", "--listen", taken.address)
    assert r.returncode == 1 and "cannot listen on" in one_line(r)
    r = run("--secret-file", str(tmp_path / "missing"), "stats")
    assert r.returncode == 1 and "secret file" in one_line(r)
    port = free_port()
    r = run("--node", "127.0.0.1", "--timeout", "2", "stats")  # no port: the default 8288, not gRPC's 443
    assert r.returncode == 1 and "127.0.0.1:8288" in one_line(r)
    assert port  # (a free port exists; 8288 is not ours in tests)


def test_a_wildcard_listen_advertises_a_routable_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_module, "routable_host", lambda: "10.1.2.3")
    assert advertised_host("0.0.0.0", "") == "10.1.2.3"
    assert advertised_host("127.0.0.1", "") == "127.0.0.1"
    monkeypatch.setattr(node_module, "routable_host", lambda: None)
    with pytest.raises(ConfigError, match="--advertise"):
        advertised_host("0.0.0.0", "")


def test_a_wildcard_node_never_advertises_loopback(serve: Callable[..., ServeProcess]) -> None:
    node = serve("--listen", "0.0.0.0:0")
    assert not node.address.startswith(("127.", "0.0.0.0", "[::"))
    with PeerClient(f"127.0.0.1:{node.address.rsplit(':', 1)[1]}", SECRET) as c:
        assert c.stats().address == node.address


def test_dead_and_misspelled_seeds_are_warnings_and_show_in_status(serve: Callable[..., ServeProcess],
                                                                  secret_file: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    node = serve("--seeds", f"{dead},dns:nohost.invalid:8288")
    poll(lambda: f"seed {dead}" in node.log() and "seed dns:nohost.invalid:8288: does not resolve" in node.log(),
         "both seeds are named in a warning")
    r = run("--node", node.address, "--secret-file", str(secret_file), "status", "--json")
    warnings = json.loads(r.stdout)["warnings"]
    assert any(dead in w for w in warnings) and any("nohost.invalid" in w for w in warnings)
    assert any("mesh of one" in w for w in warnings)
    r = run("--node", node.address, "--secret-file", str(secret_file), "status")
    assert r.returncode == 0 and "warning: seed" in r.stderr


def test_metrics_after_real_traffic(serve: Callable[..., ServeProcess]) -> None:
    node = serve("--metrics-listen", "127.0.0.1:0")
    with PeerClient(node.address, SECRET) as c:
        c.put("m/1", os.urandom(5000))
        assert c.get("m/1") is not None and c.get("m/1") is not None
        assert c.get("m/missing") is None
    text = urllib.request.urlopen(f"http://{node.metrics}/metrics", timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("comfy_mesh_gets_served_total", (("source", "local"),))] >= 2
    assert samples[("comfy_mesh_misses_total", ())] >= 1
    assert samples[("comfy_mesh_puts_total", ())] == 1
    assert samples[("comfy_mesh_members", (("state", "ALIVE"),))] == 1
    assert samples[("comfy_mesh_rpc_seconds_count", (("method", "Get"),))] >= 3
    assert samples[("comfy_mesh_max_memory", ())] > 0


def test_json_logs(serve: Callable[..., ServeProcess]) -> None:
    node = serve(pre=["--log-format", "json"])
    lines = [line for line in node.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("serving on" in r["message"] for r in records) and all("level" in r for r in records)


def test_cli_streams_files_bit_exactly_and_leaves_no_partial_file(serve: Callable[..., ServeProcess],
                                                                  secret_file: Path, tmp_path: Path) -> None:
    node = serve("--max-memory", "512MiB")
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for i in range(40):
            f.write(os.urandom(512 * 1024) + bytes([i]) * (512 * 1024))
    cli = ["--node", node.address, "--secret-file", str(secret_file)]
    assert run(*cli, "put", "big", str(src), "--meta", "class_type=Test").returncode == 0
    out = tmp_path / "out" / "back.bin"
    out.parent.mkdir()
    r = run(*cli, "get", "big", "-o", str(out))
    assert r.returncode == 0 and out.read_bytes() == src.read_bytes()
    r = run(*cli, "get", "missing", "-o", str(tmp_path / "out" / "none.bin"))
    assert r.returncode == 3 and sorted(p.name for p in out.parent.iterdir()) == ["back.bin"]
    assert run(*cli, "put", "k", str(src), "--meta", "novalue").returncode == 2


def _config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=30)


def test_settings_precedence_flag_env_file_default(tmp_path: Path) -> None:
    toml = tmp_path / "mesh.toml"
    # With a secret: seeds and zeroconf without one are settings `mesh config` calls invalid (exit 2).
    # A LAN address to advertise: a loopback node with seeds on other hosts is invalid too.
    toml.write_text('max_memory = "2GiB"\nseeds = ["10.0.0.5:8288", "10.0.0.6:8288"]\nnamespace = "for-comfyui"\n'
                    'secret = "s"\n[serve]\nheartbeat = 0.25\nreplicas = 3\nzeroconf = true\n'
                    'advertise = "10.0.0.4:8288"\n')

    def settings(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
        r = _config(*args, "config", "--json", env={"MESH_CONFIG": str(toml), **(env or {})})
        assert r.returncode == 0, r.stderr
        return {row["setting"]: row for row in json.loads(r.stdout)["settings"]}

    s = settings()
    assert (s["max_memory"]["value"], s["max_memory"]["from"]) == ("2GiB", f"file {toml}")
    assert s["seeds"]["value"] == "10.0.0.5:8288,10.0.0.6:8288"
    assert (s["heartbeat"]["value"], s["replicas"]["value"], s["zeroconf"]["value"]) == (0.25, 3, True)
    assert (s["cluster"]["value"], s["cluster"]["from"]) == ("default", "default")
    s = settings(env={"MESH_MAX_MEMORY": "1GiB", "MESH_ZEROCONF": "0"})
    assert (s["max_memory"]["value"], s["max_memory"]["from"]) == ("1GiB", "env MESH_MAX_MEMORY")
    assert s["zeroconf"]["value"] is False
    r = _config("serve", "--max-memory", "3GiB", "--heartbeat", "0", env={"MESH_CONFIG": str(toml),
                                                                          "MESH_MAX_MEMORY": "1GiB"})
    assert r.returncode == 2 and "--heartbeat" in r.stderr  # the flag won over the file's 0.25 (and is refused)


@pytest.mark.parametrize("env, text, message", [
    ({"MESH_HEARTBEAT": "fast"}, "", "MESH_HEARTBEAT must be a float"),
    ({"MESH_ZEROCONF": "maybe"}, "", "MESH_ZEROCONF must be a boolean"),
    ({}, "[serve]\nheartbeats = 1\n", "unknown setting in [serve]: heartbeats (did you mean heartbeat?)"),
    ({}, "max_memory = \n", "not valid TOML"),
])
def test_bad_settings_are_one_line_usage_errors(tmp_path: Path, env: dict[str, str], text: str,
                                                message: str) -> None:
    toml = tmp_path / "mesh.toml"
    toml.write_text(text)
    r = _config("serve", env={"MESH_CONFIG": str(toml), **env})
    assert r.returncode == 2 and message in one_line(r)


def test_the_provider_reads_the_same_file(tmp_path: Path) -> None:
    from provider.config import ProviderConfig

    toml = tmp_path / "mesh.toml"
    toml.write_text('max_memory = "2GiB"\nnamespace = "n"\n[serve]\nheartbeat = 0.25\n')
    config = ProviderConfig.load({"MESH_CONFIG": str(toml)})
    assert config.max_memory == 2 << 30 and config.namespace == "n"


def test_options_work_where_the_readme_puts_them(serve: Callable[..., ServeProcess], secret_file: Path) -> None:
    """`mesh serve --secret-file F` once exited 2: --secret-file was only a global option."""
    node = serve("--secret-file", str(secret_file), secret=None)
    assert "auth on" in node.log()
    with PeerClient(node.address, SECRET) as c:
        assert c.stats().node_id == node.node_id


def test_reflection_lists_the_services_without_a_secret(serve: Callable[..., ServeProcess]) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    node = serve()
    with grpc.insecure_channel(node.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"comfymesh.v1.Mesh", "grpc.health.v1.Health"} <= names
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="comfymesh.v1.Mesh")]), timeout=5))
        assert replies[0].file_descriptor_response.file_descriptor_proto  # enough for grpcurl to call it


def test_metrics_by_class_type_for_an_embedded_provider() -> None:
    from prometheus_client import generate_latest

    from tests.support.comfy_harness import Engine, parser, standard_prompt, start_runtime

    rt = start_runtime(parser().parse_args(["--secret", "s"]))
    try:
        Engine(rt.provider).run(standard_prompt(71, delay=0.0))
        text = generate_latest(rt.node.metrics.registry).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        lookups = {labels: v for (name, labels), v in samples.items() if name == "comfy_mesh_provider_class_lookups_total"}
        assert lookups and all(v >= 1 for v in lookups.values())
        assert any(name == "comfy_mesh_provider_class_lookup_seconds_count" for name, _ in samples)
    finally:
        rt.close()


def test_the_grafana_dashboard_only_uses_series_a_node_exports() -> None:
    """Every comfy_mesh_* series a panel queries exists in a real node's exposition (with an embedded provider)."""
    import re

    from prometheus_client import generate_latest

    from tests.support.comfy_harness import Engine, parser, standard_prompt, start_runtime

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "scripts/deploy/grafana-dashboard.json")
                           .read_text())
    used = {name for p in dashboard["panels"] for t in p["targets"]
            for name in re.findall(r"comfy_mesh_[a-z_]+", t["expr"])}
    rt = start_runtime(parser().parse_args(["--secret", "s"]))
    try:
        Engine(rt.provider).run(standard_prompt(72, delay=0.0))
        with PeerClient(rt.node.address, b"s") as c:  # and a peer's read: RPC latencies
            assert c.get("nothing") is None
        text = generate_latest(rt.node.metrics.registry).decode()
    finally:
        rt.close()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert used and used <= exported, used - exported


def test_mesh_top_shows_rates_and_members(serve: Callable[..., ServeProcess], secret_file: Path) -> None:
    node = serve()
    with PeerClient(node.address, SECRET) as c:
        c.put("t", b"v")
    r = run("--node", node.address, "--secret-file", str(secret_file), "top", "--iterations", "2",
            "--interval", "0.2")
    assert r.returncode == 0 and node.node_id in r.stdout and "ALIVE" in r.stdout and "gets/s" in r.stdout


def test_a_secret_in_the_shared_file_protects_serve_too(tmp_path: Path, secret_file: Path) -> None:
    """Found in review: the provider read `secret` from the shared TOML file, mesh serve ignored it (an open
    node), and the file's secret_file beat MESH_SECRET."""
    toml = tmp_path / "mesh.toml"
    toml.write_text('secret = "from-the-file"\n')
    r = _config("config", "--json", env={"MESH_CONFIG": str(toml)})
    assert json.loads(r.stdout)["secret_file"] == "(secret in the config file)"
    toml.write_text(f'secret_file = "{secret_file}"\n')
    r = _config("config", "--json", env={"MESH_CONFIG": str(toml), "MESH_SECRET": "from-env"})
    assert json.loads(r.stdout)["secret_file"] == "(MESH_SECRET)"  # the environment wins over the file


def test_a_seed_that_cannot_prove_the_secret_shows_in_status(serve: Callable[..., ServeProcess],
                                                             secret_file: Path, tmp_path: Path) -> None:
    """Seen on this machine: a seed address that answered, but was no member, showed nothing in `mesh status`."""
    other = tmp_path / "other-secret"
    other.write_text("another cluster's secret\n")
    stranger = serve(secret=other)
    node = serve("--seeds", stranger.address)

    def warned() -> bool:
        r = run("--node", node.address, "--secret-file", str(secret_file), "status", "--json")
        return any(stranger.address in w and "not a member" in w for w in json.loads(r.stdout)["warnings"])

    poll(warned, "status names the seed that is not a member", timeout=20)
