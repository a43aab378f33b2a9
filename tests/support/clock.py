"""A process whose wall clock is off by a given amount: libfaketime, preloaded (the `libfaketime` package ships
the library). Only the wall clock is faked; the monotonic clock, which measures durations, stays true, as it
does on a host whose NTP is wrong."""

from __future__ import annotations

import os
from pathlib import Path


def skewed_env(offset: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process whose time.time() is `offset` away ("+10m", "-10m", "+1h")."""
    import libfaketime

    library = Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
    env = dict(os.environ if base is None else base)
    preload = " ".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    env.update(LD_PRELOAD=preload, FAKETIME=offset, DONT_FAKE_MONOTONIC="1", FAKETIME_NO_CACHE="1")
    return env
