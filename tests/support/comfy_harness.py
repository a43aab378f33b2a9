"""A stand-in for ComfyUI's caching layer: drives a CacheProvider exactly as ComfyUI 0.21 does.

Modelled on `comfy_execution/caching.py`, `comfy_execution/cache_provider.py` and `execution.py` (see
/work/shared/comfyui-cache-provider.md), with nothing of ComfyUI imported:

- `CacheContext` / `CacheValue` are shaped like ComfyUI's dataclasses. A node's cache key is ComfyUI's input
  signature (class type, IS_CHANGED value, sorted inputs, links replaced by ("ANCESTOR", index, socket), the
  node id for NOT_IDEMPOTENT nodes, then every ancestor's signature), turned into hashable frozensets the way
  ComfyUI's `to_hashable` does; `cache_key_hash` is the SHA-256 of ComfyUI's canonical JSON of that key. Keys
  holding self-unequal values (an IS_CHANGED that returns NaN) never reach a provider.
- Each prompt runs under a fresh `asyncio.run`: `on_prompt_start`, then one `asyncio.gather` of lookups of every
  node (local cache first, the provider only on a local miss and only if `should_cache(context)`), then the
  nodes in topological order, each looked up again right before it runs. A provider hit must be a `CacheValue`
  whose outputs are a list or tuple; the node then does not run. After a node runs, its value goes into the
  local cache, then, if `should_cache(context, value)`, `asyncio.create_task(provider.on_store(...))` and the
  engine moves on without awaiting. `on_prompt_end` comes last (in a `finally`), and `asyncio.run` cancels
  the store tasks still pending.
- Store tasks: ComfyUI creates them with `asyncio.create_task` as nodes finish ("immediate"); in a real
  ComfyUI they were seen to start only after `on_prompt_end`, as `asyncio.run` shut down, and any that awaited
  was cancelled. The default "deferred" mode reproduces that observation: the tasks are created as the
  prompt's coroutine returns, so each runs only its first step before `asyncio.run` cancels it.
- Every exception from a provider method is caught and logged (as ComfyUI does) and recorded in
  `PromptResult.errors`, so tests can assert there was none.

Node classes are plain classes with FUNCTION / RETURN_TYPES and optional OUTPUT_NODE / NOT_IDEMPOTENT /
IS_CHANGED, registered in NODE_CLASS_MAPPINGS; node traits for the provider come from `provider.comfy._traits`
applied to a fake `nodes` module holding that mapping. Outputs are deterministic functions of seeds
(torch.Generator), so two processes compute bit-identical values.

Run as a "ComfyUI-like process" (one provider, an embedded node or a sidecar attachment):

    python -m tests.support.comfy_harness --secret S [--seeds HOST:PORT] --workflow standard --seed 1   # one shot
    python -m tests.support.comfy_harness --secret S --serve      # JSON commands on stdin, JSON replies on stdout

Serve mode prints `{"event": "ready", ...}` first, then answers one JSON line per command line:
`{"cmd": "run", "workflow": "standard", "seed": 1}` (or `"prompt": {...}`), `{"cmd": "flush"}`,
`{"cmd": "stats"}`, `{"cmd": "members"}`, `{"cmd": "contexts", ...}`, `{"cmd": "quit"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("comfy_harness")

COMFY_VERSION = "0.21.0-test"
ROOT = Path(__file__).resolve().parents[2]  # the repository: `-m tests.support.comfy_harness` runs there


# ------------------------------------------------------------------------------------------ ComfyUI's types


@dataclass
class CacheContext:
    node_id: str
    class_type: str
    cache_key_hash: str  # SHA256 hex digest


@dataclass
class CacheValue:
    outputs: list
    ui: dict = None  # type: ignore[assignment]


class CacheProvider:
    """ComfyUI's abstract base (comfy_api/latest/_caching.py), for `runtime.start(base=...)`."""

    async def on_lookup(self, context: CacheContext) -> Optional[CacheValue]:  # pragma: no cover
        raise NotImplementedError

    async def on_store(self, context: CacheContext, value: CacheValue) -> None:  # pragma: no cover
        raise NotImplementedError

    def should_cache(self, context: CacheContext, value: Optional[CacheValue] = None) -> bool:
        return True

    def on_prompt_start(self, prompt_id: str) -> None:
        pass

    def on_prompt_end(self, prompt_id: str) -> None:
        pass


@dataclass
class CacheEntry:
    """execution.CacheEntry: what the local cache holds."""

    ui: Optional[dict]
    outputs: list


# ------------------------------------------------------------------ ComfyUI's cache keys (caching.py, cache_provider.py)


class Unhashable:
    def __init__(self) -> None:
        self.value = float("NaN")


def to_hashable(obj: Any) -> Any:
    if isinstance(obj, (int, float, str, bool, bytes, type(None))):
        return obj
    if isinstance(obj, Mapping):
        return frozenset([(to_hashable(k), to_hashable(v)) for k, v in sorted(obj.items())])
    if isinstance(obj, Sequence):
        return frozenset(zip(itertools.count(), [to_hashable(i) for i in obj]))
    return Unhashable()


def _canonicalize(obj: Any) -> Any:
    if isinstance(obj, frozenset):
        return ("__frozenset__", sorted([_canonicalize(i) for i in obj], key=lambda x: json.dumps(x, sort_keys=True)))
    if isinstance(obj, set):
        return ("__set__", sorted([_canonicalize(i) for i in obj], key=lambda x: json.dumps(x, sort_keys=True)))
    if isinstance(obj, tuple):
        return ("__tuple__", [_canonicalize(i) for i in obj])
    if isinstance(obj, list):
        return [_canonicalize(i) for i in obj]
    if isinstance(obj, dict):
        return {"__dict__": sorted([[_canonicalize(k), _canonicalize(v)] for k, v in obj.items()],
                                   key=lambda x: json.dumps(x, sort_keys=True))}
    if isinstance(obj, (int, float, str, bool, type(None))):
        return (type(obj).__name__, obj)
    if isinstance(obj, bytes):
        return ("__bytes__", obj.hex())
    raise ValueError(f"Cannot canonicalize type: {type(obj).__name__}")


def serialize_cache_key(cache_key: Any) -> Optional[str]:
    try:
        canonical = _canonicalize(cache_key)
        return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    except Exception as e:
        log.warning("Failed to serialize cache key: %s", e)
        return None


def contains_self_unequal(obj: Any) -> bool:
    try:
        if not (obj == obj):
            return True
    except Exception:
        return True
    if isinstance(obj, (frozenset, tuple, list, set)):
        return any(contains_self_unequal(i) for i in obj)
    if isinstance(obj, dict):
        return any(contains_self_unequal(k) or contains_self_unequal(v) for k, v in obj.items())
    if hasattr(obj, "value"):
        return contains_self_unequal(obj.value)
    return False


# What ComfyUI's caching layer calls through comfy_execution.cache_provider (it imports the two functions from
# that module at every call, so a provider may replace them there: provider/fastkeys.py does, with --fast-keys).
API = types.SimpleNamespace(_serialize_cache_key=serialize_cache_key, _contains_self_unequal=contains_self_unequal,
                            _canonicalize=_canonicalize)


def is_link(obj: Any) -> bool:
    return (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)
            and isinstance(obj[1], (int, float)) and not isinstance(obj[1], bool))


# ------------------------------------------------------------------------------------------------ node classes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class MakeImage:
    """IMAGE float32 [B,H,W,C] in [0, 1] on 8-bit levels, as ComfyUI's LoadImage decodes a PNG (uint8 / 255)."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, seed: int, batch: int = 1, height: int = 64, width: int = 64) -> tuple:
        pixels = torch.randint(0, 256, (batch, height, width, 3), generator=_gen(seed), dtype=torch.uint8)
        return (pixels.to(torch.float32) / 255.0,)


class SlowBlur:
    """A deliberately slow node: sleeps, then blends the image with seeded noise."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, image: torch.Tensor, seed: int, delay: float = 0.2) -> tuple:
        time.sleep(delay)
        noise = torch.rand(image.shape, generator=_gen(seed), dtype=image.dtype)
        return (torch.clamp(image * 0.5 + noise * 0.5, 0, 1),)


class MakeLatent:
    """LATENT {"samples": Tensor[B,4,h,w], "batch_index": [...]}."""
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    def run(self, seed: int, batch: int = 2, height: int = 64, width: int = 64) -> tuple:
        samples = torch.randn((batch, 4, height // 8, width // 8), generator=_gen(seed))
        return ({"samples": samples, "batch_index": list(range(batch))},)


class MakeConditioning:
    """CONDITIONING [[Tensor, {"pooled_output": Tensor}]]."""
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"

    def run(self, seed: int, text: str = "") -> tuple:
        g = _gen(seed + len(text))
        cond = torch.randn((1, 77, 64), generator=g)
        pooled = torch.randn((1, 64), generator=g)
        return ([[cond, {"pooled_output": pooled}]],)


class MakeBF16:
    RETURN_TYPES = ("TENSOR",)
    FUNCTION = "run"

    def run(self, seed: int) -> tuple:
        return (torch.randn((3, 33, 17), generator=_gen(seed)).to(torch.bfloat16),)


class MakeFP8:
    RETURN_TYPES = ("TENSOR",)
    FUNCTION = "run"

    def run(self, seed: int) -> tuple:
        return ((torch.randn((5, 64), generator=_gen(seed)) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),)


class MakeScalars:
    RETURN_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
    FUNCTION = "run"

    def run(self, seed: int, text: str = "a prompt") -> tuple:
        return (seed * 7919 + 2**70, seed / 3.0, f"{text} #{seed} \u00e9\u6f22", seed % 2 == 1)


class ModelLike:
    """Not data: what a MODEL (a ModelPatcher) is to the codec."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.weights = {"w": torch.ones(4)}

    def __repr__(self) -> str:
        return f"ModelLike({self.name!r})"


class LoadModel:
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    def run(self, name: str) -> tuple:
        return (ModelLike(name),)


class ApplyModel:
    """A cacheable IMAGE computed with a MODEL input."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, model: ModelLike, image: torch.Tensor) -> tuple:
        return (torch.clamp(image * float(model.weights["w"][0]) * 0.9, 0, 1),)


class SaveImage:
    """An output node: shows (names) a file on this instance."""
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    def run(self, images: torch.Tensor, filename_prefix: str = "ComfyUI") -> dict:
        digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:12]
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{digest}.png", "subfolder": "", "type": "output"}]}}


class RandomNoise:
    """NOT_IDEMPOTENT: its output may differ run to run by design (here it is seeded, for comparisons)."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    NOT_IDEMPOTENT = True

    def run(self, seed: int) -> tuple:
        return (torch.rand((1, 8, 8, 3), generator=_gen(seed)),)


class AlwaysChanged:
    """IS_CHANGED returns NaN: ComfyUI never asks a provider about it."""
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")

    def run(self, seed: int) -> tuple:
        return (seed,)


class Opaque:
    """A value the codec cannot represent (a function inside a list)."""
    RETURN_TYPES = ("OPAQUE",)
    FUNCTION = "run"

    def run(self, seed: int) -> tuple:
        return ([seed, len],)


class BigTensor:
    RETURN_TYPES = ("TENSOR",)
    FUNCTION = "run"

    def run(self, seed: int, elements: int = 1 << 16) -> tuple:
        return (torch.rand((elements,), generator=_gen(seed)),)


class CheapInt:
    """A cheap node for overhead measurements: an int from an int (and optionally an upstream int)."""
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, value: int, prev: int = 0) -> tuple:
        return (value + prev,)


class Broken:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, seed: int) -> tuple:
        raise RuntimeError("this node always fails")


class Interrupted(Exception):
    """What ComfyUI's interrupt raises inside a node (comfy.model_management.InterruptProcessingException)."""


class SlowInterruptible:
    """A slow node interrupted (it raises, as ComfyUI's interrupt does) when `stop_file` appears; the node that
    sees it deletes it, so one interrupt stops one computation. The path is an input: part of the key."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, seed: int, delay: float = 1.0, stop_file: str = "") -> tuple:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if stop_file and os.path.exists(stop_file):
                try:
                    os.unlink(stop_file)  # one interrupt: whoever computes the key next runs to the end
                except FileNotFoundError:
                    continue  # another instance took this interrupt
                raise Interrupted("Processing interrupted")
            time.sleep(0.01)
        return (torch.rand((1, 32, 32, 3), generator=_gen(seed)),)


class SlowOpaque:
    """A slow node whose value the codec cannot represent (not cacheable)."""
    RETURN_TYPES = ("OPAQUE",)
    FUNCTION = "run"

    def run(self, seed: int, delay: float = 1.0) -> tuple:
        time.sleep(delay)
        return ([seed, len],)


# -------------------------------------------------------------- model folders (ComfyUI's folder_paths) and files

PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "upscale_models", "embeddings", "controlnet", "text_encoders",
                 "diffusion_models")


def fake_folder_paths(root: Path) -> types.ModuleType:
    """What `import folder_paths` is inside ComfyUI, for the parts the provider reads: model folders under `root`
    (listed recursively, by extension, as relative paths) and custom nodes in `root/custom_nodes`."""
    fp = types.ModuleType("folder_paths")
    names: dict[str, tuple[list[str], set[str]]] = {f: ([str(root / f)], PT_EXTENSIONS) for f in MODEL_FOLDERS}
    names["custom_nodes"] = ([str(root / "custom_nodes")], set())

    def get_folder_paths(folder: str) -> list[str]:
        return list(names[folder][0])

    def get_filename_list(folder: str) -> list[str]:
        found: set[str] = set()
        for base in names[folder][0]:
            for dirpath, _, files in os.walk(base):
                found.update(os.path.relpath(os.path.join(dirpath, f), base) for f in files
                             if os.path.splitext(f)[1].lower() in names[folder][1])
        return sorted(found)

    def get_full_path(folder: str, name: str) -> Optional[str]:
        if folder not in names:
            return None
        name = os.path.relpath(os.path.join("/", name), "/")
        for base in names[folder][0]:
            path = os.path.join(base, name)
            if os.path.isfile(path):
                return path
        return None

    fp.folder_names_and_paths = names  # type: ignore[attr-defined]
    fp.get_folder_paths = get_folder_paths  # type: ignore[attr-defined]
    fp.get_filename_list = get_filename_list  # type: ignore[attr-defined]
    fp.get_full_path = get_full_path  # type: ignore[attr-defined]
    return fp


FOLDER_PATHS: Optional[types.ModuleType] = None  # set by --models: this "ComfyUI"'s model folders


def _file_factor(folder: str, name: str) -> float:
    """A number that depends on every byte of a model file, as a model's effect on an image does."""
    path = FOLDER_PATHS.get_full_path(folder, name) if FOLDER_PATHS is not None else None
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")
    return 0.5 + int(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8], 16) / 2**32


class UpscaleModelLoader:
    """Loads a model file by name (ComfyUI's input is the name; the weights are whatever the file holds)."""
    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "run"

    def run(self, model_name: str) -> tuple:
        model = ModelLike(model_name)
        model.weights = {"w": torch.full((4,), _file_factor("upscale_models", model_name))}
        return (model,)


class ImageUpscaleWithModel:
    """A cacheable IMAGE whose pixels depend on the loaded file's bytes."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, upscale_model: ModelLike, image: torch.Tensor) -> tuple:
        up = torch.nn.functional.interpolate(image.movedim(-1, 1), scale_factor=2).movedim(1, -1)
        return (torch.clamp(up * float(upscale_model.weights["w"][0]), 0, 1),)


class CLIPTextEncode:
    """CONDITIONING from text, where `embedding:NAME` loads embeddings/NAME(.pt|.safetensors|.bin) when present
    (as ComfyUI's tokenizer does; an absent embedding is left out)."""
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"

    def run(self, text: str) -> tuple:
        factor = 1.0
        for word in text.split():
            if word.startswith("embedding:") and FOLDER_PATHS is not None:
                name = word[len("embedding:"):].strip(",")
                for ext in ("", ".safetensors", ".pt", ".bin"):
                    if FOLDER_PATHS.get_full_path("embeddings", name + ext):
                        factor *= _file_factor("embeddings", name + ext)
                        break
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return ([[torch.rand(1, 4, 8, generator=_gen(seed)) * factor, {"pooled_output": torch.ones(1, 8) * factor}]],)


class StringConcatenate:
    """Text built by a node (as ComfyUI's core StringConcatenate): a name in it is in no cache key."""
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"

    def run(self, string_a: str, string_b: str) -> tuple:
        return (string_a + string_b,)


NODE_CLASS_MAPPINGS: dict[str, type] = {cls.__name__: cls for cls in (
    MakeImage, SlowBlur, MakeLatent, MakeConditioning, MakeBF16, MakeFP8, MakeScalars, LoadModel, ApplyModel,
    SaveImage, RandomNoise, AlwaysChanged, Opaque, BigTensor, CheapInt, Broken, UpscaleModelLoader,
    ImageUpscaleWithModel, CLIPTextEncode, StringConcatenate, SlowInterruptible, SlowOpaque)}


def load_custom_nodes(folder: Path) -> list[str]:
    """What ComfyUI's `load_custom_node` does for each pack in `folder`: import it from its path, register its
    NODE_CLASS_MAPPINGS and stamp each class with RELATIVE_PYTHON_MODULE (sys.modules records its file)."""
    import importlib.util

    loaded = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        init = entry / "__init__.py" if entry.is_dir() else entry
        if not init.is_file() or init.suffix != ".py":
            continue
        name = entry.stem if entry.is_file() else entry.name
        spec = importlib.util.spec_from_file_location(str(entry).replace(".", "_x_"), init)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        for class_type, cls in getattr(module, "NODE_CLASS_MAPPINGS", {}).items():
            NODE_CLASS_MAPPINGS[class_type] = cls
            cls.RELATIVE_PYTHON_MODULE = f"custom_nodes.{name}"
        loaded.append(name)
    return loaded


def fake_nodes_module(mappings: Mapping[str, type] | None = None) -> types.ModuleType:
    """What `import nodes` is inside ComfyUI, as far as provider.comfy._traits reads it."""
    module = types.ModuleType("nodes")
    module.NODE_CLASS_MAPPINGS = dict(NODE_CLASS_MAPPINGS if mappings is None else mappings)  # type: ignore[attr-defined]
    return module


def traits_lookup(mappings: Mapping[str, type] | None = None) -> Any:
    from provider.comfy import _traits

    return _traits(fake_nodes_module(mappings))


# --------------------------------------------------------------------------------------------------- workflows


def standard_prompt(seed: int, delay: float = 0.2, size: int = 64) -> dict[str, dict[str, Any]]:
    """Every kind of value and node the tests need, in ComfyUI's API format."""
    return {
        "image": {"class_type": "MakeImage", "inputs": {"seed": seed, "batch": 2, "height": size, "width": size}},
        "blur": {"class_type": "SlowBlur", "inputs": {"image": ["image", 0], "seed": seed + 1, "delay": delay}},
        "latent": {"class_type": "MakeLatent", "inputs": {"seed": seed + 2}},
        "cond": {"class_type": "MakeConditioning", "inputs": {"seed": seed + 3, "text": "a cat"}},
        "bf16": {"class_type": "MakeBF16", "inputs": {"seed": seed + 4}},
        "fp8": {"class_type": "MakeFP8", "inputs": {"seed": seed + 5}},
        "scalars": {"class_type": "MakeScalars", "inputs": {"seed": seed + 6, "text": "a prompt"}},
        "model": {"class_type": "LoadModel", "inputs": {"name": f"model-{seed}"}},
        "applied": {"class_type": "ApplyModel", "inputs": {"model": ["model", 0], "image": ["blur", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["applied", 0], "filename_prefix": "mesh"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"seed": seed + 7}},
        "changed": {"class_type": "AlwaysChanged", "inputs": {"seed": seed + 8}},
    }


# Nodes of standard_prompt whose values another instance must serve from the mesh, and those it must run.
STANDARD_SHARED = ("image", "blur", "latent", "cond", "bf16", "fp8", "scalars", "applied")
STANDARD_LOCAL = ("model", "save", "noise", "changed")


def chain_prompt(n: int, seed: int, width: int = 1) -> dict[str, dict[str, Any]]:
    """n cheap nodes: `width` independent chains, each node linked to the previous one of its chain."""
    prompt: dict[str, dict[str, Any]] = {}
    for i in range(n):
        inputs: dict[str, Any] = {"value": seed * 100_003 + i}
        if i >= width:
            inputs["prev"] = [f"n{i - width}", 0]
        prompt[f"n{i}"] = {"class_type": "CheapInt", "inputs": inputs}
    return prompt


def big_image_prompt(seed: int, batch: int = 4, size: int = 1024) -> dict[str, dict[str, Any]]:
    return {"big": {"class_type": "MakeImage", "inputs": {"seed": seed, "batch": batch, "height": size,
                                                          "width": size}}}


WORKFLOWS = {"standard": standard_prompt, "chain": chain_prompt, "big_image": big_image_prompt}


def build_prompt(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if spec.get("prompt") is not None:
        return spec["prompt"]
    args = dict(spec.get("args", {}))
    if "seed" in spec:
        args["seed"] = spec["seed"]
    return WORKFLOWS[spec.get("workflow", "standard")](**args)


# --------------------------------------------------------------------------------------------------- checksums


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def checksum(value: Any) -> Any:
    """A JSON tree naming every container type and every leaf exactly (tensors by dtype, shape, sha256)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "sha256": hashlib.sha256(_tensor_bytes(value)).hexdigest()}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [checksum(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[str(k), checksum(v)] for k, v in value.items()]}
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, int):  # bool included
        return {type(value).__name__: repr(value)}
    if value is None or isinstance(value, str):
        return {type(value).__name__: value}
    return {"object": type(value).__qualname__, "repr": repr(value)}


# ------------------------------------------------------------------------------------------------------ engine


@dataclass
class NodeRecord:
    status: str = "pending"      # executed | provider | local | failed
    exec_s: float = 0.0          # time in the node's FUNCTION
    provider_s: float = 0.0      # time in provider calls for this node (should_cache, on_lookup, on_store hand-off)
    lookups: int = 0             # provider lookups made for it


@dataclass
class PromptResult:
    prompt_id: str
    executed: list[str] = field(default_factory=list)
    provider_hits: list[str] = field(default_factory=list)   # served by the provider this prompt
    local_hits: list[str] = field(default_factory=list)      # served from the local cache (earlier prompts)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)          # provider exceptions (ComfyUI logs and goes on)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)    # node id -> checksum tree of (outputs, ui)
    wall_s: float = 0.0                                      # asyncio.run, start to finish
    gather_s: float = 0.0                                    # the prompt-start gather of lookups
    context_s: float = 0.0                                   # ComfyUI's own work: hashing keys for providers
    provider_lookups: int = 0
    stores_created: int = 0
    stores_done: int = 0
    stores_cancelled: int = 0

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "nodes"}
        out["nodes"] = {k: v.__dict__ for k, v in self.nodes.items()}
        return out


def topological_order(prompt: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Kahn's algorithm; ties broken by the prompt's own order."""
    deps = {nid: {v[0] for v in node["inputs"].values() if is_link(v)} for nid, node in prompt.items()}
    for nid, ds in deps.items():
        missing = ds - set(prompt)
        if missing:
            raise ValueError(f"node {nid} links to missing nodes {sorted(missing)}")
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(prompt):
        ready = [nid for nid in prompt if nid not in done and deps[nid] <= done]
        if not ready:
            raise ValueError("the prompt has a cycle")
        for nid in ready:
            order.append(nid)
            done.add(nid)
    return order


class Engine:
    """One "ComfyUI" with an optional provider. Not thread-safe: one prompt at a time, like the prompt worker."""

    def __init__(self, provider: Any = None, mappings: Mapping[str, type] | None = None,
                 store_tasks: str = "deferred", keep_local: bool = True) -> None:
        if store_tasks not in ("deferred", "immediate"):
            raise ValueError("store_tasks must be deferred or immediate")
        self.provider = provider
        self.mappings = dict(NODE_CLASS_MAPPINGS if mappings is None else mappings)
        self.store_tasks = store_tasks
        self.keep_local = keep_local
        self.cache: dict[Any, CacheEntry] = {}  # the outputs cache: signature -> entry, across prompts
        self.prompts_run = 0

    # -- cache keys ------------------------------------------------------------------------------------------

    def _is_changed(self, prompt: Mapping[str, Any], node_id: str, memo: dict[str, Any]) -> Any:
        if node_id in memo:
            return memo[node_id]
        node = prompt[node_id]
        cls = self.mappings[node["class_type"]]
        if not hasattr(cls, "IS_CHANGED"):
            memo[node_id] = False
        else:
            constants = {k: v for k, v in node["inputs"].items() if not is_link(v)}
            try:
                memo[node_id] = [cls.IS_CHANGED(**constants)]
            except Exception:
                memo[node_id] = float("NaN")
        return memo[node_id]

    def _immediate_signature(self, prompt: Mapping[str, Any], node_id: str, order: dict[str, int],
                             memo: dict[str, Any]) -> list[Any]:
        node = prompt[node_id]
        cls = self.mappings[node["class_type"]]
        signature: list[Any] = [node["class_type"], self._is_changed(prompt, node_id, memo)]
        if getattr(cls, "NOT_IDEMPOTENT", False):
            signature.append(node_id)
        inputs = node["inputs"]
        for key in sorted(inputs):
            if is_link(inputs[key]):
                ancestor, socket = inputs[key]
                signature.append((key, ("ANCESTOR", order[ancestor], socket)))
            else:
                signature.append((key, inputs[key]))
        return signature

    def _ancestry(self, prompt: Mapping[str, Any], node_id: str, ancestors: list[str], order: dict[str, int]) -> None:
        inputs = prompt[node_id]["inputs"]
        for key in sorted(inputs):
            if is_link(inputs[key]):
                ancestor = inputs[key][0]
                if ancestor not in order:
                    ancestors.append(ancestor)
                    order[ancestor] = len(ancestors) - 1
                    self._ancestry(prompt, ancestor, ancestors, order)

    def signatures(self, prompt: Mapping[str, Any]) -> dict[str, Any]:
        """node id -> ComfyUI's hashable cache key (its own signature, then its ancestors')."""
        memo: dict[str, Any] = {}
        keys = {}
        for node_id in prompt:
            ancestors: list[str] = []
            order: dict[str, int] = {}
            self._ancestry(prompt, node_id, ancestors, order)
            signature = [self._immediate_signature(prompt, node_id, order, memo)]
            signature += [self._immediate_signature(prompt, a, order, memo) for a in ancestors]
            keys[node_id] = to_hashable(signature)
        return keys

    def contexts(self, prompt: Mapping[str, Any]) -> dict[str, Optional[CacheContext]]:
        """The CacheContext ComfyUI would give a provider for each node (None: never asked)."""
        out: dict[str, Optional[CacheContext]] = {}
        for node_id, key in self.signatures(prompt).items():
            out[node_id] = None if API._contains_self_unequal(key) else self._context(prompt, node_id, key)
        return out

    @staticmethod
    def _context(prompt: Mapping[str, Any], node_id: str, key: Any,
                 result: Optional[PromptResult] = None) -> Optional[CacheContext]:
        """caching._build_context: ComfyUI canonicalises and hashes the key again for every provider call."""
        t0 = time.perf_counter()
        digest = API._serialize_cache_key(key)
        if result is not None:
            result.context_s += time.perf_counter() - t0
        if digest is None:
            return None
        return CacheContext(node_id=node_id, class_type=prompt[node_id].get("class_type", ""), cache_key_hash=digest)

    # -- running a prompt --------------------------------------------------------------------------------------

    def run(self, prompt: Mapping[str, Mapping[str, Any]], prompt_id: str | None = None) -> PromptResult:
        """What the prompt worker thread does: one fresh event loop per prompt, via asyncio.run."""
        result = PromptResult(prompt_id=prompt_id or uuid.uuid4().hex)
        result.nodes = {nid: NodeRecord() for nid in prompt}
        tasks: list[asyncio.Task[None]] = []
        started = time.perf_counter()
        asyncio.run(self._execute_async(prompt, result, tasks))
        result.wall_s = time.perf_counter() - started
        result.stores_created = len(tasks)
        result.stores_cancelled = sum(1 for t in tasks if t.cancelled())
        result.stores_done = sum(1 for t in tasks if t.done() and not t.cancelled())
        self.prompts_run += 1
        return result

    def _lifecycle(self, event: str, prompt_id: str, result: PromptResult) -> None:
        if self.provider is None:
            return
        try:
            if event == "start":
                self.provider.on_prompt_start(prompt_id)
            else:
                self.provider.on_prompt_end(prompt_id)
        except Exception as e:
            log.warning("Cache provider %s error on %s: %s", type(self.provider).__name__, event, e)
            result.errors.append(f"on_prompt_{event}: {e!r}")

    async def _execute_async(self, prompt: Mapping[str, Mapping[str, Any]], result: PromptResult,
                             tasks: list[asyncio.Task[None]]) -> None:
        deferred: list[tuple[CacheContext, CacheValue, str]] = []
        self._lifecycle("start", result.prompt_id, result)
        try:
            keys = self.signatures(prompt)
            if not self.keep_local:
                self.cache.clear()
            else:  # CLASSIC: keep only what this prompt uses
                used = set(keys.values())
                for k in [k for k in self.cache if k not in used]:
                    del self.cache[k]
            from_provider: set[str] = set()
            node_ids = list(prompt)
            t0 = time.perf_counter()
            await asyncio.gather(*(self._get(prompt, nid, keys[nid], result, from_provider) for nid in node_ids))
            result.gather_s = time.perf_counter() - t0
            values: dict[str, CacheEntry] = {}
            for node_id in topological_order(prompt):
                cached = await self._get(prompt, node_id, keys[node_id], result, from_provider)
                record = result.nodes[node_id]
                if cached is not None:
                    values[node_id] = cached
                    record.status = "provider" if node_id in from_provider else "local"
                    (result.provider_hits if node_id in from_provider else result.local_hits).append(node_id)
                    continue
                entry = self._execute(prompt, node_id, values, record)
                if entry is None:
                    result.failed.append(node_id)
                    break  # ComfyUI stops the prompt at the first failing node
                values[node_id] = entry
                result.executed.append(node_id)
                self.cache[keys[node_id]] = entry
                await self._notify_store(prompt, node_id, keys[node_id], entry, result, tasks, deferred)
            for node_id, entry in values.items():
                result.outputs[node_id] = checksum({"outputs": entry.outputs, "ui": entry.ui})
        finally:
            self._lifecycle("end", result.prompt_id, result)
            # Deferred mode: the store tasks exist only now, so each runs its first step as the loop shuts down
            # and asyncio.run cancels it if it awaited anything, as seen in a real ComfyUI.
            for context, value, node_id in deferred:
                tasks.append(asyncio.create_task(self._safe_store(context, value, node_id, result)))

    def _execute(self, prompt: Mapping[str, Mapping[str, Any]], node_id: str, values: dict[str, CacheEntry],
                 record: NodeRecord) -> Optional[CacheEntry]:
        node = prompt[node_id]
        cls = self.mappings[node["class_type"]]
        kwargs = {}
        for name, v in node["inputs"].items():
            kwargs[name] = values[v[0]].outputs[v[1]][0] if is_link(v) else v
        t0 = time.perf_counter()
        try:
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        except Exception as e:
            log.warning("node %s (%s) failed: %s", node_id, node["class_type"], e)
            record.status = "failed"
            return None
        finally:
            record.exec_s = time.perf_counter() - t0
        record.status = "executed"
        ui = None
        if isinstance(out, dict):
            if "ui" in out:
                ui = {"output": out["ui"], "meta": {"node_id": node_id, "display_node": node_id}}
            out = out.get("result", ())
        return CacheEntry(ui=ui, outputs=[[v] for v in out])

    async def _get(self, prompt: Mapping[str, Any], node_id: str, key: Any, result: PromptResult,
                   from_provider: set[str]) -> Optional[CacheEntry]:
        """caches.outputs.get: the local cache, then the providers on a local miss."""
        if key in self.cache:
            return self.cache[key]
        if self.provider is None or API._contains_self_unequal(key):
            return None
        context = self._context(prompt, node_id, key, result)
        if context is None:
            return None
        record = result.nodes[node_id]
        t0 = time.perf_counter()
        try:
            if not self.provider.should_cache(context):
                return None
            record.lookups += 1
            result.provider_lookups += 1
            hit = await self.provider.on_lookup(context)
            if hit is None:
                return None
            if not isinstance(hit, CacheValue):
                log.warning("Provider %s returned invalid type", type(self.provider).__name__)
                result.errors.append(f"lookup {node_id}: invalid type {type(hit).__name__}")
                return None
            if not isinstance(hit.outputs, (list, tuple)):
                log.warning("Provider %s returned invalid outputs", type(self.provider).__name__)
                result.errors.append(f"lookup {node_id}: invalid outputs {type(hit.outputs).__name__}")
                return None
            entry = CacheEntry(ui=hit.ui, outputs=list(hit.outputs))
            self.cache[key] = entry
            from_provider.add(node_id)
            return entry
        except Exception as e:
            log.warning("Cache provider %s error on lookup: %s", type(self.provider).__name__, e)
            result.errors.append(f"lookup {node_id}: {e!r}")
            return None
        finally:
            record.provider_s += time.perf_counter() - t0

    async def _notify_store(self, prompt: Mapping[str, Any], node_id: str, key: Any, entry: CacheEntry,
                            result: PromptResult, tasks: list[asyncio.Task[None]],
                            deferred: list[tuple[CacheContext, CacheValue, str]]) -> None:
        if self.provider is None or API._contains_self_unequal(key):
            return
        context = self._context(prompt, node_id, key, result)
        if context is None:
            return
        value = CacheValue(outputs=entry.outputs, ui=entry.ui)
        record = result.nodes[node_id]
        t0 = time.perf_counter()
        try:
            if self.provider.should_cache(context, value):
                if self.store_tasks == "immediate":
                    tasks.append(asyncio.create_task(self._safe_store(context, value, node_id, result)))
                else:
                    deferred.append((context, value, node_id))
        except Exception as e:
            log.warning("Cache provider %s error on store: %s", type(self.provider).__name__, e)
            result.errors.append(f"should_cache {node_id}: {e!r}")
        finally:
            record.provider_s += time.perf_counter() - t0

    async def _safe_store(self, context: CacheContext, value: CacheValue, node_id: str, result: PromptResult) -> None:
        t0 = time.perf_counter()
        try:
            await self.provider.on_store(context, value)
        except Exception as e:
            log.warning("Cache provider %s async store error: %s", type(self.provider).__name__, e)
            result.errors.append(f"store {node_id}: {e!r}")
        finally:
            result.nodes[node_id].provider_s += time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ the ComfyUI-like process


def provider_config(args: argparse.Namespace) -> Any:
    from provider.config import ProviderConfig

    return ProviderConfig(
        mode=args.mode, node=args.node, listen=args.listen, node_id=args.node_id,
        seeds=tuple(s for s in args.seeds.split(",") if s), secret=args.secret, replicas=args.replicas,
        max_memory=args.max_memory, min_free_ram=0, namespace=args.namespace,
        allow=tuple(s for s in args.allow.split(",") if s), deny=tuple(s for s in args.deny.split(",") if s),
        cache_output_nodes=args.cache_output_nodes, max_value_size=args.max_value_size,
        lookup_timeout=args.lookup_timeout, store_timeout=args.store_timeout, store_queue=args.store_queue,
        direct=not args.no_direct, fast_keys=args.fast_keys, warm_memory=args.warm_memory,
        identity=not args.no_identity, identity_cache=args.identity_cache, eviction=args.eviction,
        store_cheap=args.store_cheap,
        dedupe=not args.no_dedupe, dedupe_max_wait=args.dedupe_max_wait,
    )


def start_runtime(args: argparse.Namespace, base: type | None = None) -> Any:
    from provider import runtime

    global FOLDER_PATHS
    if args.models:
        FOLDER_PATHS = fake_folder_paths(Path(args.models))
        load_custom_nodes(Path(args.models) / "custom_nodes")
    # As in ComfyUI: the provider sees the key functions' module (the identity hook and the fast keys install
    # there), the model folders and the node classes with their packs.
    started = runtime.start(provider_config(args), cache_value=CacheValue, traits=traits_lookup(),
                            comfy_version=COMFY_VERSION, base=base, api=API, folder_paths=FOLDER_PATHS,
                            nodes=fake_nodes_module())
    if args.store_delay > 0:
        encode = started.bridge.encode

        def slow_encode(tree: Any, meta: Any) -> Any:
            time.sleep(args.store_delay)
            return encode(tree, meta)

        started.bridge.encode = slow_encode
    return started


def parser() -> argparse.ArgumentParser:
    from mesh.units import parse_size

    p = argparse.ArgumentParser(prog="python -m tests.support.comfy_harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("embedded", "sidecar"), default="embedded")
    p.add_argument("--node", default="127.0.0.1:8288", help="sidecar address")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--node-id", default="")
    p.add_argument("--seeds", default="")
    p.add_argument("--secret", default="")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-memory", type=parse_size, default=parse_size("1GiB"))
    p.add_argument("--warm-memory", type=parse_size, default=parse_size("256MiB"),
                   help="memory kept touched for the next hits (MESH_WARM_MEMORY)")
    p.add_argument("--namespace", default="")
    p.add_argument("--allow", default="")
    p.add_argument("--deny", default="")
    p.add_argument("--cache-output-nodes", action="store_true")
    p.add_argument("--max-value-size", type=parse_size, default=parse_size("1GiB"))
    p.add_argument("--lookup-timeout", type=float, default=3.0)
    p.add_argument("--store-timeout", type=float, default=60.0)
    p.add_argument("--store-queue", type=int, default=64)
    p.add_argument("--no-direct", action="store_true")
    p.add_argument("--fast-keys", action="store_true", help="install provider/fastkeys.py, as in a real ComfyUI")
    p.add_argument("--no-provider", action="store_true", help="a ComfyUI without any provider")
    p.add_argument("--models", default="", help="this ComfyUI's base folder: model folders and custom_nodes/")
    p.add_argument("--no-identity", action="store_true", help="MESH_IDENTITY=0: keys by names alone")
    p.add_argument("--identity-cache", default="", help="MESH_IDENTITY_CACHE: where file identities are kept")
    p.add_argument("--store-tasks", choices=("deferred", "immediate"), default="deferred",
                   help="immediate: store tasks are created as each node finishes and run when the loop next "
                        "yields (ComfyUI 0.21's code); deferred: only as the prompt's loop shuts down")
    p.add_argument("--eviction", choices=("cost", "lru"), default="cost", help="MESH_EVICTION of the embedded node")
    p.add_argument("--store-cheap", action=argparse.BooleanOptionalAction, default=True,
                   help="MESH_STORE_CHEAP: store values cheaper to compute than to fetch too (the harness's default, "
                        "so tests see every small value shared; --no-store-cheap is the provider's default)")
    p.add_argument("--no-dedupe", action="store_true", help="MESH_DEDUPE=0")
    p.add_argument("--dedupe-max-wait", type=float, default=60.0, help="MESH_DEDUPE_MAX_WAIT")
    p.add_argument("--store-delay", type=float, default=0.0,
                   help="seconds every store waits on the provider's store thread before encoding (a slow store)")
    p.add_argument("--serve", action="store_true", help="JSON commands on stdin, JSON replies on stdout")
    p.add_argument("--workflow", default="standard", choices=sorted(WORKFLOWS))
    p.add_argument("--seed", type=int, action="append", help="run the workflow with this seed (repeatable)")
    p.add_argument("--prompt-file", help="a JSON file: one API-format prompt, or a list of them")
    p.add_argument("--flush", type=float, default=30.0, help="one-shot: seconds to wait for stores before exit")
    p.add_argument("--log-level", default="WARNING")
    return p


class Process:
    """The state of one ComfyUI-like process: a runtime (or none) and an engine."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            self.runtime = None if args.no_provider else start_runtime(args)
        except ValueError as e:  # as provider/__init__.py: a setting that cannot work; "ComfyUI" runs without it
            log.error("comfy-mesh: not started: %s", e)
            self.runtime = None
        self.engine = Engine(self.runtime.provider if self.runtime else None, store_tasks=args.store_tasks)

    def ready(self) -> dict[str, Any]:
        node = self.runtime.node if self.runtime else None
        return {"event": "ready", "pid": os.getpid(), "address": node.address if node else None,
                "node_id": node.node_id if node else None,
                "namespace": self.runtime.provider.namespace if self.runtime else None}

    def run(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        prompt = build_prompt(spec)
        return self.engine.run(prompt, spec.get("prompt_id")).to_json()

    def stats(self) -> dict[str, Any]:
        if self.runtime is None:
            return {}
        out: dict[str, Any] = {"provider": self.runtime.provider.stats(),
                               "prompt": {k: v for k, v in self.runtime.provider.prompt.__dict__.items()
                                          if k != "known_misses"}}
        node = self.runtime.node
        if node is not None and node.cluster is not None:
            out["node"] = {"address": node.address, "node_id": node.node_id, "entries": len(node.store),
                           "near_entries": len(node.near), **node.cluster.stats()}
        return out

    def members(self) -> list[dict[str, Any]]:
        node = self.runtime.node if self.runtime else None
        if node is None or node.cluster is None:
            return []
        from mesh.pb import mesh_pb2 as pb

        return [{"node_id": m.node_id, "address": m.address, "state": pb.MemberState.Name(m.state)}
                for m in node.membership.members_pb()]

    def contexts(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        ctxs = self.engine.contexts(build_prompt(spec))
        key = self.runtime.provider.key if self.runtime else (lambda c: None)
        return {nid: (None if c is None else {**c.__dict__, "key": key(c)}) for nid, c in ctxs.items()}

    def flush(self, timeout: float) -> bool:
        return self.runtime.bridge.flush(timeout) if self.runtime else True

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()

    def handle(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        name = cmd.get("cmd")
        if name == "run":
            return {"result": self.run(cmd)}
        if name == "flush":
            return {"flushed": self.flush(float(cmd.get("timeout", 30.0)))}
        if name == "stats":
            return {"stats": self.stats()}
        if name == "members":
            return {"members": self.members()}
        if name == "contexts":
            return {"contexts": self.contexts(cmd)}
        if name == "ping":
            return {"pong": True}
        raise ValueError(f"unknown command {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    out = sys.stdout
    sys.stdout = sys.stderr  # the protocol owns stdout; stray prints go to stderr

    def emit(obj: Any) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    proc = Process(args)
    try:
        if args.serve:
            emit(proc.ready())
            for line in sys.stdin:
                line = line.strip()
                if not line:
                    continue
                cmd = json.loads(line)
                if cmd.get("cmd") == "quit":
                    emit({"bye": True})
                    break
                try:
                    emit({"ok": True, **proc.handle(cmd)})
                except Exception as e:  # a bad command must not kill the process the test talks to
                    log.exception("command failed")
                    emit({"ok": False, "error": repr(e)})
            return 0
        specs: list[dict[str, Any]]
        if args.prompt_file:
            loaded = json.loads(Path(args.prompt_file).read_text())
            specs = [{"prompt": p} for p in (loaded if isinstance(loaded, list) else [loaded])]
        else:
            specs = [{"workflow": args.workflow, "seed": s} for s in (args.seed or [1])]
        results = [proc.run(spec) for spec in specs]
        flushed = proc.flush(args.flush)
        emit({**proc.ready(), "event": "done", "results": results, "flushed": flushed, "stats": proc.stats()})
        return 0
    finally:
        proc.close()


# ------------------------------------------------------------------------- driving such a process from a test


class HarnessProcess:
    """A `python -m tests.support.comfy_harness --serve` subprocess; every wait is bounded; kill() in a finally."""

    def __init__(self, args: Sequence[str], *, ready_timeout: float = 30.0, log_path: Path | None = None,
                 env: Mapping[str, str] | None = None, wrap: Sequence[str] = ()) -> None:
        """`wrap` prefixes the command, e.g. `ip netns exec NS` to run it on another (namespace) host."""
        argv = [*wrap, sys.executable, "-m", "tests.support.comfy_harness", "--serve", *args]
        self.log_path = log_path
        stderr = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, env={**os.environ, **(env or {})})
        finally:
            if log_path:
                stderr.close()  # type: ignore[union-attr]
        self._lines: queue.Queue[Optional[bytes]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.info = self._next(ready_timeout)
        except BaseException:
            self.kill()
            raise
        self.address: Optional[str] = self.info.get("address")
        self.node_id: Optional[str] = self.info.get("node_id")
        self.namespace: Optional[str] = self.info.get("namespace")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"harness process gave no answer in {timeout} s{self._log_tail()}") from None
        if line is None:
            raise RuntimeError(f"harness process exited ({self.process.poll()}){self._log_tail()}")
        return json.loads(line)

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return "; log:\n" + self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def call(self, cmd: Mapping[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())
        self.process.stdin.flush()
        reply = self._next(timeout)
        if not reply.get("ok", True):
            raise RuntimeError(f"harness command {cmd.get('cmd')} failed: {reply.get('error')}{self._log_tail()}")
        return reply

    def run(self, timeout: float = 60.0, **spec: Any) -> dict[str, Any]:
        return self.call({"cmd": "run", **spec}, timeout)["result"]

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.call({"cmd": "stats"}, timeout)["stats"]

    def alive_members(self, timeout: float = 10.0) -> int:
        return sum(1 for m in self.call({"cmd": "members"}, timeout)["members"] if m["state"] == "ALIVE")

    def wait_members(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            seen = self.alive_members()
            if seen == count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node_id} sees {seen} alive members, wanted {count}")
            time.sleep(0.1)

    def flush(self, timeout: float = 30.0) -> bool:
        return bool(self.call({"cmd": "flush", "timeout": timeout}, timeout + 5)["flushed"])

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def quit(self, timeout: float = 10.0) -> None:
        if not self.alive:
            return
        try:
            self.call({"cmd": "quit"}, timeout)
            self.process.wait(timeout=timeout)
        except Exception:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for f in (self.process.stdin, self.process.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())


def b_is_served_what_a_computed(a: HarnessProcess, b: HarnessProcess, seed: int) -> tuple[dict, dict]:
    """A runs the standard workflow and stores its outputs; then B runs it: every shared node must come from
    the mesh, bit-exactly (dtype, shape and sha256 of every tensor, exact scalars). Returns both results."""
    ra = a.run(workflow="standard", seed=seed)
    assert ra["errors"] == [] and a.flush(30)
    rb = b.run(workflow="standard", seed=seed)
    assert rb["errors"] == [] and set(rb["provider_hits"]) == set(STANDARD_SHARED)
    assert {n: rb["outputs"][n] for n in STANDARD_SHARED} == {n: ra["outputs"][n] for n in STANDARD_SHARED}
    return ra, rb
