"""comfy-mesh as a ComfyUI custom node: shares node outputs across a fleet of ComfyUI instances.

Linked or copied into `ComfyUI/custom_nodes/`, this package starts (or attaches to) a mesh node and registers
a CacheProvider with ComfyUI. It adds no nodes. Imported outside ComfyUI (tests, tools) it does nothing.

It also shows the mesh in ComfyUI's web page: `WEB_DIRECTORY` is the frontend extension (web/comfy_mesh.js: served
nodes marked on the canvas, a mesh panel, settings), and routes under /comfy-mesh/ on ComfyUI's own server
(routes.py) feed it. They are added even when the mesh did not start, so the panel can say why.
"""

from __future__ import annotations

import logging
import sys

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
WEB_DIRECTORY = "./web"

log = logging.getLogger("comfy_mesh")
RUNTIME = None
NOT_RUNNING = ""  # why RUNTIME is None inside ComfyUI (shown by the web page's panel)


def _inside_comfyui() -> bool:
    nodes = sys.modules.get("nodes")
    return nodes is not None and hasattr(nodes, "NODE_CLASS_MAPPINGS") and hasattr(nodes, "load_custom_node")


if _inside_comfyui():
    try:
        import mesh

        # One provider per ComfyUI: a clone in custom_nodes/ and a `mesh install-comfyui` link share this mark.
        other = getattr(mesh, "_comfyui_provider", None)
        if other is not None:
            log.warning("comfy-mesh: already loaded from %s; this copy (%s) does nothing: keep one of them in "
                        "custom_nodes/", other, __file__)
            WEB_DIRECTORY = None  # type: ignore[assignment]  # the first copy's page and routes serve
        else:
            mesh._comfyui_provider = __file__  # type: ignore[attr-defined]
            from .comfy import install

            RUNTIME = install()
            if RUNTIME is None:
                NOT_RUNNING = "comfy-mesh is disabled (MESH_ENABLED=0) or this ComfyUI has no CacheProvider API"
    except ImportError as e:
        from .bootstrap import install_hint

        hint = install_hint(__name__, __file__)
        NOT_RUNNING = f"cannot load: {e}; install it into ComfyUI's Python: {hint}"
        log.warning("comfy-mesh: cannot load (%s); install it into ComfyUI's Python: %s", e, hint)
    except ValueError as e:  # a setting that cannot work: one line, and ComfyUI runs on without the mesh
        NOT_RUNNING = f"not started: {e}"
        log.error("comfy-mesh: not started: %s", e)
    except Exception as e:
        NOT_RUNNING = f"failed to start: {e!r}"
        log.exception("comfy-mesh: failed to start; ComfyUI runs without the mesh cache")
    try:
        if WEB_DIRECTORY is not None:
            from .comfy import add_web_routes

            add_web_routes(lambda: RUNTIME, lambda: NOT_RUNNING)
    except Exception:  # the page is a convenience: without it ComfyUI and the cache run as before
        log.warning("comfy-mesh: no web page routes", exc_info=True)
