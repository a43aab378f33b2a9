"""comfy-mesh: a shared cache of ComfyUI node outputs, spread over a fleet of mesh nodes."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2
