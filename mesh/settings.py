"""One configuration model for `mesh serve`: every setting is a flag, a MESH_* variable and a TOML key.

Precedence: flag, then environment variable (MESH_ + the flag's name in upper case with underscores:
`--max-memory` is MESH_MAX_MEMORY), then the TOML file named by MESH_CONFIG (or `--config`), then the
default. The file is the one the ComfyUI provider reads (provider/config.py): its top-level keys are shared
(`max_memory = "8GiB"`, `seeds = "10.0.0.5:8288"`), and a `[serve]` table holds what only `mesh serve` takes
(`heartbeat = 0.5`). A system service can therefore take a systemd EnvironmentFile, a TOML file, or both.

Why a module of its own: argparse alone cannot tell a flag given on the command line from its default, and
`mesh config` must say where every value came from.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_ENV = "MESH_CONFIG"
ENV_PREFIX = "MESH_"
FILE_TABLE = "serve"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


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


def read_file(path: str | None, env: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    """(the settings for `mesh serve` from the TOML file, its path); empty without one."""
    path = path or env.get(CONFIG_ENV)
    if not path:
        return {}, ""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SettingError(f"cannot read the config file {path} ({CONFIG_ENV}): {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingError(f"config file {path} is not valid TOML: {e}") from None
    table = data.get(FILE_TABLE, {})
    if not isinstance(table, dict):
        raise SettingError(f"config file {path}: [{FILE_TABLE}] must be a table")
    merged = {k: v for k, v in data.items() if k != FILE_TABLE}
    merged.update(table)
    return merged, path


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


def resolve(args: argparse.Namespace, settings: Mapping[str, Setting], env: Mapping[str, str] | None = None,
            file: Mapping[str, Any] | None = None, file_path: str = "") -> dict[str, str]:
    """Fill every setting not given as a flag from the environment, the file or the default, in that order.

    Returns dest -> where its value came from ("flag", "env MESH_X", "file PATH", "default"). Keys of the
    file's [serve] table that are no setting are an error (a typo would otherwise be silently ignored).
    """
    env = os.environ if env is None else env
    file = file or {}
    sources: dict[str, str] = {}
    for dest, setting in settings.items():
        if hasattr(args, dest):
            sources[dest] = "flag"
        elif env.get(setting.env) is not None:
            setattr(args, dest, _convert(setting, env[setting.env], setting.env))
            sources[dest] = f"env {setting.env}"
        elif dest in file:
            setattr(args, dest, _convert(setting, file[dest], f"{dest} in {file_path}"))
            sources[dest] = f"file {file_path}"
        else:
            setattr(args, dest, setting.default)
            sources[dest] = "default"
    return sources


def check_table(file_path: str, table_keys: set[str], settings: Mapping[str, Setting]) -> None:
    unknown = sorted(table_keys - set(settings))
    if unknown:
        raise SettingError(f"config file {file_path}: unknown settings in [{FILE_TABLE}]: {', '.join(unknown)}")


def serve_table_keys(path: str) -> set[str]:
    if not path:
        return set()
    table = tomllib.loads(Path(path).read_text()).get(FILE_TABLE, {})
    return set(table) if isinstance(table, dict) else set()
