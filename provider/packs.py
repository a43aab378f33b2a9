"""The code identity of a custom-node pack: a hash of its Python source, so another version never shares.

ComfyUI's own nodes (nodes.py, comfy_extras, comfy_api_nodes) are covered by the ComfyUI version in the key's
namespace. A custom node's output depends on its pack's code as well, and fleets run different versions of a
pack (one host updated by ComfyUI-Manager, another not). A pack's version string is not enough: a pack edited
in place, or installed from a branch, keeps it. So its identity is xxh3-128 over every `.py` file under its
folder and its `pyproject.toml` (relative path and bytes, in sorted order), computed once per pack and process:
ComfyUI imports a pack's code once, at start, so the files read then are the code that runs.

How a class finds its pack: ComfyUI's `load_custom_node` stamps each class it registers with
`RELATIVE_PYTHON_MODULE = "custom_nodes.<name>"` and records `LOADED_MODULE_DIRS[<name>]`; a single-file pack
(`custom_nodes/x.py`) is that file alone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import xxhash

log = logging.getLogger("comfy_mesh")

CUSTOM = "custom_nodes."
SKIP_DIRS = {"__pycache__", "node_modules", "venv", ".venv"}
CORE = ""        # no identity beyond ComfyUI's version
UNKNOWN = None   # a class this ComfyUI does not know: nothing it computes is shared


def hash_pack(root: str) -> str:
    """xxh3-128 of a pack's code: every .py file and pyproject.toml, by relative path and content."""
    h = xxhash.xxh3_128()
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
        with open(full, "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


class PackIdentities:
    """class type -> "" (a core node), "<pack>@<xxh3-128>" (a custom node), or None (unknown class)."""

    def __init__(self, class_mappings: Mapping[str, Any], loaded_dirs: Mapping[str, str]) -> None:
        self.class_mappings = class_mappings
        self.loaded_dirs = loaded_dirs
        self._lock = threading.Lock()
        self._by_class: dict[str, str | None] = {}
        self._by_pack: dict[str, str | None] = {}

    def of_class(self, class_type: str) -> str | None:
        with self._lock:
            if class_type in self._by_class:
                return self._by_class[class_type]
        identity = self._identify(class_type)
        with self._lock:
            self._by_class[class_type] = identity
        return identity

    def _identify(self, class_type: str) -> str | None:
        cls = self.class_mappings.get(class_type)
        if cls is None:
            return UNKNOWN
        module = getattr(cls, "RELATIVE_PYTHON_MODULE", None)
        if not isinstance(module, str) or not module.startswith(CUSTOM):
            return CORE
        pack = module[len(CUSTOM):]
        with self._lock:
            if pack in self._by_pack:
                return self._by_pack[pack]
        identity = self._hash(pack)
        with self._lock:
            self._by_pack[pack] = identity
        return identity

    def _hash(self, pack: str) -> str | None:
        folder = self.loaded_dirs.get(pack)
        if folder is None:
            log.warning("comfy-mesh: custom-node pack %s has no folder ComfyUI recorded: its outputs are not shared",
                        pack)
            return UNKNOWN
        single = os.path.join(folder, pack + ".py")
        root = single if os.path.isfile(single) and not os.path.isdir(os.path.join(folder, pack)) else folder
        try:
            return f"{pack}@{hash_pack(root)}"
        except OSError as e:
            log.warning("comfy-mesh: cannot read custom-node pack %s (%s): its outputs are not shared", pack, e)
            return UNKNOWN
