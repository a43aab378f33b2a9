"""What the provider caches. The class rules are decided once per class type, for should_cache on ComfyUI's event
loop; the value rules (representable, not too large) walk the value, so they run on the provider's store thread.

Not cached: output nodes (a hit skips the node, so SaveImage would write no file on this instance and
PreviewImage's `ui` would name a file that exists only on another host), non-idempotent nodes (their output
differs run to run by design), class types on the deny list or off a non-empty allow list, and values the
codec cannot represent (MODEL, CLIP, VAE objects...) or that exceed the size limit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mesh import codec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeTraits:
    output_node: bool = False
    not_idempotent: bool = False


TraitsLookup = Callable[[str], NodeTraits]


def value_tree(outputs: object, ui: object) -> dict[str, object]:
    """The tree the provider stores for one CacheValue."""
    return {"outputs": outputs, "ui": ui}


class Policy:
    def __init__(self, traits: TraitsLookup, *, allow: tuple[str, ...] = (), deny: tuple[str, ...] = (),
                 cache_output_nodes: bool = False, max_value_size: int = 1 << 30) -> None:
        self._traits = traits
        self._allow = frozenset(allow)
        self._deny = frozenset(deny)
        self._cache_output_nodes = cache_output_nodes
        self.max_value_size = max_value_size
        self._lock = threading.Lock()
        self._by_class: dict[str, bool] = {}
        self._refused_logged: set[str] = set()
        # Changed at run time from ComfyUI's settings dialog (provider/web.py): off, and classes never cached on
        # top of MESH_DENY. Off means should_cache says no, so ComfyUI neither looks up nor stores.
        self.enabled = True
        self._never: frozenset[str] = frozenset()

    def configure(self, *, enabled: bool | None = None, never: Iterable[str] | None = None) -> None:
        """Apply the run-time settings; the per-class decisions are made again from the next should_cache."""
        with self._lock:
            if never is not None:
                self._never = frozenset(c.strip() for c in never if c.strip())
            if enabled is not None:
                self.enabled = bool(enabled)
            self._by_class = {}

    def settings(self) -> dict[str, object]:
        """The run-time settings and the configured lists they add to (for the web page)."""
        return {"enabled": self.enabled, "never": sorted(self._never), "deny": sorted(self._deny),
                "allow": sorted(self._allow)}

    def allows_class(self, class_type: str) -> bool:
        if not self.enabled:
            return False
        known = self._by_class.get(class_type)
        if known is not None:
            return known
        by_class = self._by_class
        decision = self._decide_class(class_type)
        with self._lock:
            if by_class is self._by_class:  # not decided under settings that changed meanwhile
                by_class[class_type] = decision
        return decision

    def _decide_class(self, class_type: str) -> bool:
        if class_type in self._deny or class_type in self._never or (self._allow and class_type not in self._allow):
            return False
        try:
            traits = self._traits(class_type)
        except Exception:  # a broken node class must not break the prompt
            log.debug("cannot read traits of %s", class_type, exc_info=True)
            return False
        if traits.not_idempotent:
            return False
        return self._cache_output_nodes or not traits.output_node

    def allows_value(self, class_type: str, tree: object) -> bool:
        """A walk of the value (no copies): representable, and not larger than the limit."""
        try:
            codec.check(tree, self.max_value_size)
        except codec.NotCacheable as e:
            if class_type not in self._refused_logged:
                self._refused_logged.add(class_type)
                log.debug("not caching %s: %s", class_type, e)
            return False
        return True
