"""What the web page is told about a node the mesh served: `comfy-mesh.served`, one event per node.

The provider measures a node's compute time where it runs (provider/costs.py: from its last lookup miss, right
before ComfyUI executes it, to the next lookup or the prompt's end) and stores it with the value
(BlobHeader.compute_seconds, which eviction weighs too), so the instance that is served the value can say what it
saved. Values stored without it say nothing (None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EVENT = "comfy-mesh.served"


@dataclass(frozen=True)
class Served:
    """A node ComfyUI did not execute because the mesh had its output."""

    node_id: str                  # the node's id in the prompt (what the canvas marks)
    class_type: str
    member: str                   # the member that computed and stored it (the blob's first writer); "" unknown
    bytes: int                    # blob bytes that came from the mesh
    seconds: float                # how long the lookup took, as the prompt waited for it
    saved_seconds: float | None   # what computing it cost its writer; None when the value did not carry it
    prompt_id: str = ""

    def payload(self) -> dict[str, object]:
        """The event's JSON body: plain numbers and strings (milliseconds rounded for display)."""
        out: dict[str, object] = asdict(self)
        out["ms"] = round(self.seconds * 1000, 2)
        out["saved_ms"] = None if self.saved_seconds is None else round(self.saved_seconds * 1000, 1)
        return out
