"""Two real ComfyUI instances share a mesh: a node executed on A is not executed on B.

Run by hand (CI has no ComfyUI): COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] \
    .venv/bin/python scripts/comfyui_e2e.py

It needs a ComfyUI with the CacheProvider API (0.21+) whose Python can import the `mesh` package
(`<comfyui python> -m pip install -e .` or `mesh install-comfyui DIR --python PY`). Each instance gets its own
base directory with two custom nodes: the provider (linked) and a slow test node that appends to a log file
every time it executes. Both run on the CPU with no models. Exit status 0 means B served the slow node from
the mesh; with no COMFYUI_DIR it prints why and exits 0 without doing anything (a skip).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def comfyui_argv(python: str, port: int, base: Path) -> list[str]:
    """ComfyUI on the CPU on 127.0.0.1:PORT, with its own base directory and database (and database lock)."""
    return [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
            "--base-directory", str(base), "--database-url", f"sqlite:///{base / 'comfyui.db'}"]
SLOW_SECONDS = 3.0

SLOW_NODE = '''
import os, time
import torch

class MeshE2ESlowBlur:
    """A deliberately slow node: the point of the mesh is not to run it twice."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "seed": ("INT", {"default": 0})}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, image, seed):
        with open(os.environ["MESH_E2E_LOG"], "a") as f:
            f.write(f"executed {seed}\\n")
        time.sleep(%s)
        g = torch.Generator().manual_seed(seed)
        return (torch.clamp(image * 0.5 + torch.rand(image.shape, generator=g) * 0.5, 0, 1),)

NODE_CLASS_MAPPINGS = {"MeshE2ESlowBlur": MeshE2ESlowBlur}
''' % SLOW_SECONDS


def stop_process(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """Terminate a ComfyUI, then kill it if it has not exited within `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: object | None = None, timeout: float = 10.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def workflow(seed: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 1234}},
        "2": {"class_type": "MeshE2ESlowBlur", "inputs": {"image": ["1", 0], "seed": seed}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


class Instance:
    def __init__(self, name: str, comfy: Path, python: str, work: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.base = work / name
        (self.base / "custom_nodes" / "mesh_e2e_slow").mkdir(parents=True)
        (self.base / "custom_nodes" / "mesh_e2e_slow" / "__init__.py").write_text(SLOW_NODE)
        (self.base / "custom_nodes" / "comfy_mesh").symlink_to(ROOT / "provider", target_is_directory=True)
        self.exec_log = self.base / "executions.log"
        self.exec_log.touch()
        self.log = open(self.base / "comfy.log", "wb")
        full_env = {**os.environ, **env, "MESH_E2E_LOG": str(self.exec_log)}
        self.process = subprocess.Popen(comfyui_argv(python, self.port, self.base), cwd=comfy, env=full_env,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.base / 'comfy.log'}")
            try:
                http(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready in {timeout} s")

    def run(self, prompt: dict, timeout: float = 120.0) -> float:
        started = time.monotonic()
        prompt_id = http(self.url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
        while time.monotonic() - started < timeout:
            history = http(f"{self.url}/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed"):
                return time.monotonic() - started
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
                raise RuntimeError(f"{self.name}: prompt failed: {history[prompt_id]['status']}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: prompt did not finish in {timeout} s")

    def executions(self) -> int:
        return len(self.exec_log.read_text().splitlines())

    def mesh_lines(self) -> list[str]:
        return [line for line in (self.base / "comfy.log").read_text(errors="replace").splitlines()
                if "comfy-mesh" in line]

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


def main() -> int:
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("skipped: set COMFYUI_DIR to a ComfyUI checkout with the CacheProvider API")
        return 0
    comfy = Path(comfy_dir).resolve()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    mesh_port = free_port()
    secret = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="comfy-mesh-e2e-") as tmp:
        work = Path(tmp)
        common = {"MESH_SECRET": secret, "MESH_MIN_FREE_RAM": "0", "MESH_CLUSTER": "e2e"}
        a = Instance("A", comfy, python, work, {**common, "MESH_LISTEN": f"127.0.0.1:{mesh_port}",
                                               "MESH_NODE_ID": "comfy-a"})
        b = Instance("B", comfy, python, work, {**common, "MESH_LISTEN": "127.0.0.1:0", "MESH_NODE_ID": "comfy-b",
                                               "MESH_SEEDS": f"127.0.0.1:{mesh_port}"})
        try:
            a.wait_ready()
            b.wait_ready()
            seed = int(time.time()) % 100000
            t_a = a.run(workflow(seed))
            time.sleep(2.0)  # stores run as A's prompt loop shuts down, then cross the mesh
            t_b = b.run(workflow(seed))
            print(f"A: {t_a:.2f} s, slow node executed {a.executions()} time(s)")
            print(f"B: {t_b:.2f} s, slow node executed {b.executions()} time(s)")
            for inst in (a, b):
                for line in inst.mesh_lines()[-4:]:
                    print(f"   {inst.name} log: {line}")
            ok = a.executions() == 1 and b.executions() == 0
            print("PASS: B got the slow node's output from the mesh" if ok else "FAIL: B executed the slow node")
            return 0 if ok else 1
        finally:
            a.stop()
            b.stop()


if __name__ == "__main__":
    sys.exit(main())
