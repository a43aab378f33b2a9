"""comfy-mesh as a ComfyUI custom node: shares node outputs across a fleet of ComfyUI instances.

Linked or copied into `ComfyUI/custom_nodes/`, this package starts (or attaches to) a mesh node and registers
a CacheProvider with ComfyUI. It adds no nodes. Imported outside ComfyUI (tests, tools) it does nothing.
"""

from __future__ import annotations

import logging
import sys

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

log = logging.getLogger("comfy_mesh")
RUNTIME = None


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
        else:
            mesh._comfyui_provider = __file__  # type: ignore[attr-defined]
            from .comfy import install

            RUNTIME = install()
    except ImportError as e:
        from .bootstrap import install_hint

        log.warning("comfy-mesh: cannot load (%s); install it into ComfyUI's Python: %s", e,
                    install_hint(__name__, __file__))
    except ValueError as e:  # a setting that cannot work: one line, and ComfyUI runs on without the mesh
        log.error("comfy-mesh: not started: %s", e)
    except Exception:
        log.exception("comfy-mesh: failed to start; ComfyUI runs without the mesh cache")
