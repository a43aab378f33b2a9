"""The provider's routes on ComfyUI's own web server (aiohttp, `PromptServer.instance.routes`), under /comfy-mesh/,
and the hand-off of served-node events to the page.

- GET  /comfy-mesh/status   the panel's data (provider/status.py)
- GET  /comfy-mesh/settings the run-time settings: {"enabled": bool, "never": [class types], "deny", "allow"}
- POST /comfy-mesh/settings change them (ComfyUI's settings dialog does, through the extension in web/)

ComfyUI's event loop serves every page and websocket of the instance, so no handler waits on the mesh there: the
status is built on this module's own thread under a deadline, one build at a time shared by concurrent requests
(a dead sidecar costs one deadline, not one per open page). A ComfyUI where comfy-mesh did not start still
answers, with `running: false` and the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

from .events import EVENT, Served
from .status import status

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("comfy_mesh")

PREFIX = "/comfy-mesh"
STATUS_TIMEOUT = 2.0   # seconds one Stats call to the mesh may take
MAX_NEVER = 1000       # class types in the "never cached" list
MAX_CLASS_NAME = 200


class SettingsError(ValueError):
    """A settings body that is not what the page sends: answered 400 with this message."""


def parse_settings(body: object) -> dict[str, Any]:
    """{"enabled": bool, "never": [str] | "A, B"}, both optional; anything else is refused, not guessed."""
    if not isinstance(body, dict):
        raise SettingsError("expected a JSON object")
    unknown = set(body) - {"enabled", "never"}
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {}
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise SettingsError("enabled must be true or false")
        out["enabled"] = body["enabled"]
    if "never" in body:
        never = body["never"]
        if isinstance(never, str):
            never = [c for c in never.replace("\n", ",").split(",")]
        if not isinstance(never, list) or not all(isinstance(c, str) for c in never):
            raise SettingsError("never must be a list of class types or a comma-separated string")
        names = [c.strip() for c in never if c.strip()]
        if len(names) > MAX_NEVER or any(len(c) > MAX_CLASS_NAME for c in names):
            raise SettingsError(f"never takes at most {MAX_NEVER} class types of {MAX_CLASS_NAME} characters")
        out["never"] = names
    return out


def cross_site(request: Any) -> str:
    """Why a settings change is refused as cross-site, or "". A JSON body is required: another site's page can
    send a form or a `no-cors` text/plain POST without a CORS preflight, but not `application/json`; and an
    Origin header naming another host than the one asked is refused too (ComfyUI checks origins only when it
    listens on loopback, and a fleet's ComfyUI listens on the LAN)."""
    if request.content_type != "application/json":
        return "settings are changed with a JSON body (Content-Type: application/json)"
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        from urllib.parse import urlsplit

        if urlsplit(origin).netloc.lower() != request.host.lower():
            return f"settings are changed from ComfyUI's own page, not from {origin}"
    elif origin == "null":
        return "settings are changed from ComfyUI's own page, not from an opaque origin"
    return ""


class WebRoutes:
    """The handlers, over whatever runtime the custom node started (None: not running, `reason` says why)."""

    def __init__(self, runtime: Callable[[], Runtime | None], reason: Callable[[], str] = lambda: "",
                 timeout: float = STATUS_TIMEOUT) -> None:
        self._runtime = runtime
        self._reason = reason
        self.timeout = timeout
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="comfy-mesh-web")
        self._building: futures.Future[dict[str, Any]] | None = None

    def add_to(self, routes: Any) -> None:
        """Register on an aiohttp RouteTableDef (ComfyUI's PromptServer.instance.routes; a test's own)."""
        routes.get(f"{PREFIX}/status")(self.get_status)
        routes.get(f"{PREFIX}/settings")(self.get_settings)
        routes.post(f"{PREFIX}/settings")(self.post_settings)

    def _build(self) -> futures.Future[dict[str, Any]]:
        building = self._building
        if building is None or building.done():
            building = self._building = self._pool.submit(status, self._runtime(), self.timeout, self._reason())
        return building

    async def get_status(self, request: Any) -> Any:
        from aiohttp import web

        try:
            data = await asyncio.wait_for(asyncio.wrap_future(self._build()), self.timeout + 1.0)
        except asyncio.TimeoutError:
            return web.json_response({"running": self._runtime() is not None, "members": [], "provider": None,
                                      "warnings": [f"no status within {self.timeout + 1.0:g} s"]}, status=504)
        except Exception as e:  # a bug here must not become ComfyUI's 500 page
            log.debug("comfy-mesh status failed", exc_info=True)
            return web.json_response({"running": False, "members": [], "provider": None,
                                      "warnings": [f"status failed: {e!r}"]}, status=500)
        return web.json_response(data)

    async def get_settings(self, request: Any) -> Any:
        from aiohttp import web

        runtime = self._runtime()
        if runtime is None:
            return web.json_response({"running": False, "reason": self._reason()}, status=503)
        return web.json_response({"running": True, **runtime.provider.policy.settings()})

    async def post_settings(self, request: Any) -> Any:
        from aiohttp import web

        refused = cross_site(request)
        if refused:  # a form or no-cors fetch from another site must not turn the cache off for everyone
            return web.json_response({"error": refused}, status=403)
        runtime = self._runtime()
        if runtime is None:
            return web.json_response({"running": False, "reason": self._reason()}, status=503)
        try:
            changes = parse_settings(await request.json())
        except (SettingsError, ValueError) as e:  # ValueError: not JSON at all
            return web.json_response({"error": str(e)}, status=400)
        runtime.provider.policy.configure(**changes)  # in memory: no network, nothing to wait for
        log.info("comfy-mesh: settings from the web page: %s",
                 ", ".join(f"{k}={v}" for k, v in changes.items()) or "none")
        return web.json_response({"running": True, **runtime.provider.policy.settings()})

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def served_sender(server: Any) -> Callable[[Served], None]:
    """The provider's on_served hook: hand each event to ComfyUI's server loop (send_sync is one
    call_soon_threadsafe) for the page that queued the prompt (every page when it came without a client id)."""
    def send(served: Served) -> None:
        server.send_sync(EVENT, served.payload(), getattr(server, "client_id", None))
    return send
