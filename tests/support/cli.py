"""The one way tests and scripts run the `mesh` command line (anything but `mesh serve`, see serve.py).

The child's environment drops MESH_* variables, so a developer's own settings never change what a test sees,
and sets MESH_CONFIG_DEFAULT empty, so neither does a host's /etc/comfy-mesh/mesh.toml; a test that is about
the environment or the default file passes what it wants in `env`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.serve import mesh_command

CLI_TIMEOUT = 60.0  # seconds a CLI command may run before the test fails


def run_cli(*args: str, node: str | None = None, secret_file: Path | None = None,
            rpc_timeout: float | None = None, env: Mapping[str, str] | None = None,
            drop_env: Sequence[str] = ("MESH_",), command: Sequence[str] | None = None, wrap: Sequence[str] = (),
            check: bool = False, capture: bool = True, text: bool = True, timeout: float = CLI_TIMEOUT,
            cwd: Path | None = None) -> subprocess.CompletedProcess[Any]:
    """Run `[wrap...] mesh [--node N] [--timeout T] [--secret-file F] args...` and return what it did.

    `node`, `rpc_timeout` and `secret_file` are the CLI's own global options; `timeout` bounds the subprocess.
    `wrap` runs it through another command (`ip netns exec NS`); `command` replaces `mesh` (an installed wheel's
    script). `capture=False` lets the output through to the terminal (the demo shows it).
    """
    argv = [*wrap, *(command if command is not None else mesh_command())]
    if node is not None:
        argv += ["--node", node]
    if rpc_timeout is not None:
        argv += ["--timeout", str(rpc_timeout)]
    if secret_file is not None:
        argv += ["--secret-file", str(secret_file)]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop_env))}
    child_env["MESH_CONFIG_DEFAULT"] = ""
    child_env.update(env or {})
    return subprocess.run(argv + list(args), capture_output=capture, text=text, timeout=timeout, env=child_env,
                          check=check, cwd=cwd)
