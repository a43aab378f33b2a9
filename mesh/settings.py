"""One configuration model for every `mesh` command: every setting is a flag, a MESH_* variable and a TOML key.

Precedence: flag, then environment variable (MESH_ + the flag's name in upper case with underscores:
`--max-memory` is MESH_MAX_MEMORY), then the TOML file named by `--config`, else MESH_CONFIG, else the
default path /etc/comfy-mesh/mesh.toml when it exists, then the default. `mesh serve` takes all of it; every
other command takes from the same file the node to talk to (`node`), the cluster secret and the TLS files.
The file is the one the ComfyUI provider reads (provider/config.py): its top-level keys are shared
(`max_memory = "8GiB"`, `seeds = "10.0.0.5:8288"`), and a `[serve]` table holds what only `mesh serve` takes
(`heartbeat = 0.5`). A system service can therefore take a systemd EnvironmentFile, a TOML file, or both.

Why a module of its own: argparse alone cannot tell a flag given on the command line from its default, and
`mesh config` must say where every value came from.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "MESH_CONFIG"
DEFAULT_CONFIG = "/etc/comfy-mesh/mesh.toml"
DEFAULT_CONFIG_ENV = "MESH_CONFIG_DEFAULT"  # where the default file is looked for ("": nowhere)
ENV_PREFIX = "MESH_"
FILE_TABLE = "serve"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Top-level keys the ComfyUI provider reads (provider/config.py, a floor above this one, so listed here;
# tests/test_cliconfig.py checks that the two agree).
PROVIDER_KEYS = frozenset({
    "mode", "node", "listen", "node_id", "advertise", "seeds", "zeroconf", "cluster", "replicas", "secret",
    "secret_file", "tls_cert", "tls_key", "tls_ca", "tls_server_name", "max_memory", "data_dir", "metrics_listen",
    "max_disk", "min_free_ram", "namespace", "allow", "deny", "cache_output_nodes", "max_value_size",
    "lookup_timeout", "store_timeout", "store_queue", "shuffle", "warm_memory", "compress", "fast_keys", "identity",
    "identity_cache", "direct", "enabled", "dedupe", "dedupe_max_wait", "eviction", "store_cheap"})
# What every command reads from the file: the node to talk to, and how (the cluster secret, TLS).
CLIENT_KEYS = frozenset({"node", "secret", "secret_file", "tls_cert", "tls_key", "tls_ca", "tls_server_name"})


class SettingError(ValueError):
    """A value that does not parse, named by where it came from (a usage error)."""


@dataclass(frozen=True)
class Setting:
    dest: str
    flag: str
    default: Any
    action: argparse.Action

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def settings_of(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> dict[str, Setting]:
    """The settings of a (sub)parser, with their defaults moved out of argparse: a value left in args after
    parsing was given as a flag, and only then."""
    out: dict[str, Setting] = {}
    for action in parser._actions:  # argparse has no public listing of its actions
        if not action.option_strings or action.dest in ("help", *skip):
            continue
        out[action.dest] = Setting(action.dest, action.option_strings[0], action.default, action)
        action.default = argparse.SUPPRESS
    return out


def find_config(flag: str | None, env: Mapping[str, str]) -> tuple[str, str]:
    """(the TOML file every command reads, why that one): `--config`, else MESH_CONFIG, else the default path
    when a file is there; ("", "") for none. An empty `--config ''` or `MESH_CONFIG=` means no file at all.

    Why a default path: a host set up with /etc/comfy-mesh/mesh.toml must not start an open loopback node, nor
    need the secret and TLS options by hand on every CLI call, because someone forgot MESH_CONFIG. Where the
    default is looked for is itself MESH_CONFIG_DEFAULT, so packagers and tests (without root) can move it.
    """
    if flag is not None:
        return flag, "--config"
    if CONFIG_ENV in env:
        return env[CONFIG_ENV], CONFIG_ENV
    default = env.get(DEFAULT_CONFIG_ENV, DEFAULT_CONFIG)
    if not default:
        return "", ""
    try:
        os.lstat(default)
    except PermissionError:  # there, but in a folder this user cannot enter (/etc/comfy-mesh is root:comfy-mesh
        return default, "the default path"  # 0750): reading it says so, rather than running without it
    except OSError:
        return "", ""
    return default, "the default path"


@dataclass(frozen=True)
class ConfigFile:
    """The shared TOML file as read: its top-level keys and its [serve] table, checked for unknown keys."""

    path: str = ""   # "" : no file
    why: str = ""    # "--config", "MESH_CONFIG", "the default path"
    top: Mapping[str, Any] = field(default_factory=dict)
    serve: Mapping[str, Any] = field(default_factory=dict)

    def merged(self) -> dict[str, Any]:
        """What `mesh serve` takes: the shared keys, with its own [serve] table winning."""
        out = {k: v for k, v in self.top.items() if k != FILE_TABLE}
        out.update(self.serve)
        return out

    def where(self) -> str:
        return f"{self.path} ({self.why})" if self.why else self.path


def load_config(flag: str | None, env: Mapping[str, str], serve_keys: Iterable[str]) -> ConfigFile:
    """Read and check the file `find_config` names. Every key anywhere must be one some reader takes: at the top
    level a provider setting, a `mesh serve` setting or a client one (node, secret, TLS); in [serve] a serve
    setting or the secret and TLS files. Anything else is an error naming the key and the file: a typo
    (`max_memroy`) would otherwise leave the default in force, silently."""
    path, why = find_config(flag, env)
    if not path:
        return ConfigFile()
    where = f"{path} ({why})" if why != "--config" else path
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        hint = f"; set {CONFIG_ENV} to another file, or {CONFIG_ENV}= for none" if why == "the default path" else ""
        if isinstance(e, PermissionError):
            hint = (f": run as root or as a member of the file's group (e.g. `usermod -aG comfy-mesh $USER`)"
                    f"{hint}")
        raise SettingError(f"cannot read the config file {where}: {e.strerror or e}{hint}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingError(f"config file {where} is not valid TOML: {e}") from None
    serve_keys = set(serve_keys)
    table = data.get(FILE_TABLE, {})
    if not isinstance(table, dict):
        raise SettingError(f"config file {where}: {FILE_TABLE} must be a table ([{FILE_TABLE}]), not a value")
    _check_keys(data, PROVIDER_KEYS | CLIENT_KEYS | serve_keys | {FILE_TABLE}, "at the top level", where)
    _check_keys(table, (CLIENT_KEYS - {"node"}) | serve_keys, f"in [{FILE_TABLE}]", where)
    return ConfigFile(path, why, data, table)


def _check_keys(table: Mapping[str, Any], known: set[str] | frozenset[str], place: str, where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    noun = "setting" if len(unknown) == 1 else "settings"
    raise SettingError(f"config file {where}: unknown {noun} {place}: {', '.join(hints)}")


def _convert(setting: Setting, raw: Any, where: str) -> Any:
    action = setting.action
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in _TRUE + _FALSE:
            raise SettingError(f"{where} must be a boolean (1/0, true/false), not {raw!r}")
        return text in _TRUE
    if action.type is None:
        return ",".join(str(x) for x in raw) if isinstance(raw, list) else str(raw)
    try:
        return action.type(raw)
    except (TypeError, ValueError):
        raise SettingError(f"{where} must be a {getattr(action.type, '__name__', 'value')}, not {raw!r}") from None


def _checked(setting: Setting, raw: Any, where: str, problems: list[str] | None) -> Any:
    try:
        return _convert(setting, raw, where)
    except SettingError as e:
        if problems is None:
            raise
        problems.append(str(e))
        return setting.default


def resolve(args: argparse.Namespace, settings: Mapping[str, Setting], env: Mapping[str, str] | None = None,
            file: Mapping[str, Any] | None = None, file_path: str = "",
            problems: list[str] | None = None) -> dict[str, str]:
    """Fill every setting not given as a flag from the environment, the file or the default, in that order.

    Returns dest -> where its value came from ("flag", "env MESH_X", "file PATH", "default"). A value that
    does not convert raises SettingError, or with `problems` (`mesh config`, which shows everything it can) is
    listed there and the default stands in.
    """
    env = os.environ if env is None else env
    file = file or {}
    sources: dict[str, str] = {}
    for dest, setting in settings.items():
        if hasattr(args, dest):
            sources[dest] = "flag"
        elif env.get(setting.env) is not None:
            setattr(args, dest, _checked(setting, env[setting.env], setting.env, problems))
            sources[dest] = f"env {setting.env}"
        elif dest in file:
            setattr(args, dest, _checked(setting, file[dest], f"{dest} in {file_path}", problems))
            sources[dest] = f"file {file_path}"
        else:
            setattr(args, dest, setting.default)
            sources[dest] = "default"
    return sources
