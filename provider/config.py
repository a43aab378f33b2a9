"""Provider settings, from environment variables and an optional TOML file.

Precedence: environment variable, then the file named by MESH_CONFIG (keys are the variable names without the
MESH_ prefix, lower case: `mode = "sidecar"`), then the default. Every setting is listed in README.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from mesh.transport.auth import SECRET_ENV, SECRET_FILE_ENV, Keyring, load_keyring
from mesh.storage.eviction import POLICIES
from mesh.transport.link import MODES
from mesh.transport.tls import TlsConfig, load_tls
from mesh.units import parse_size

ENV_PREFIX = "MESH_"
# The embedded node's default: a fixed port, so `mesh --node 127.0.0.1:8289 status` finds the node of a host's
# one ComfyUI (a second ComfyUI on the host gets a free port, logged on its `comfy-mesh:` line).
DEFAULT_LISTEN = "127.0.0.1:8289"
# Keys of the shared TOML file that are for `mesh serve` (mesh/settings.py), not for the provider.
SHARED_WITH_SERVE = {"serve"}


@dataclass(frozen=True)
class ProviderConfig:
    mode: str = "embedded"            # embedded: a node in ComfyUI's process; sidecar: attach to `mesh serve`
    node: str = "127.0.0.1:8288"      # sidecar address
    listen: str = DEFAULT_LISTEN      # embedded node's listen address; a taken default port falls back to any
    node_id: str = ""
    advertise: str = ""
    seeds: tuple[str, ...] = ()
    zeroconf: bool = False
    cluster: str = "default"
    replicas: int = 2
    secret: str = ""
    secret_file: str = ""             # one secret per line, the first signs (rotation: see README)
    tls_cert: str = ""                # PEM files: with cert and key the provider speaks TLS to its node
    tls_key: str = ""
    tls_ca: str = ""
    tls_server_name: str = "comfy-mesh"
    max_memory: int = parse_size("4GiB")
    data_dir: str = ""                # embedded node's disk tier (empty: RAM only)
    metrics_listen: str = ""          # embedded node's Prometheus endpoint, HOST:PORT
    max_disk: int = parse_size("16GiB")
    eviction: str = "cost"            # embedded node: cost (compute seconds saved per byte) or lru
    store_cheap: bool = False         # also store values cheaper to compute again than to fetch
    min_free_ram: int = parse_size("2GiB")
    namespace: str = ""               # operator's part of the key namespace (model set, fleet name...)
    allow: tuple[str, ...] = ()       # class types to cache; empty: all that pass the other rules
    deny: tuple[str, ...] = ()        # class types never cached
    cache_output_nodes: bool = False  # a hit skips the node, so SaveImage would write no file on this instance
    max_value_size: int = parse_size("1GiB")
    lookup_timeout: float = 3.0       # seconds one lookup may cost a prompt, at most
    store_timeout: float = 60.0
    store_queue: int = 64             # values waiting to be pushed; a full queue drops the store (counted)
    shuffle: bool = False             # byte-shuffle float tensors in the value itself (the transport already
                                      # compresses float32 as byte planes where a link is slow: see compress)
    warm_memory: int = parse_size("256MiB")  # touched memory kept ready for the next hits (mesh/buffers.py)
    compress: str = "auto"            # auto: lz4 per transfer where the measured link is slow; off; lz4: always
    fast_keys: bool = True            # provider/fastkeys.py: ComfyUI's key digest once per key per prompt, faster
    identity: bool = True             # provider/identity.py: keys carry the model files' bytes and node packs' code
    identity_cache: str = ""          # where file identities are remembered (default: the user's cache folder)
    dedupe: bool = True               # mesh-wide in-flight dedupe: wait for a key another instance computes now
    dedupe_max_wait: float = 60.0     # seconds one such wait may last, at most (then this instance computes)
    direct: bool = True               # sidecar mode: read straight from owners with the ring the sidecar shares
    enabled: bool = True

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> ProviderConfig:
        env = os.environ if env is None else env
        file_values: dict[str, object] = {}
        if env.get("MESH_CONFIG"):
            file_values = tomllib.loads(Path(env["MESH_CONFIG"]).read_text())
        values: dict[str, object] = {}
        for f in fields(cls):
            raw: object | None = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                raw = file_values.get(f.name)
            if raw is None:
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        unknown = set(file_values) - {f.name for f in fields(cls)} - SHARED_WITH_SERVE
        if unknown:
            raise ValueError(f"unknown settings in {env['MESH_CONFIG']}: {', '.join(sorted(unknown))}")
        config = cls(**values)  # type: ignore[arg-type]
        if config.mode not in ("embedded", "sidecar"):
            raise ValueError(f"MESH_MODE must be embedded or sidecar, not {config.mode!r}")
        if config.eviction not in POLICIES:
            raise ValueError(f"MESH_EVICTION must be one of {', '.join(POLICIES)}, not {config.eviction!r}")
        if config.compress not in MODES:
            raise ValueError(f"MESH_COMPRESS must be one of {', '.join(MODES)}, not {config.compress!r}")
        return config

    def identity_cache_path(self) -> Path:
        """MESH_IDENTITY_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/comfy-mesh/file-identities.json."""
        if self.identity_cache:
            return Path(self.identity_cache).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "comfy-mesh" / "file-identities.json"

    def keyring(self) -> Keyring | None:
        env = {SECRET_FILE_ENV: self.secret_file} if self.secret_file else {SECRET_ENV: self.secret}
        return load_keyring(None, env)

    def tls(self) -> TlsConfig | None:
        return load_tls(self.tls_cert or None, self.tls_key or None, self.tls_ca or None, self.tls_server_name, env={})


def _convert(name: str, type_name: object, raw: object) -> object:
    kind = str(type_name)
    if kind.startswith("tuple"):
        items = raw if isinstance(raw, list) else [s for s in str(raw).split(",")]
        return tuple(str(s).strip() for s in items if str(s).strip())
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"MESH_{name.upper()} must be a boolean, not {raw!r}")
        return text in ("1", "true", "yes", "on")
    try:
        if kind == "int":
            return parse_size(raw if isinstance(raw, int) else str(raw))
        if kind == "float":
            return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueError(f"MESH_{name.upper()} must be a {'size' if kind == 'int' else 'number'}, "
                         f"not {raw!r} ({e})") from None
    return str(raw)
