"""Commands run as an outsider would: a fresh venv, a clone, pip, an installed `mesh`.

Nothing of this checkout may leak in: no PYTHONPATH (it would import this checkout's `mesh` instead of the
installed one) and none of the developer's MESH_* settings.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def sh(*argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600,
       ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run argv in a clean environment (plus `env`); with `ok`, assert it exited 0, showing its output if not."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PYTHON"))}
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**clean, **(env or {})})
    if ok:
        assert r.returncode == 0, f"{argv}: {r.stdout[-3000:]} {r.stderr[-3000:]}"
    return r
