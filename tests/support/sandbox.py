"""Run a command inside the sandbox a systemd unit describes, without systemd.

Why: the machine that runs the tests has no systemd as PID 1, so `systemctl start` cannot try the hardening of
scripts/deploy/comfy-mesh.service. This applies what of it the kernel offers to any root process, read from the
unit file itself, so a line added there that breaks the node breaks the test too:

- User=/Group=: `setpriv --reuid/--regid`, supplementary groups cleared;
- NoNewPrivileges=, CapabilityBoundingSet= (empty), AmbientCapabilities= (empty): `setpriv --no-new-privs
  --bounding-set -all --inh-caps -all --ambient-caps -all`;
- ProtectSystem=strict with StateDirectory=: a private mount namespace whose / is read-only, with the state
  directory bound read-write (`unshare --mount`); ProtectHome=yes: tmpfs over /home and /root;
  PrivateDevices=: a /dev of null, zero, full, random, urandom and tty only; ProtectProc=invisible: /proc
  mounted anew with hidepid=invisible;
- MemoryDenyWriteExecute=: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), the kernel's own form of it (6.3+);
- SystemCallFilter= (with systemd's groups from `systemd-analyze syscall-filter`), SystemCallErrorNumber=,
  SystemCallArchitectures=native and RestrictAddressFamilies=: a seccomp filter (python3-seccomp).

Not applied (need systemd, or would hide the test's own files, or change nothing a node does): PrivateTmp,
PrivateMounts, the Protect* of kernel tunables, modules, logs, clock, hostname and control groups,
RestrictNamespaces, RestrictRealtime, RestrictSUIDSGID, LockPersonality, RemoveIPC, KeyringMode, UMask.

The launcher half (`python3 sandbox.py exec ...`) runs as the service user after setpriv and needs only the
standard library and the `seccomp` module (Debian: python3-seccomp), so it runs under the system Python.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Unit:
    """The [Service] lines of a unit file: each key's values in order (a key may repeat, e.g. SystemCallFilter)."""

    service: dict[str, list[str]] = field(default_factory=dict)

    def get(self, key: str, default: str = "") -> str:
        values = self.service.get(key)
        return values[-1] if values else default

    def all(self, key: str) -> list[str]:
        return self.service.get(key, [])


def read_unit(path: Path) -> Unit:
    unit, section = Unit(), ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            unit.service.setdefault(key.strip(), []).append(value.strip())
    return unit


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named system call sets, e.g. {"@system-service": ["@aio", ..., "capget", ...]}."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for raw in out.splitlines():
        if raw.startswith("@"):
            current = raw.strip()
            groups[current] = []
        elif current and raw.startswith("    ") and not raw.strip().startswith("#") and raw.strip():
            groups[current].append(raw.strip())
    return groups


def _expand(names: list[str], groups: dict[str, list[str]], seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                out |= _expand(groups[name], groups, seen)
        else:
            out.add(name)
    return out


def allowed_syscalls(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """systemd's semantics: the first line without `~` is the allow list, each later `~` line takes from it,
    a later plain line adds to it."""
    allowed: set[str] | None = None
    for line in filters:
        deny = line.startswith("~")
        names = _expand(line.lstrip("~").split(), groups)
        if allowed is None:
            if deny:
                raise ValueError("a deny-list SystemCallFilter first is not emulated here")
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    if allowed is None:
        raise ValueError("no SystemCallFilter=")
    return allowed | _expand(["@default"], groups)  # systemd always lets these through


def sandbox_argv(unit: Unit, argv: list[str], uid: int, gid: int, state_dir: Path, policy_file: Path) -> list[str]:
    """The command line that runs argv as the unit would (see the module docstring). Needs root."""
    assert unit.get("NoNewPrivileges") == "yes" and unit.get("CapabilityBoundingSet", "x") == ""
    assert unit.get("ProtectSystem") == "strict" and unit.get("ProtectHome") == "yes"
    groups = syscall_groups()
    policy = {
        "syscalls": sorted(allowed_syscalls(unit.all("SystemCallFilter"), groups)),
        "errno": unit.get("SystemCallErrorNumber", ""),
        "families": unit.get("RestrictAddressFamilies").split(),
        "native": unit.get("SystemCallArchitectures") == "native",
        "mdwe": unit.get("MemoryDenyWriteExecute") == "yes",
    }
    policy_file.write_text(json.dumps(policy))
    # PrivateDevices: a /dev of the harmless nodes only; ProtectProc=invisible: other users' processes hidden.
    devices = "null zero full random urandom tty"
    mounts = (f"mount -t tmpfs -o mode=0755,nosuid tmpfs /mnt && "
              f"for n in {devices}; do touch /mnt/$n && mount --bind /dev/$n /mnt/$n || exit 1; done && "
              f"mount --move /mnt /dev && "
              f"mount -o remount,bind,ro / && mount --bind {state_dir} {state_dir} && "
              f"mount -o remount,bind,rw {state_dir} && mount -t tmpfs -o ro tmpfs /home && "
              f"mount -t tmpfs -o ro tmpfs /root && "
              f"mount -t proc -o hidepid=invisible proc /proc && exec \"$@\"")
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
               "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]
    launcher = [SYSTEM_PYTHON, str(Path(__file__).resolve()), "exec", str(policy_file), "--"]
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mounts, "sandbox",
            *setpriv, *launcher, *argv]


def missing_tools() -> str:
    """Why the sandbox cannot be built here, or "" when it can."""
    if os.geteuid() != 0:
        return "needs root (setpriv, unshare --mount)"
    for tool in ("systemd-analyze", "setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import seccomp"], capture_output=True) \
        if Path(SYSTEM_PYTHON).exists() else None
    if probe is None or probe.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot import seccomp (Debian: apt-get install python3-seccomp)"
    return ""


# -- the launcher: runs as the service user, then execs the command ------------------------------------------

def _apply(policy: dict) -> None:
    import seccomp  # python3-seccomp

    if policy["mdwe"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed (kernel before 6.3?)")
    code = getattr(errno, policy["errno"], None) if policy["errno"] else None
    default = seccomp.ERRNO(code) if code else seccomp.KILL_PROCESS
    # A new filter admits the native architecture only: SystemCallArchitectures=native.
    flt = seccomp.SyscallFilter(defaction=default)
    families = [getattr(socket, f) for f in policy["families"]]
    for name in policy["syscalls"]:
        if name == "socket" and families:
            continue
        try:
            flt.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass  # a name this architecture or libseccomp does not know
    for fam in families:  # RestrictAddressFamilies: socket() of any other family fails
        flt.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, fam))
    flt.load()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] != "exec" or argv[2] != "--":
        print("usage: sandbox.py exec POLICY.json -- COMMAND...", file=sys.stderr)
        return 2
    _apply(json.loads(Path(argv[1]).read_text()))
    os.execvp(argv[3], argv[3:])
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def container_argv(argv: list[str], uid: int, gid: int, groups: list[int], writable: list[Path]) -> list[str]:
    """argv as a container with `readOnlyRootFilesystem`, `capabilities: drop [ALL]` and
    `allowPrivilegeEscalation: false` runs it: as uid:gid with these supplementary groups (Kubernetes adds
    fsGroup), / read-only but for the `writable` folders (its volumes). Needs root; no image, the host's files."""
    binds = " && ".join(f"mount --bind {d} {d} && mount -o remount,bind,rw {d}" for d in writable)
    mounts = "mount -o remount,bind,ro /" + (f" && {binds}" if binds else "") + ' && exec "$@"'
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
               f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups", "--no-new-privs",
               "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mounts, "container", *setpriv,
            *argv]
