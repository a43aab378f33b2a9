"""Real ComfyUI instances share a mesh: a node executed on A is not executed on B; and same-named model files
with other bytes never share.

Run by hand (CI has no ComfyUI): COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] \
    .venv/bin/python scripts/comfyui_e2e.py [--scenario share|identity|dedupe|all]

Scenarios:
- share: A runs a prompt with a slow custom node; B, seeded with A, runs it too and must not execute that node.
- identity: three instances each have `models/upscale_models/tiny2x.safetensors`, a real (tiny) spandrel
  Compact 2x upscaler made here with ComfyUI's own Python: A and C hold the same file, B one with other
  weights. After each has identified its file, A runs UpscaleModelLoader -> ImageUpscaleWithModel -> Preview;
  B must compute the upscale itself (and get another image), C must be served A's (the same image).
- dedupe: the same never-seen prompt is POSTed to A and B at the same moment: its slow node must execute once in
  the fleet (one instance computes, the other waits for its value: provider/dedupe.py), with the same image.

It needs a ComfyUI with the CacheProvider API (0.21+) whose Python can import the `mesh` package
(`<comfyui python> -m pip install -e .` or `mesh install-comfyui DIR --python PY`), or, with `--install clone`,
only the packages of `requirements.txt`: each instance then gets a git clone of this repository's committed state
in its custom_nodes (what ComfyUI-Manager's "Install via Git URL" makes) instead of a link to provider/. Each
instance gets its own base directory with two custom nodes: the provider and a slow test node that appends to a log file
every time it executes. Both run on the CPU with no models. Exit status 0 means B served the slow node from
the mesh; with no COMFYUI_DIR it prints why and exits 0 without doing anything (a skip).
"""

from __future__ import annotations

import argparse
import hashlib
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
INSTALL = "link"  # how each instance gets comfy-mesh into its custom_nodes: main() sets it from --install

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


TINY_UPSCALER = """
import sys
import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact

seed, out = int(sys.argv[1]), sys.argv[2]
model = Compact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=2, act_type="prelu")
g = torch.Generator().manual_seed(seed)
with torch.no_grad():
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
save_file({k: v.detach().contiguous().float() for k, v in model.state_dict().items()}, out)
"""


def make_upscaler(python: str, seed: int, out: Path) -> str:
    """A real 2x upscale model spandrel loads (RealESRGAN Compact, 4 features), weights drawn from `seed`, written
    with ComfyUI's own Python (which has spandrel); returns the file's sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-c", TINY_UPSCALER, str(seed), str(out)], check=True, timeout=120)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def upscale_workflow(color: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny2x.safetensors"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


class Instance:
    def __init__(self, name: str, comfy: Path, python: str, work: Path, env: dict[str, str],
                 upscaler_seed: int | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.base = work / name
        self.secret = env.get("MESH_SECRET", "")
        self.mesh_address = env.get("MESH_LISTEN", "")
        self.model_sha256 = ""
        if upscaler_seed is not None:
            self.model_sha256 = make_upscaler(python, upscaler_seed,
                                              self.base / "models" / "upscale_models" / "tiny2x.safetensors")
        env = {**env, "MESH_IDENTITY_CACHE": str(self.base / "identities.json")}
        (self.base / "custom_nodes" / "mesh_e2e_slow").mkdir(parents=True)
        (self.base / "custom_nodes" / "mesh_e2e_slow" / "__init__.py").write_text(SLOW_NODE)
        if INSTALL == "clone":  # the Manager's way: the repository in custom_nodes/, its root __init__.py the entry
            subprocess.run(["git", "clone", "-q", str(ROOT), str(self.base / "custom_nodes" / "comfy-mesh")],
                           check=True, timeout=120)
        else:
            (self.base / "custom_nodes" / "comfy_mesh").symlink_to(ROOT / "provider", target_is_directory=True)
        self.exec_log = self.base / "executions.log"
        self.exec_log.touch()
        self.log = open(self.base / "comfy.log", "wb")
        full_env = {**os.environ, **env, "MESH_E2E_LOG": str(self.exec_log)}
        # The provider is linked from this checkout: its `mesh` package must come from here too, not from whatever
        # ComfyUI's Python has installed (an older checkout would lack what the provider calls).
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
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
        return self.run_full(prompt, timeout)[0]

    def run_full(self, prompt: dict, timeout: float = 120.0) -> tuple[float, dict]:
        """Run a prompt to its end: (seconds, its /history entry)."""
        started = time.monotonic()
        prompt_id = http(self.url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
        while time.monotonic() - started < timeout:
            history = http(f"{self.url}/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed"):
                return time.monotonic() - started, history[prompt_id]
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
                raise RuntimeError(f"{self.name}: prompt failed: {history[prompt_id]['status']}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: prompt did not finish in {timeout} s")

    @staticmethod
    def cached_nodes(entry: dict) -> set[str]:
        """Nodes ComfyUI did not execute in that prompt (its own cache or a provider hit): `execution_cached`."""
        found: set[str] = set()
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_cached":
                found.update(str(n) for n in data.get("nodes", []))
        return found

    def preview_sha256(self, entry: dict, node: str) -> str:
        """sha256 of the PNG a preview node wrote for that prompt (in this instance's temp folder)."""
        image = entry["outputs"][node]["images"][0]
        path = self.base / "temp" / image.get("subfolder", "") / image["filename"]
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def provider_stats(self) -> dict:
        """`mesh stats --json` of this instance's embedded node: its counters and the provider's."""
        done = subprocess.run([sys.executable, "-m", "mesh.cli", "--node", self.mesh_address, "stats", "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "MESH_SECRET": self.secret})
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: mesh stats failed: {done.stderr.strip()}")
        return json.loads(done.stdout)["counters"]

    def stores_settled(self, before: dict, timeout: float = 30.0) -> None:
        """Wait until every store the last prompt handed off (`provider_stores` since `before`) has been pushed,
        refused or failed: the stores run as the prompt's loop shuts down, then cross the mesh."""
        def count(c: dict, *names: str) -> float:
            return sum(c.get(f"provider_{n}", 0) - before.get(f"provider_{n}", 0) for n in names)

        deadline = time.monotonic() + timeout
        while True:
            now = self.provider_stats()
            handed = count(now, "stores")
            if handed and count(now, "bridge_stores", "bridge_stores_refused", "bridge_store_errors",
                                "bridge_stores_dropped", "bridge_stores_cheap") >= handed:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: stores not pushed in {timeout} s")
            time.sleep(0.2)

    def executions(self) -> int:
        return len(self.exec_log.read_text().splitlines())

    def mesh_lines(self) -> list[str]:
        return [line for line in (self.base / "comfy.log").read_text(errors="replace").splitlines()
                if "comfy-mesh" in line]

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()


def share(comfy: Path, python: str, work: Path) -> bool:
    mesh_port = free_port()
    common = {"MESH_SECRET": uuid.uuid4().hex, "MESH_MIN_FREE_RAM": "0", "MESH_CLUSTER": "e2e"}
    a = Instance("A", comfy, python, work, {**common, "MESH_LISTEN": f"127.0.0.1:{mesh_port}",
                                           "MESH_NODE_ID": "comfy-a"})
    b = Instance("B", comfy, python, work, {**common, "MESH_LISTEN": "127.0.0.1:0", "MESH_NODE_ID": "comfy-b",
                                           "MESH_SEEDS": f"127.0.0.1:{mesh_port}"})
    try:
        a.wait_ready()
        b.wait_ready()
        seed = int(time.time()) % 100000
        before = a.provider_stats()
        t_a = a.run(workflow(seed))
        a.stores_settled(before)
        t_b = b.run(workflow(seed))
        print(f"A: {t_a:.2f} s, slow node executed {a.executions()} time(s)")
        print(f"B: {t_b:.2f} s, slow node executed {b.executions()} time(s)")
        for inst in (a, b):
            for line in inst.mesh_lines()[-4:]:
                print(f"   {inst.name} log: {line}")
        ok = a.executions() == 1 and b.executions() == 0
        print("PASS: B got the slow node's output from the mesh" if ok else "FAIL: B executed the slow node")
        return ok
    finally:
        a.stop()
        b.stop()


def identity(comfy: Path, python: str, work: Path) -> bool:
    """A and C hold the same tiny2x.safetensors, B other weights under that name."""
    work = work / "identity"
    ports = {name: free_port() for name in "ABC"}
    common = {"MESH_SECRET": uuid.uuid4().hex, "MESH_MIN_FREE_RAM": "0", "MESH_CLUSTER": "e2e-identity"}
    seeds = {"A": 1, "B": 2, "C": 1}  # the upscaler's weights: A and C the same file, B another
    hosts = {name: Instance(name, comfy, python, work, {
        **common, "MESH_LISTEN": f"127.0.0.1:{ports[name]}", "MESH_NODE_ID": f"comfy-{name.lower()}",
        "MESH_SEEDS": "" if name == "A" else f"127.0.0.1:{ports['A']}"}, seeds[name]) for name in "ABC"}
    a, b, c = hosts["A"], hosts["B"], hosts["C"]
    try:
        print(f"model files: A {a.model_sha256[:12]}, B {b.model_sha256[:12]}, C {c.model_sha256[:12]} "
              f"(same name: models/upscale_models/tiny2x.safetensors)")
        for h in hosts.values():
            h.wait_ready()
        for h in hosts.values():  # each sees the file once (that queues its hash), then waits for the identity
            h.run(upscale_workflow(1))
            if os.environ.get("MESH_IDENTITY") == "0":
                continue  # keys by names alone: nothing is hashed (run so, this scenario shows the wrong image)
            deadline = time.monotonic() + 60
            while h.provider_stats().get("provider_identity_files_hashed", 0) < 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{h.name} did not identify its model file in 60 s")
                time.sleep(0.5)
        color = int(time.time()) % 0xFFFFFF
        before = a.provider_stats()
        _, ea = a.run_full(upscale_workflow(color))
        a.stores_settled(before)
        _, eb = b.run_full(upscale_workflow(color))
        _, ec = c.run_full(upscale_workflow(color))
        images = {h.name: h.preview_sha256(e, "4") for h, e in ((a, ea), (b, eb), (c, ec))}
        cached = {h.name: "3" in h.cached_nodes(e) for h, e in ((a, ea), (b, eb), (c, ec))}
        for h in hosts.values():
            print(f"{h.name}: upscale {'served from the mesh' if cached[h.name] else 'computed here'}, "
                  f"image sha256 {images[h.name][:16]}")
            for line in h.mesh_lines()[-2:]:
                print(f"   {h.name} log: {line}")
        ok = (not cached["A"] and not cached["B"] and cached["C"] and images["C"] == images["A"]
              and images["B"] != images["A"])
        print("PASS: other weights under the same name computed their own image; identical files shared" if ok
              else "FAIL: see above")
        return ok
    finally:
        for h in hosts.values():
            h.stop()


def dedupe(comfy: Path, python: str, work: Path) -> bool:
    """The same new prompt POSTed to A and B at once: the slow node runs once in the fleet."""
    from concurrent.futures import ThreadPoolExecutor

    work = work / "dedupe"
    mesh_port = free_port()
    common = {"MESH_SECRET": uuid.uuid4().hex, "MESH_MIN_FREE_RAM": "0", "MESH_CLUSTER": "e2e-dedupe"}
    a = Instance("A", comfy, python, work, {**common, "MESH_LISTEN": f"127.0.0.1:{mesh_port}",
                                           "MESH_NODE_ID": "comfy-a"})
    b = Instance("B", comfy, python, work, {**common, "MESH_LISTEN": f"127.0.0.1:{free_port()}",
                                           "MESH_NODE_ID": "comfy-b", "MESH_SEEDS": f"127.0.0.1:{mesh_port}"})
    try:
        a.wait_ready()
        b.wait_ready()
        deadline = time.monotonic() + 60  # B joined A's mesh: A lists two members
        while a.provider_stats().get("ring_members", 0) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("A and B did not form one mesh in 60 s")
            time.sleep(0.5)
        seed = int(time.time()) % 100000 + 7
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(h.run_full, workflow(seed)) for h in (a, b)]
            (t_a, ea), (t_b, eb) = (j.result() for j in jobs)
        images = {h.name: h.preview_sha256(e, "4") for h, e in ((a, ea), (b, eb))}
        for h, t in ((a, t_a), (b, t_b)):
            stats = h.provider_stats()
            print(f"{h.name}: {t:.2f} s, slow node executed {h.executions()} time(s), image {images[h.name][:16]}, "
                  f"waits {stats.get('provider_dedupe_waits', 0):.0f} "
                  f"({stats.get('provider_dedupe_wait_seconds', 0):.2f} s), "
                  f"leases held {stats.get('provider_dedupe_leases', 0):.0f}")
            for line in h.mesh_lines()[-2:]:
                print(f"   {h.name} log: {line}")
        ok = a.executions() + b.executions() == 1 and images["A"] == images["B"]
        print(f"PASS: the slow node ({SLOW_SECONDS:g} s) executed once in the fleet, both got the same image" if ok
              else "FAIL: see above")
        return ok
    finally:
        a.stop()
        b.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=("share", "identity", "dedupe", "all"), default="all")
    ap.add_argument("--install", choices=("link", "clone"), default="link",
                    help="the provider as a custom_nodes/comfy_mesh link to provider/ (mesh install-comfyui), or "
                         "a git clone of this repository's HEAD in custom_nodes/comfy-mesh (ComfyUI-Manager)")
    args = ap.parse_args()
    global INSTALL
    INSTALL = args.install
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("skipped: set COMFYUI_DIR to a ComfyUI checkout with the CacheProvider API")
        return 0
    comfy = Path(comfy_dir).resolve()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    ok = True
    with tempfile.TemporaryDirectory(prefix="comfy-mesh-e2e-") as tmp:
        if args.scenario in ("share", "all"):
            print("== share: a slow node executed on A is served to B")
            ok = share(comfy, python, Path(tmp)) and ok
        if args.scenario in ("identity", "all"):
            print("== identity: same model name, other weights")
            ok = identity(comfy, python, Path(tmp)) and ok
        if args.scenario in ("dedupe", "all"):
            print("== dedupe: the same new prompt on A and B at once")
            ok = dedupe(comfy, python, Path(tmp)) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
