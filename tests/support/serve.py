"""The one way tests, the demo and the benchmarks start a `mesh serve` process.

A node is ready when it has written its `--ready-file` (JSON, written whole then renamed into place): that is
the only signal we wait for, with a bounded deadline, and a node that exits or is late fails with its log's tail
so that a failure says why. Every caller gets the same argv shape, so a flag added to `mesh serve` for tests
(or a different command, such as an installed wheel's `mesh` script) is one change here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.poll import poll

READY_TIMEOUT = 20.0  # seconds a `mesh serve` may take to write its ready file
STOP_TIMEOUT = 10.0  # seconds a stopped node may take to exit before it is killed
LOG_TAIL = 4000  # characters of a node's log quoted in a failure


def mesh_command() -> list[str]:
    """The installed `mesh` command beside this interpreter (the venv's), else `python -m mesh.cli`.

    The script is what an operator runs, so it is preferred; the module form keeps scripts working from an
    interpreter that has the package on its path but no console script.
    """
    script = Path(sys.executable).with_name("mesh")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mesh.cli"]


def log_tail(log_path: Path) -> str:
    try:
        return log_path.read_text(errors="replace")[-LOG_TAIL:]
    except OSError as e:
        return f"(no log: {e})"


@dataclass
class ServeProcess:
    """A running `mesh serve`: its process, what its ready file said, and where its output goes."""

    process: subprocess.Popen[bytes]
    address: str
    node_id: str
    log_path: Path
    metrics: str = ""  # HOST:PORT of its /metrics, when started with --metrics-listen
    argv: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        """The tail of its log (stdout and stderr together)."""
        return log_tail(self.log_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal it and wait (bounded); returns its exit code.

        Killed if it does not stop in time, and the TimeoutExpired is raised: a node that ignores SIGTERM is a
        bug a test must see, not hide.
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.process.returncode

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate, then kill if it is still there after `timeout`: for teardown, which must never hang."""
        try:
            self.stop(signal.SIGTERM, timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)


def serve_argv(*args: str, ready_file: Path, secret_file: Path | None = None, listen: str = "127.0.0.1:0",
               global_args: Sequence[str] = (), command: Sequence[str] | None = None,
               wrap: Sequence[str] = ()) -> list[str]:
    """`[wrap...] mesh [--secret-file F] [global_args...] serve --listen L --ready-file R --min-free-ram 0 args...`.

    `wrap` runs the command through another (`ip netns exec NS`); `command` replaces `mesh` (an installed
    wheel's script). `--min-free-ram 0` because a test machine's free RAM is not what a test is about; `args`
    come last, so a caller's flags win over these.
    """
    argv = [*wrap, *(command if command is not None else mesh_command())]
    if secret_file is not None:
        argv += ["--secret-file", str(secret_file)]
    return argv + [*global_args, "serve", "--listen", listen, "--ready-file", str(ready_file),
                   "--min-free-ram", "0", *args]


def wait_until_serving(process: subprocess.Popen[bytes], ready: Path, log_path: Path,
                       timeout: float = READY_TIMEOUT) -> dict[str, str]:
    """What a `mesh serve --ready-file READY` wrote there ({address, node_id, ...}), once it is serving.

    Raises RuntimeError if the process exits first and TimeoutError after `timeout` seconds, killing the process
    and quoting its log either way, so a caller never waits unbounded nor leaks a half-started node.
    """
    def serving() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"mesh serve exited with {process.returncode}; log:\n{log_tail(log_path)}")
        return ready.exists()

    try:
        try:
            poll(serving, "mesh serve writes its ready file", timeout=timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; log:\n{log_tail(log_path)}") from None
        return json.loads(ready.read_text())  # written whole, then renamed into place
    except BaseException:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        raise


def start_serve(workdir: Path, name: str, *args: str, secret_file: Path | None = None,
                listen: str = "127.0.0.1:0", global_args: Sequence[str] = (), command: Sequence[str] | None = None,
                wrap: Sequence[str] = (), timeout: float = READY_TIMEOUT, cwd: Path | None = None,
                env: Mapping[str, str] | None = None) -> ServeProcess:
    """Start `mesh serve` (see serve_argv) and return once it is serving.

    Its ready file is workdir/NAME.ready and its log workdir/NAME.log; the log is appended to, so a node
    restarted under the same name keeps its history in one file, and a stale ready file is removed first so
    that an old one is never taken for the new node's.
    """
    ready = workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    argv = serve_argv(*args, ready_file=ready, secret_file=secret_file, listen=listen, global_args=global_args,
                      command=command, wrap=wrap)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env=dict(env) if env is not None else None)
    info = wait_until_serving(process, ready, log_path, timeout)
    return ServeProcess(process, info["address"], info["node_id"], log_path, info.get("metrics", ""), argv)
