"""comfy-mesh cloned into `ComfyUI/custom_nodes/` (ComfyUI-Manager "Install via Git URL", comfy-cli, git clone).

ComfyUI imports this folder as a package by its path. This thin entry loads the clone's `mesh` and its provider
(provider/bootstrap.py says how, and which copy wins over a pip-installed comfy-mesh) and re-exports what
ComfyUI reads from a custom node. The provider (provider/__init__.py) registers itself with ComfyUI's
CacheProvider API, exactly as when `mesh install-comfyui` links it. Imported outside ComfyUI it starts nothing.
"""

import importlib.util as _util
import logging as _logging
import os as _os
import sys as _sys
from pathlib import Path as _Path

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

_here = _os.path.dirname(_os.path.abspath(__file__))
try:  # by path: `mesh` is not importable yet, and the provider package must not be imported before it
    _spec = _util.spec_from_file_location("comfy_mesh_bootstrap", _os.path.join(_here, "provider", "bootstrap.py"))
    _bootstrap = _util.module_from_spec(_spec)
    _sys.modules[_spec.name] = _bootstrap
    _spec.loader.exec_module(_bootstrap)
    _provider = _bootstrap.enter(_Path(_here))
except Exception:  # contained: ComfyUI starts without the mesh
    _logging.getLogger("comfy_mesh").exception("comfy-mesh: the clone at %s failed to load; ComfyUI runs without "
                                               "the mesh cache", _here)
    _provider = None
if _provider is not None:
    NODE_CLASS_MAPPINGS = _provider.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _provider.NODE_DISPLAY_NAME_MAPPINGS
    if getattr(_provider, "WEB_DIRECTORY", None) is not None:  # relative to provider/; ComfyUI reads it from here
        WEB_DIRECTORY = _os.path.normpath(_os.path.join("provider", _provider.WEB_DIRECTORY))
