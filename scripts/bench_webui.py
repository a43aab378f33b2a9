"""What the web page's parts cost a prompt, in-process against a real embedded mesh node (no ComfyUI needed).

    .venv/bin/python scripts/bench_webui.py [--events 20000] [--rounds 7] [--json PATH]

- event: the provider's on_served hook for one served node, as comfy.py wires it: a `Served` built and its
  payload handed to a server loop on another thread with call_soon_threadsafe (what ComfyUI's
  PromptServer.send_sync does), against the same loop of calls without the hook. Per event, on the prompt's
  thread: what a hit costs the prompt more because a page may be watching.
- status: one /comfy-mesh/status build (provider/status.py) against an embedded node: the work the route does on
  its own thread, off ComfyUI's loop, at most once per request (the page polls every 3 s while its tab is open).
Rounds alternate with and without; medians with min and max over rounds, and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from provider.events import EVENT, Served  # noqa: E402
from provider.routes import served_sender  # noqa: E402
from provider.status import status  # noqa: E402


class LoopServer:
    """ComfyUI's PromptServer.send_sync: a put onto a queue of a loop running on another thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.client_id = "page"
        self.received = 0
        self.queue: asyncio.Queue[object] | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.queue = asyncio.Queue()

            async def drain() -> None:
                while True:
                    await self.queue.get()  # type: ignore[union-attr]
                    self.received += 1

            self.loop.create_task(drain())
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    def send_sync(self, event: str, data: object, sid: str | None = None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (event, data, sid))  # type: ignore[union-attr]


def per_event(n: int, hook: object) -> float:
    started = time.perf_counter()
    for i in range(n):
        if hook is not None:
            hook(Served(node_id=str(i), class_type="KSampler", member="gpu1", bytes=3 << 20, seconds=0.012,  # type: ignore[operator]
                        saved_seconds=2.5, prompt_id="p"))
    return (time.perf_counter() - started) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--status-calls", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tests.support.comfy_harness import parser, start_runtime

    server = LoopServer()
    hook = served_sender(server)
    with_hook, without = [], []
    for _ in range(args.rounds):
        without.append(per_event(args.events, None))
        with_hook.append(per_event(args.events, hook))
    deadline = time.monotonic() + 30
    while server.received < args.events * args.rounds and time.monotonic() < deadline:
        time.sleep(0.01)
    rt = start_runtime(parser().parse_args(["--secret", "bench", "--no-identity"]))
    try:
        builds = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(args.status_calls):
                status(rt, 2.0)
            builds.append((time.perf_counter() - t) / args.status_calls)
    finally:
        rt.close()
    extra = [w - o for w, o in zip(with_hook, without)]
    out = {"event_us": {"median": statistics.median(extra) * 1e6, "min": min(extra) * 1e6, "max": max(extra) * 1e6},
           "status_build_us": {"median": statistics.median(builds) * 1e6, "min": min(builds) * 1e6,
                               "max": max(builds) * 1e6},
           "events_delivered": server.received, "events_sent": args.events * args.rounds, "event": EVENT,
           "loadavg": list(os.getloadavg()), "rounds": args.rounds}
    e, s = out["event_us"], out["status_build_us"]
    print(f"served event hand-off, per served node, on the prompt's thread: {e['median']:.1f} us median "
          f"(min {e['min']:.1f}, max {e['max']:.1f}); delivered {out['events_delivered']}/{out['events_sent']}")
    print(f"status build (route thread, embedded node): {s['median']:.0f} us median (min {s['min']:.0f}, "
          f"max {s['max']:.0f}); loadavg {out['loadavg'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
