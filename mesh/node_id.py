"""A node's default id: this host's name and a random suffix, kept in the data dir so a restart keeps it.

Why not `<hostname>-<port>`, as it was: cloned VMs and containers share a hostname and run on the same port,
so two nodes came up under one id, each took the other's answers for its own, and the fleet never formed,
without a word (issue 22). A random suffix makes ids unique by default; the hostname stays in front so that an
operator still sees where a member runs. Why persisted: the id is the node's place on the ring, so a node
restarted with its `--data-dir` comes back as itself, owning the keys its disk still holds. Without a data dir
nothing is kept, and each start is a new id (the node comes back empty anyway; its peers repair it).
"""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

from mesh.files import write_atomic

ID_FILE = "node-id"           # in the data dir: one line, the id
SUFFIX_HEX = 8                # 32 random bits: two nodes of a fleet of thousands draw the same one ~never
MAX_ID = 200                  # characters a kept id may have (a longer file is not one we wrote)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def host_part(hostname: str | None = None) -> str:
    """This host's name as an id prefix: letters, digits, `.`, `_` and `-` only, at most 63 characters."""
    name = _UNSAFE.sub("-", hostname if hostname is not None else socket.gethostname()).strip("-.")
    return name[:63] or "node"


def fresh_node_id(hostname: str | None = None) -> str:
    return f"{host_part(hostname)}-{secrets.token_hex(SUFFIX_HEX // 2)}"


def default_node_id(data_dir: str, hostname: str | None = None) -> tuple[str, str]:
    """(the id, where it comes from, for the start-up line). With a data dir: the id kept in DATA_DIR/node-id,
    made and written there on the first start. Raises ValueError, naming the file and the fix, where the file
    cannot be read or written or holds no id (a new id would silently move the node on the ring)."""
    if not data_dir:
        return fresh_node_id(hostname), "new at each start: no --data-dir to keep it in"
    path = Path(data_dir) / ID_FILE
    kept = _read(path)
    if kept is not None:
        return kept, f"kept in {path}"
    node_id = fresh_node_id(hostname)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (node_id + "\n").encode(), exclusive=True)
    except FileExistsError:
        return _read(path) or node_id, f"kept in {path}"  # another start wrote one first: that one is the id
    except OSError as e:
        raise ValueError(f"cannot keep the node id in {path}: {e.strerror or e}: make --data-dir writable by this "
                         "user, or set --node-id (MESH_NODE_ID)") from None
    return node_id, f"new, kept in {path}"


def describe_default(data_dir: str, hostname: str | None = None) -> tuple[str, str]:
    """What `default_node_id` would give, without writing anything (for `mesh config`): the kept id where there
    is one, else the pattern a start would draw."""
    if data_dir:
        path = Path(data_dir) / ID_FILE
        kept = _read(path)
        if kept is not None:
            return kept, f"kept in {path}"
        return f"{host_part(hostname)}-<random>", f"drawn at the first start, then kept in {path}"
    return f"{host_part(hostname)}-<random>", "new at each start: no --data-dir to keep it in"


def _read(path: Path) -> str | None:
    """The id kept at `path`; None where there is no file."""
    try:
        text = path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot read the node id file {path}: {e.strerror or e}: make --data-dir readable by "
                         "this user, or set --node-id (MESH_NODE_ID)") from None
    if not text or len(text) > MAX_ID or any(not c.isprintable() or c.isspace() for c in text):
        raise ValueError(f"the node id file {path} holds no id (one line, up to {MAX_ID} printable characters, no "
                         "spaces): fix it, delete it to get a new id, or set --node-id (MESH_NODE_ID)")
    return text
