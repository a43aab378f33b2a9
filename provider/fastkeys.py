"""ComfyUI's cache-key digest, byte-identical to ComfyUI's own, computed once per key per prompt and faster.

Why: with any provider registered, ComfyUI builds a context for every provider call (lookup at prompt start,
lookup before the node runs, store) with `comfy_execution.cache_provider._serialize_cache_key(key)`. That
canonicalises the node's whole signature (its own inputs and every ancestor's), sorting each set and dict by
`json.dumps` of every element, at every level, and then SHA-256s the JSON: about 0.1 ms for a node without
ancestors, about 3 ms with 29, three times per node, with the same key object each time. It also walks the key
again each time in `_contains_self_unequal`. That cost dwarfs the provider's own.

What this does, and why it is safe:
- The same digest, faster. Each element's canonical JSON is built once, bottom up, and sorted by; ComfyUI
  serialises every element again for every comparison key, at every level (see `_canon` for why the order is
  the same although ComfyUI sorts by the spaced form). The bytes hashed are the same bytes.
- `_contains_self_unequal` likewise walks a key once, skipping the self-comparisons whose answer is known
  for builtin types, and hands anything else to ComfyUI's function (see `contains_self_unequal`).
- Once per key per prompt. Both functions remember their answer for a key object (by identity, holding the
  object so its id cannot be reused) until the prompt ends; only immutable top-level keys (frozenset, tuple)
  are remembered. The memory is bounded.
- Installed only where it is known to be right. `install` checks that the functions it replaces are there
  with the expected signatures, and that its digests equal theirs on reference keys covering every type
  (and that it refuses what they refuse); otherwise it leaves ComfyUI untouched and logs one line. Then, the
  first keys of every prompt and a fraction of the rest are also hashed the original way; any difference turns
  the acceleration off for good (ComfyUI's functions are put back), logs one warning and is counted.
- `MESH_FAST_KEYS=0` turns it off.

The change ComfyUI itself could make: compute `cache_key_hash` once per node per prompt (e.g. next to the key
in its key set) and pass it to every provider call, instead of re-serialising in `_build_context`.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
import threading
from collections.abc import Callable
from hashlib import sha256
from typing import Any

log = logging.getLogger("comfy_mesh")

_encode_str: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_SCALARS = (int, float, str, bool, type(None))
MAX_MEMO = 16384
FIRST_CHECKED = 1          # keys of every prompt hashed both ways
CHECK_FRACTION = 0.02      # and this share of the rest


def _scalar(obj: Any) -> str:
    """`json.dumps(obj)` for a scalar, as the json module writes it (subclasses included)."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return _encode_str(obj)
    if isinstance(obj, int):
        return int.__repr__(obj)
    if math.isnan(obj):
        return "NaN"
    if math.isinf(obj):
        return "Infinity" if obj > 0 else "-Infinity"
    return float.__repr__(obj)


def _canon(obj: Any) -> str:
    t = type(obj)  # the common exact types first; subclasses take the general path, in ComfyUI's order
    if t is str:
        return '["str",' + _encode_str(obj) + "]"
    if t is tuple:
        if len(obj) == 2:  # what to_hashable makes most: (index or name, value) pairs
            return '["__tuple__",[' + _canon(obj[0]) + "," + _canon(obj[1]) + "]]"
        return '["__tuple__",[' + ",".join([_canon(i) for i in obj]) + "]]"
    if t is int:
        return '["int",' + int.__repr__(obj) + "]"
    if t is frozenset:
        return '["__frozenset__",[' + ",".join(sorted([_canon(i) for i in obj])) + "]]"
    return _canon_general(obj)


def _canon_general(obj: Any) -> str:
    """The compact JSON of ComfyUI's canonical form of `obj`, each element's built once, bottom up.

    ComfyUI sorts set and dict elements by `json.dumps(x, sort_keys=True)` of each, with the default separators
    (", " and ": "), and dumps the whole compactly. Sorting by the compact strings gives the same order: the
    spaced string is the compact one with a space after every separator outside a string literal, and two
    strings that agree up to a position agree on which of their commas there are separators (a quote inside a
    literal is always escaped), so their first difference is the same pair of characters either way. The
    property tests check this against ComfyUI itself.
    """
    if isinstance(obj, (frozenset, set)):
        items = sorted([_canon(i) for i in obj])
        return ('["__frozenset__",[' if isinstance(obj, frozenset) else '["__set__",[') + ",".join(items) + "]]"
    if isinstance(obj, tuple):
        return '["__tuple__",[' + ",".join([_canon(i) for i in obj]) + "]]"
    if isinstance(obj, list):
        return "[" + ",".join([_canon(i) for i in obj]) + "]"
    if isinstance(obj, dict):
        pairs = sorted(["[" + _canon(k) + "," + _canon(v) + "]" for k, v in obj.items()])
        return '{"__dict__":[' + ",".join(pairs) + "]}"
    if isinstance(obj, _SCALARS):
        return "[" + _encode_str(type(obj).__name__) + "," + _scalar(obj) + "]"
    if isinstance(obj, bytes):
        return '["__bytes__","' + obj.hex() + '"]'
    raise ValueError(f"Cannot canonicalize type: {type(obj).__name__}")


_PLAIN = (str, int, bool, bytes, type(None))


def contains_self_unequal(obj: Any, original: Callable[[Any], bool]) -> bool:
    """ComfyUI's `_contains_self_unequal(obj)`, without its cost on the builtin types keys are made of.

    ComfyUI compares every level with itself (`obj == obj`) before walking into it: for a frozenset that is a
    pass over all its elements, at every level of the key. For the exact builtin types the answer is known:
    a str, int, bool, bytes or None equals itself and has no `value`; a float does unless it is NaN; a tuple,
    list, set, frozenset or dict equals itself (CPython compares their elements by identity first), so only
    its elements matter. Any other object (a subclass, ComfyUI's Unhashable) goes to ComfyUI's own function.
    """
    t = type(obj)
    if t in _PLAIN:
        return False
    if t is float:
        return obj != obj
    if t is tuple or t is frozenset or t is list or t is set:
        for item in obj:
            if contains_self_unequal(item, original):
                return True
        return False
    if t is dict:
        for k, v in obj.items():
            if contains_self_unequal(k, original) or contains_self_unequal(v, original):
                return True
        return False
    return original(obj)


def digest(cache_key: Any) -> str:
    """The SHA-256 hex digest ComfyUI's `_serialize_cache_key` gives; raises where it would return None."""
    return sha256(_canon(cache_key).encode("utf-8")).hexdigest()


def reference_keys() -> list[Any]:
    """Keys covering every type and every ordering subtlety, for the check before installing."""
    return [
        frozenset({("seed", 5), ("cfg", 7.5), ("text", "a cat, ünïcode ✓"), ("flag", True), ("none", None)}),
        frozenset({(0, frozenset({("image", ("node", 3)), ("strength", -0.0)})), (1, ("x", b"\x00\xff"))}),
        (frozenset({1, 2, 3}), [1, [2, 3]], {"b": 1, "a": {2.5: [None, False]}}, {1, -1}),
        frozenset({1e300, -1e-300, 2**70, -(2**70), 0}),
        {"z": frozenset(), "y": (), "x": [], "w": {}, "v": set()},
        frozenset({("\"quote\\ and\nnewline", "\t"), ("", "")}),
    ]


class _Memo:
    """Answers per key object for one prompt: by identity, holding the object (its id cannot be reused)."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[Any, Any]] = {}

    def get(self, key: Any) -> tuple[bool, Any]:
        item = self._items.get(id(key))
        if item is not None and item[0] is key:
            return True, item[1]
        return False, None

    def put(self, key: Any, value: Any) -> None:
        if type(key) not in (frozenset, tuple):
            return  # only immutable keys: a list or dict could change between calls
        try:
            hash(key)  # a tuple holding a list is not immutable either
        except TypeError:
            return
        if len(self._items) >= MAX_MEMO:
            self._items.clear()
        self._items[id(key)] = (key, value)

    def clear(self) -> None:
        self._items.clear()


class FastKeys:
    """Replaces `_serialize_cache_key` and `_contains_self_unequal` in ComfyUI's cache_provider module."""

    def __init__(self, api: Any, check_fraction: float = CHECK_FRACTION, first_checked: int = FIRST_CHECKED) -> None:
        self.api = api
        self.check_fraction = check_fraction
        self.first_checked = first_checked
        self.original_serialize: Callable[[Any], str | None] | None = None
        self.original_unequal: Callable[[Any], bool] | None = None
        self.installed = False
        self._lock = threading.Lock()
        self._digests = _Memo()
        self._unequal = _Memo()
        self._checked_this_prompt = 0
        self.counters = {"computed": 0, "remembered": 0, "verified": 0, "mismatches": 0}

    # -- installing ----------------------------------------------------------------------------------------

    def install(self) -> bool:
        """Replace ComfyUI's functions if they are the ones this was built against; False (one log line) if not."""
        why = self._unfit()
        if why:
            log.info("comfy-mesh: fast cache keys not installed (%s); ComfyUI's own functions are used", why)
            return False
        self.original_serialize = self.api._serialize_cache_key
        self.original_unequal = self.api._contains_self_unequal
        self.api._serialize_cache_key = self.serialize
        self.api._contains_self_unequal = self.contains_self_unequal
        self.installed = True
        log.info("comfy-mesh: fast cache keys installed (MESH_FAST_KEYS=0 turns them off)")
        return True

    def _unfit(self) -> str:
        for name in ("_serialize_cache_key", "_contains_self_unequal", "_canonicalize"):
            fn = getattr(self.api, name, None)
            if not callable(fn):
                return f"ComfyUI has no {name}"
            try:
                params = list(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                return f"cannot read the signature of {name}"
            if len(params) != 1:
                return f"{name} takes {params}, not one key"
        original = self.api._serialize_cache_key
        unequal = self.api._contains_self_unequal
        for key in reference_keys():
            if original(key) != digest(key):
                return "its digest differs from ComfyUI's on a reference key"
            if unequal(key) != contains_self_unequal(key, unequal):
                return "its self-unequal check differs from ComfyUI's on a reference key"
        nan_key = (("v", 1.0), ("w", (1, [2.0, {3: float("nan")}])))
        if unequal(nan_key) is not True or contains_self_unequal(nan_key, unequal) is not True:
            return "ComfyUI does not refuse a key holding NaN"
        if original(frozenset({("bad", object())})) is not None:
            return "ComfyUI hashes keys this cannot"
        return ""

    def uninstall(self) -> None:
        with self._lock:
            if not self.installed:
                return
            # Put ComfyUI's functions back only where ours are still in place: a hook installed over ours (the
            # identity, provider/identity.py) keeps calling `serialize`, which hands off to the original now.
            if self.api._serialize_cache_key == self.serialize:
                self.api._serialize_cache_key = self.original_serialize
            if self.api._contains_self_unequal == self.contains_self_unequal:
                self.api._contains_self_unequal = self.original_unequal
            self.installed = False
            self._digests.clear()
            self._unequal.clear()

    # -- the replacements ----------------------------------------------------------------------------------

    def serialize(self, cache_key: Any) -> str | None:
        original = self.original_serialize
        assert original is not None
        if not self.installed:
            return original(cache_key)
        with self._lock:
            known, value = self._digests.get(cache_key)
        if known:
            self.counters["remembered"] += 1
            return value
        try:
            value = digest(cache_key)
        except Exception:
            return original(cache_key)  # what ComfyUI does with a key it cannot hash (and logs), exactly
        self.counters["computed"] += 1
        if self._should_check():
            expected = original(cache_key)
            self.counters["verified"] += 1
            if expected != value:
                self._mismatch(expected, value)
                return expected
        with self._lock:
            self._digests.put(cache_key, value)
        return value

    def contains_self_unequal(self, obj: Any) -> bool:
        original = self.original_unequal
        assert original is not None
        if not self.installed:
            return original(obj)
        with self._lock:
            known, value = self._unequal.get(obj)
        if known:
            return bool(value)
        try:
            value = contains_self_unequal(obj, original)
        except RecursionError:
            value = original(obj)
        with self._lock:
            self._unequal.put(obj, value)
        return value

    def _should_check(self) -> bool:
        self._checked_this_prompt += 1
        return self._checked_this_prompt <= self.first_checked or random.random() < self.check_fraction

    def _mismatch(self, expected: str | None, got: str) -> None:
        self.counters["mismatches"] += 1
        log.warning("comfy-mesh: a fast cache key differed from ComfyUI's (%s, not %s): fast keys are off for "
                    "good in this process", got, expected)
        self.uninstall()

    # -- prompt life and counters ------------------------------------------------------------------------------

    def on_prompt_end(self) -> None:
        with self._lock:
            self._digests.clear()
            self._unequal.clear()
            self._checked_this_prompt = 0

    def stats(self) -> dict[str, float]:
        out = {f"provider_fast_keys_{k}": float(v) for k, v in self.counters.items()}
        out["provider_fast_keys_installed"] = float(self.installed)
        return out
