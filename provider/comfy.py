"""The ComfyUI side: read node traits, register the provider through ComfyUI's public API, clean up at exit."""

from __future__ import annotations

import atexit
import logging
from typing import Any

from .config import ProviderConfig
from .policy import NodeTraits

log = logging.getLogger("comfy_mesh")


def _traits(nodes_module: Any) -> Any:
    def traits(class_type: str) -> NodeTraits:
        cls = nodes_module.NODE_CLASS_MAPPINGS.get(class_type)
        if cls is None:
            return NodeTraits(not_idempotent=True)  # unknown class: do not guess
        # V1 nodes set these as class attributes; V3 nodes expose them as class properties from their schema.
        output = getattr(cls, "OUTPUT_NODE", False)
        not_idempotent = getattr(cls, "NOT_IDEMPOTENT", False)
        return NodeTraits(output_node=bool(output), not_idempotent=bool(not_idempotent))

    return traits


def add_web_routes(runtime: Any, reason: Any) -> bool:
    """Routes under /comfy-mesh/ on ComfyUI's server, and served-node events to its pages; False (nothing added)
    on a ComfyUI without PromptServer routes or send_sync."""
    try:
        import server
    except ImportError:
        return False
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None or not hasattr(routes, "get"):
        log.info("comfy-mesh: this ComfyUI's server takes no routes; no web page")
        return False
    from .routes import WebRoutes, served_sender

    WebRoutes(runtime, reason).add_to(routes)
    current = runtime()
    if current is not None and hasattr(prompt_server, "send_sync"):
        current.provider.on_served = served_sender(prompt_server)
    return True


def install() -> Any:
    """Start the mesh and register the provider; returns the runtime, or None when there is nothing to do."""
    config = ProviderConfig.load()
    if not config.enabled:
        log.info("comfy-mesh: disabled (MESH_ENABLED=0)")
        return None
    try:
        from comfy_execution import cache_provider as api
    except ImportError:
        log.warning("comfy-mesh: this ComfyUI has no CacheProvider API (comfy_execution.cache_provider); "
                    "comfy-mesh does nothing. Update ComfyUI to a version with PR #12056.")
        return None
    import folder_paths
    import nodes

    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "unknown"
    from .runtime import start

    runtime = start(config, cache_value=api.CacheValue, traits=_traits(nodes), comfy_version=str(version),
                    base=api.CacheProvider, api=api, folder_paths=folder_paths, nodes=nodes)
    api.register_cache_provider(runtime.provider)

    def shutdown() -> None:
        try:
            api.unregister_cache_provider(runtime.provider)
        finally:
            runtime.close()

    atexit.register(shutdown)
    log.info(runtime.describe())
    return runtime
