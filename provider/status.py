"""What the web page's mesh panel shows: members and states, this node's budget and use, hit ratio, compute saved
and warnings, as one JSON-ready dict.

Built from the provider's own counters (always there, even with the mesh down) and one Stats call to its node:
in-process for the embedded node (no network), one RPC under a deadline to the sidecar. It blocks, so the
routes (provider/routes.py) run it on their own thread, never on ComfyUI's event loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mesh.pb import mesh_pb2 as pb

if TYPE_CHECKING:
    from .runtime import Runtime

STATES = ("ALIVE", "SUSPECT", "DEAD", "LEFT")


def _stats_reply(runtime: Runtime, timeout: float) -> Any:
    """The node's StatsReply: the embedded node's servicer called in-process, or the sidecar's Stats RPC."""
    node = runtime.node
    if node is not None:
        if node.servicer is None or node.stopped.is_set():
            raise RuntimeError(f"the embedded mesh node {node.node_id} has stopped")
        return node.servicer.Stats(pb.StatsRequest(), None)
    sidecar = getattr(runtime.client, "node", None)  # RemoteClient's PeerClient to the sidecar
    if sidecar is None:
        raise RuntimeError("no mesh node to ask")
    return sidecar.stats(timeout=timeout)


def provider_part(runtime: Runtime) -> dict[str, Any]:
    """The provider's counters of this ComfyUI: no network, so the panel has them even with the mesh down."""
    p = runtime.provider
    t = p.totals_copy()
    bridge = p.bridge.counters
    looked = t["hits"] + t["misses"] - t["repeats"]  # a node missed twice in one prompt counts once
    return {
        "prompts": int(t["prompts"]), "lookups": int(t["lookups"]), "hits": int(t["hits"]),
        "misses": int(t["misses"] - t["repeats"]), "errors": int(t["errors"]),
        "hit_ratio": round(t["hits"] / looked, 4) if looked > 0 else None,
        "bytes_served": int(t["bytes"]), "saved_seconds": round(t["compute_seconds_saved"], 3),
        "lookup_seconds": round(t["lookup_seconds"], 3), "stores": int(bridge.stores),
        "stores_dropped": int(t["stores_dropped"] + bridge.stores_dropped), "store_errors": int(bridge.store_errors),
        "breaker_trips": int(bridge.breaker_trips),
    }


def _members(reply: Any, self_id: str) -> list[dict[str, Any]]:
    return [{"node_id": m.node_id, "address": m.address, "state": pb.MemberState.Name(m.state),
             "last_heard_seconds": round(m.last_heard_age, 2), "keys": int(m.keys), "bytes": int(m.bytes),
             "capacity": int(m.capacity), "self": m.node_id == self_id} for m in reply.members]


def _security_warnings(runtime: Runtime) -> list[str]:
    if runtime.private:
        return ["no cluster secret (MESH_SECRET_FILE): the embedded node serves this ComfyUI alone and joins no "
                "fleet; `mesh secret FILE` makes one"]
    if runtime.config.mode == "sidecar" and runtime.config.keyring() is None:
        return [f"no cluster secret: the sidecar at {runtime.config.node} trusts every process on this host"]
    return []


def status(runtime: Runtime | None, timeout: float, reason: str = "") -> dict[str, Any]:
    """The panel's data. Never raises for a mesh that is down: `mesh_error` says why, the rest still shows."""
    if runtime is None:
        return {"running": False, "reason": reason or "comfy-mesh is not running in this ComfyUI",
                "members": [], "warnings": [reason] if reason else [], "provider": None, "settings": None}
    out: dict[str, Any] = {
        "running": True, "mode": runtime.config.mode, "namespace": runtime.provider.namespace,
        "provider": provider_part(runtime), "settings": runtime.provider.policy.settings(),
        "members": [], "states": {s: 0 for s in STATES}, "budget": None, "mesh_error": None,
        "warnings": _security_warnings(runtime), "at": time.time(),
    }
    if not runtime.provider.policy.enabled:
        out["warnings"].append("the provider is off (settings): nothing is looked up or stored")
    try:
        reply = _stats_reply(runtime, timeout)
    except Exception as e:  # a dead sidecar, a stopped node: the panel says so and shows what it has
        out["mesh_error"] = str(e) or type(e).__name__
        out["warnings"].append(f"the mesh does not answer: {out['mesh_error']}")
        return out
    c = dict(reply.counters)
    out.update(node_id=reply.node_id, address=reply.address, version=reply.version, cluster=reply.cluster,
               replicas=int(reply.replicas), members=_members(reply, reply.node_id))
    for m in out["members"]:
        out["states"][m["state"]] = out["states"].get(m["state"], 0) + 1
    out["budget"] = {"max_memory": int(c.get("max_memory", 0)), "bytes_used": int(c.get("bytes_used", 0)),
                     "near_max_memory": int(c.get("near_max_memory", 0)),
                     "near_bytes_used": int(c.get("near_bytes_used", 0)), "entries": int(c.get("entries", 0))}
    warnings = out["warnings"]
    warnings.extend(reply.warnings)  # seeds that are not members, a mesh of one by mistake
    for m in out["members"]:
        if m["state"] in ("SUSPECT", "DEAD"):
            warnings.append(f"member {m['node_id']} ({m['address']}) is {m['state'].lower()}")
    missing = int(c.get("under_replicated", 0))
    if missing:
        warnings.append(f"{missing} keys under-replicated at the last repair pass (fewer than {reply.replicas} "
                        f"copies)")
    return out
