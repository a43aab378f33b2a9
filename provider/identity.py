"""The identity of a computation: what a cache key must carry beyond ComfyUI's digest, so a hit is never wrong.

ComfyUI's key for a node is its input signature and its ancestors': class types and inputs as typed. Two hosts
that both have `upscale_models/tiny2x.safetensors`, with different weights, produce equal keys and different
images; so do two versions of one custom-node pack. A mesh key is therefore ComfyUI's digest *and* this
identity: the content identity (filehash.py) of every model file a string of the key names (models.py, which
covers every ancestor, since their signatures are part of the key) and the code identity of every custom-node
pack whose class appears in it (packs.py). Byte-identical files and code give equal identities on every host,
so those hosts still share; anything else gives a different key, so they never do.

Where the key object is seen: a provider is handed only `cache_key_hash`. ComfyUI makes that digest by calling
`comfy_execution.cache_provider._serialize_cache_key(key)` right before each provider call, so this module wraps
that function (after the fast keys, fastkeys.py, when they are installed): it returns the digest unchanged and
remembers the digest's identity for the calls that follow. A digest whose identity was not seen, or that
depends on a file still being hashed or a pack that cannot be read, is not shared at all (`of()` says so and the
provider answers a miss and stores nothing): never under the bare name.

What a key cannot carry is caught where ComfyUI opens files: `watch()` wraps `folder_paths.get_full_path` and the
tokenizer's `load_embed`, so a node that opens a model file its key does not name (a name another node built)
is seen; nothing of that prompt is stored, and its class is not shared by this process again. A file changed
under a running ComfyUI (which keeps what it loaded, by name) is not shared until a restart.

An identity is worked out once per digest per prompt (files can change between prompts; a prompt asks for the
same digest three times), so a prompt's cost is one walk of each key plus one stat per model file it names.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .filehash import FileHashes, Stamp
from .models import ModelFolders
from .packs import PackIdentities

log = logging.getLogger("comfy_mesh")

MAX_REMEMBERED = 65536   # digests whose identity is kept (a prompt of thousands of nodes fits many times)
MAX_DESCRIPTION = 4096   # bytes of the identity written into a value's meta


@dataclass(frozen=True)
class Identity:
    """What a key depends on beyond its names. `parts` are sorted "label=identity" strings."""

    parts: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()     # model files whose identity is not known yet (being hashed)
    unknown: tuple[str, ...] = ()     # what cannot be identified at all (an unreadable file or pack)
    suffix: str = field(default="", compare=False)
    paths: tuple[str, ...] = field(default=(), compare=False)  # the model files, checked again at store time
    classes: frozenset[str] = field(default=frozenset(), compare=False)  # the node classes in the key

    @classmethod
    def of(cls, parts: set[str], pending: set[str], unknown: set[str], paths: set[str] = frozenset(),
           classes: frozenset[str] = frozenset()) -> Identity:
        ordered = tuple(sorted(parts))
        suffix = xxhash.xxh3_128("\n".join(ordered).encode()).hexdigest() if ordered else ""
        return cls(ordered, tuple(sorted(pending)), tuple(sorted(unknown)), suffix, tuple(sorted(paths)), classes)

    @property
    def shareable(self) -> bool:
        return not self.pending and not self.unknown

    def describe(self) -> str:
        text = "; ".join(self.parts) if self.parts else "comfyui"
        return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION - 1] + "…"


@dataclass
class IdentityCounters:
    keys: int = 0                  # identities worked out (once per digest per prompt)
    with_files: int = 0            # of those, keys that name at least one model file
    with_packs: int = 0            # of those, keys holding a custom-node class
    failed: int = 0                # keys that could not be walked (counted, never shared)


class KeyIdentities:
    """Wraps ComfyUI's `_serialize_cache_key` to learn each digest's identity; `of(digest)` answers for it."""

    def __init__(self, models: ModelFolders, files: FileHashes, packs: PackIdentities,
                 class_types: Mapping[str, Any]) -> None:
        self.models = models
        self.files = files
        self.packs = packs
        self.class_types = class_types  # ComfyUI's NODE_CLASS_MAPPINGS (live: packs load after the provider)
        self.counters = IdentityCounters()
        self.installed = False
        self._api: Any = None
        self._inner: Callable[[Any], str | None] | None = None
        self._lock = threading.Lock()
        self._generation = 0
        self._by_digest: OrderedDict[str, tuple[int, Identity]] = OrderedDict()
        self._file_memo: dict[str, str | None] = {}       # path -> identity this prompt (None: pending)
        self._first: dict[str, Stamp] = {}                # path -> its stamp when this process first met it
        self._changed: set[str] = set()                   # paths changed since then: not shared until restart
        # the node about to run: its identity, class and the thread that runs it (ComfyUI's prompt worker)
        self._running: tuple[Identity | None, str, int] | None = None
        self._tainted: set[str] = set()                   # classes seen opening a file their key did not name
        self._prompt_tainted = False                      # this prompt opened such a file: none of it is stored
        self._undo: list[tuple[Any, str, Any, Any]] = []  # what watch() wrapped
        self._names: dict[str, Any] = {}                  # key string -> what it names, this prompt (_named_by)
        self._names_nothing: set[str] = set()             # key strings that name nothing, this prompt

    # -- installing ------------------------------------------------------------------------------------------

    def install(self, api: Any) -> bool:
        inner = getattr(api, "_serialize_cache_key", None)
        if not callable(inner):
            log.warning("comfy-mesh: this ComfyUI has no _serialize_cache_key, so the models and code behind a "
                        "cache key cannot be seen: nothing is shared (MESH_IDENTITY=0 shares by names alone)")
            return False
        self._api, self._inner = api, inner
        api._serialize_cache_key = self.serialize
        self.installed = True
        return True

    def uninstall(self) -> None:
        if self.installed and self._api is not None:
            if self._api._serialize_cache_key == self.serialize:
                self._api._serialize_cache_key = self._inner
            self.installed = False

    # -- the hook ------------------------------------------------------------------------------------------------

    def serialize(self, cache_key: Any) -> str | None:
        inner = self._inner
        assert inner is not None
        digest = inner(cache_key)
        if digest is None or not self.installed:
            return digest
        with self._lock:
            seen = self._by_digest.get(digest)
            if seen is not None and seen[0] == self._generation:
                return digest
            generation = self._generation
        try:
            identity = self.identify(cache_key)
        except Exception as e:  # never break ComfyUI's key; such a key is simply not shared
            self.counters.failed += 1
            log.debug("cannot work out the identity of a key: %r", e)
            identity = Identity.of(set(), set(), {"the key itself"})
        with self._lock:
            self._by_digest[digest] = (generation, identity)
            self._by_digest.move_to_end(digest)
            while len(self._by_digest) > MAX_REMEMBERED:
                self._by_digest.popitem(last=False)
        return digest

    def of(self, digest: str) -> Identity | None:
        """The identity the key with this digest was seen with; None when it never passed the hook."""
        with self._lock:
            seen = self._by_digest.get(digest)
        return None if seen is None else seen[1]

    # -- working an identity out -------------------------------------------------------------------------------

    def identify(self, cache_key: Any) -> Identity:
        parts: set[str] = set()
        pending: set[str] = set()
        unknown: set[str] = set()
        paths: set[str] = set()
        files = packs = False
        every = strings_in(cache_key)
        classes = frozenset(every & self.class_types.keys())
        if self._tainted and classes & self._tainted:
            unknown.update(f"class {c} opens model files by computed names" for c in classes & self._tainted)
        with self._lock:
            texts = every - self._names_nothing  # most strings name nothing: one set difference
        for text in texts:
            named = self._names.get(text)
            if named is None:
                named = self._names[text] = self._named_by(text)
                if not named:
                    with self._lock:
                        self._names_nothing.add(text)
            if not named:
                continue
            files_here, pack = named
            for label, path in files_here:
                files = True
                paths.add(path)
                found = self._file_identity(path)
                if found is None:
                    pending.add(label)
                elif found == "":
                    unknown.add(label)
                else:
                    parts.add(f"{label}=xxh3:{found}")
            if pack is None:
                unknown.add(f"class {text}")
            elif pack:
                packs = True
                parts.add(f"pack:{pack}")
        self.counters.keys += 1
        self.counters.with_files += files
        self.counters.with_packs += packs
        return Identity.of(parts, pending, unknown, paths, classes)

    def _named_by(self, text: str) -> tuple[list[tuple[str, str]], str | None] | tuple[()]:
        """What one string of a key names: model files (label, path) and, for a class type, its pack identity
        ("" for ComfyUI's own); () for a string that names nothing. Remembered for the prompt."""
        files_here = self.models.files_named(text) + self.models.embeddings_in(text)
        pack: str | None = ""
        if text in self.class_types:
            pack = self.packs.of_class(text)
        return (files_here, pack) if files_here or pack != "" else ()

    def _file_identity(self, path: str) -> str | None:
        """The file's identity, None while it is being hashed, "" if it cannot be read or changed since this
        process first met it; one stat per prompt."""
        with self._lock:
            if path in self._file_memo:
                return self._file_memo[path]
        try:
            stamp = Stamp.of(path)
        except OSError:
            found: str | None = ""
        else:
            found = "" if self._changed_since_first(path, stamp) else self.files.identity(path, stamp)
        with self._lock:
            self._file_memo[path] = found
        return found

    def _changed_since_first(self, path: str, stamp: Stamp) -> bool:
        """Whether the file is other than when this process first met it. ComfyUI keeps a loaded model by its
        name, so after a file is replaced under a running ComfyUI its results may come from either version:
        nothing that depends on it is shared until a restart (logged once)."""
        with self._lock:
            first = self._first.setdefault(path, stamp)
            if first == stamp:
                return False
            new = path not in self._changed
            self._changed.add(path)
        if new:
            log.warning("comfy-mesh: %s changed while ComfyUI runs (it may still use the version it loaded): "
                        "values that depend on it are not shared until ComfyUI restarts", path)
        return True

    # -- files the running node opens -----------------------------------------------------------------------------

    def running(self, identity: Identity | None, class_type: str) -> None:
        """The node ComfyUI is about to run, by the identity its key was seen with (its lookup right before it
        runs; the prompt-start lookups come before any node runs, so the last lookup is always the running
        node's)."""
        self._running = (identity, class_type, threading.get_ident())

    def opened(self, path: str) -> None:
        """ComfyUI resolved a model file for the running node (folder_paths.get_full_path, load_embed). A file its
        key does not name came from a computed name (a string built by another node, a name selector): its key
        cannot carry the file's identity. Nothing of this prompt is stored, and no key holding that class is
        shared by this process from now on (it may keep the loaded model by that class's inputs)."""
        running = self._running
        if running is None or running[2] != threading.get_ident():
            return  # no node runs (keys being built) or another thread (the server validating a prompt)
        identity, class_type, _ = running
        if identity is not None and path in identity.paths:
            return
        with self._lock:
            self._prompt_tainted = True
            new = class_type not in self._tainted
            self._tainted.add(class_type)
        if new:
            log.warning("comfy-mesh: %s opened %s, which its cache key does not name (a name computed by another "
                        "node?): values with %s in their key are not shared by this ComfyUI until it restarts",
                        class_type, path, class_type)

    def unchanged(self, identity: Identity) -> bool:
        """At store time: every model file the value's key named is still the one this process first met (a
        file replaced during the prompt leaves the stored value's weights unknown), and no node of the prompt
        opened a file by a name its key does not hold."""
        if self._prompt_tainted or (identity.classes & self._tainted):
            return False
        for path in identity.paths:
            try:
                stamp = Stamp.of(path)
            except OSError:
                return False
            if self._changed_since_first(path, stamp):
                return False
        return True

    # -- prompt life ----------------------------------------------------------------------------------------------

    def on_prompt_start(self) -> None:
        """Files may have changed since the last prompt: every identity is worked out again once."""
        with self._lock:
            self._generation += 1
            self._file_memo.clear()
            self._names = {}
            self._names_nothing = set()
            self._running = None
            self._prompt_tainted = False

    def watch(self, folder_paths: Any) -> None:
        """Hear of every model file ComfyUI resolves for a running node: its `folder_paths.get_full_path` (every
        loader of a model folder) and `comfy.sd1_clip.load_embed` (embeddings), each wrapped, never changed."""
        if folder_paths is not None and callable(getattr(folder_paths, "get_full_path", None)):
            resolve = folder_paths.get_full_path

            def get_full_path(folder_name: str, filename: str) -> Any:
                path = resolve(folder_name, filename)
                if path is not None:
                    self._heard(path)
                return path

            folder_paths.get_full_path = get_full_path
            self._undo.append((folder_paths, "get_full_path", get_full_path, resolve))
        sd1 = sys.modules.get("comfy.sd1_clip")
        if sd1 is not None and callable(getattr(sd1, "load_embed", None)):
            load = sd1.load_embed

            def load_embed(embedding_name: str, *args: Any, **kwargs: Any) -> Any:
                for _, path in self.models.embeddings_in(f"embedding:{embedding_name}"):
                    self._heard(path)
                return load(embedding_name, *args, **kwargs)

            sd1.load_embed = load_embed
            self._undo.append((sd1, "load_embed", load_embed, load))

    def _heard(self, path: str) -> None:
        try:
            self.opened(path)
        except Exception:  # never in ComfyUI's way
            log.debug("watching an opened file failed", exc_info=True)

    def stats(self) -> dict[str, float]:
        out = {f"provider_identity_{k}": float(v) for k, v in self.counters.__dict__.items()}
        out["provider_identity_installed"] = float(self.installed)
        out.update(self.files.stats())
        return out

    def close(self) -> None:
        self.uninstall()
        for owner, name, ours, original in self._undo:
            if getattr(owner, name, None) is ours:
                setattr(owner, name, original)
        self._undo.clear()
        self.files.close()
        self.models.close()


def strings_in(obj: Any) -> set[str]:
    """Every string anywhere in a key (ComfyUI keys are frozensets, tuples, lists, dicts and scalars).

    A loop over each container's items that pushes only containers: about twice as fast as popping every item,
    and this runs for every node of every prompt (a 30-node chain's keys hold some 5,000 objects)."""
    if isinstance(obj, str):
        return {str(obj)}
    if not isinstance(obj, (tuple, frozenset, list, set, dict)):
        return set()
    found: set[str] = set()
    stack: list[Any] = [tuple(obj.items()) if isinstance(obj, dict) else obj]
    push = stack.append
    while stack:
        for item in stack.pop():
            t = type(item)
            if t is str:
                found.add(item)
            elif t is tuple or t is frozenset:
                push(item)
            elif t is int or t is bool or t is float or item is None:
                continue
            elif t is list or t is set:
                push(item)
            elif t is dict:
                push(tuple(item.items()))
            elif isinstance(item, str):
                found.add(str(item))
            elif isinstance(item, dict):
                push(tuple(item.items()))
            elif isinstance(item, (tuple, frozenset, list, set)):
                push(item)
    return found
