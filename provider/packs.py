"""The code identity of a custom-node pack: a hash of its Python source, so another version never shares.

ComfyUI's own nodes (nodes.py, comfy_extras, comfy_api_nodes) are covered by the ComfyUI version in the key's
namespace. A custom node's output depends on its pack's code as well, and fleets run different versions of a
pack (one host updated by ComfyUI-Manager, another not). A pack's version string is not enough: a pack edited
in place, or installed from a branch, keeps it. So its identity is xxh3-128 over every `.py` file under its
folder and its `pyproject.toml` (relative path and bytes, in sorted order), computed once per pack and process:
ComfyUI imports a pack's code once, at start, so the files read then are the code that runs.

How a class finds its pack: ComfyUI's `load_custom_node` stamps each class it registers with
`RELATIVE_PYTHON_MODULE = "custom_nodes.<name>"`; its pack is the entry of a custom_nodes folder that holds the
file its class was defined in (a folder, or a single `.py` file), as `sys.modules` records it.

A pack whose code changed on disk after ComfyUI loaded its custom nodes (a ComfyUI-Manager update, a `git pull`, without a
restart) runs the code ComfyUI imported, not the code on disk: its outputs are not shared until a restart.
"""

from __future__ import annotations

import inspect
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import xxhash

log = logging.getLogger("comfy_mesh")

CUSTOM = "custom_nodes."
SKIP_DIRS = {"__pycache__", "node_modules", "venv", ".venv"}
CORE = ""        # no identity beyond ComfyUI's version
UNKNOWN = None   # a class this ComfyUI does not know: nothing it computes is shared


def hash_pack(root: str) -> tuple[str, int]:
    """xxh3-128 of a pack's code (every .py file and pyproject.toml, by relative path and content), and the newest
    mtime among them (ns). Files that are not regular (a FIFO) are left out: reading one would never end."""
    h = xxhash.xxh3_128()
    newest = 0
    if os.path.isfile(root):
        files = [(os.path.basename(root), root)]
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            for name in filenames:
                if name.endswith(".py") or name == "pyproject.toml":
                    full = os.path.join(dirpath, name)
                    files.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    for rel, full in sorted(files):
        st = os.stat(full)
        if not stat.S_ISREG(st.st_mode):
            continue
        newest = max(newest, st.st_mtime_ns)
        with open(full, "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest(), newest


class PackIdentities:
    """class type -> "" (a core node), "<pack>@<xxh3-128>" (a custom node), or None (unknown: not shared)."""

    def __init__(self, class_mappings: Mapping[str, Any], custom_node_roots: Callable[[], Sequence[str]],
                 started_ns: int | None = None) -> None:
        self.class_mappings = class_mappings
        self.custom_node_roots = custom_node_roots
        # When the provider started, as ComfyUI loaded its custom nodes: code changed after this is not the code
        # that was imported.
        self.started_ns = started_ns if started_ns is not None else time.time_ns()
        self._lock = threading.Lock()
        self._by_class: dict[str, str | None] = {}
        self._by_root: dict[str, str | None] = {}

    def of_class(self, class_type: str) -> str | None:
        return self._remembered(self._by_class, class_type, self._identify)

    def _remembered(self, table: dict[str, str | None], key: str, work: Callable[[str], str | None]) -> str | None:
        """`work(key)` once per key and process (two threads may both work it out the first time: same answer)."""
        with self._lock:
            if key in table:
                return table[key]
        answer = work(key)
        with self._lock:
            table[key] = answer
        return answer

    def _identify(self, class_type: str) -> str | None:
        cls = self.class_mappings.get(class_type)
        if cls is None:
            return UNKNOWN
        module = getattr(cls, "RELATIVE_PYTHON_MODULE", None)
        if not isinstance(module, str) or not module.startswith(CUSTOM):
            return CORE
        root = self._root_of(cls)
        if root is None:
            log.warning("comfy-mesh: cannot find the custom-node pack of %s (%s): its outputs are not shared",
                        class_type, module)
            return UNKNOWN
        return self._remembered(self._by_root, root, self._hash)

    def _root_of(self, cls: type) -> str | None:
        """The custom_nodes entry (folder or .py file) that holds the file `cls` was defined in."""
        module = sys.modules.get(getattr(cls, "__module__", ""))
        source = getattr(module, "__file__", None)
        if not source:
            try:
                source = inspect.getsourcefile(cls)
            except TypeError:
                source = None
        if not source:
            return None
        path = os.path.abspath(source)
        for root in self.custom_node_roots():
            root = os.path.abspath(root)
            if path.startswith(root + os.sep):
                return os.path.join(root, path[len(root) + 1:].split(os.sep, 1)[0])
        return None

    def _hash(self, root: str) -> str | None:
        name = os.path.basename(root).removesuffix(".py")
        try:
            digest, newest = hash_pack(root)
        except OSError as e:
            log.warning("comfy-mesh: cannot read custom-node pack %s (%s): its outputs are not shared", name, e)
            return UNKNOWN
        if newest > self.started_ns:
            log.warning("comfy-mesh: custom-node pack %s changed on disk after ComfyUI started (it runs the code it "
                        "imported): its outputs are not shared until ComfyUI restarts", name)
            return UNKNOWN
        return f"{name}@{digest}"
