"""Files written whole or not at all: a temporary file beside the target, fsynced, then renamed (or linked) in.

Why one helper: TLS keys, the cluster secret and the provider's table of file identities must never be seen
half-written after a crash, nor readable by others while they are written (the temporary file is created 0600
by `mkstemp`, which also never follows a link planted at its name).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, exclusive: bool = False) -> None:
    """Put `data` at `path` in one step, with `mode` whatever the umask. `exclusive`: never replace a file that
    is at `path` (the temporary file is linked in, not renamed over: FileExistsError if one appeared)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # gone after a rename; the second name of a link
