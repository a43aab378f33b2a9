"""provider/fastkeys.py: the same digest as ComfyUI's `_serialize_cache_key` for every key, the same refusals,
computed once per key per prompt, installed only where it is right, and switched off on any difference.

The reference is ComfyUI's function: the real one when a ComfyUI source is at hand (COMFYUI_DIR, or the
fetched mirror of the fork with the CacheProvider API), and always the harness's faithful copy
(tests/support/comfy_harness.py), which the real one is checked against too.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provider.fastkeys import FastKeys, contains_self_unequal, digest, reference_keys
from tests.support import comfy_harness
from tests.support.comfy_harness import HarnessProcess, b_is_served_what_a_computed

MIRROR = Path("/work/.mirror/nqb3323+ComfyUI/repo")


class MyStr(str):
    def __str__(self) -> str:
        return "not the value"


class MyInt(int):
    def __repr__(self) -> str:
        return "MyInt(?)"

    __str__ = __repr__


class MyFloat(float):
    def __repr__(self) -> str:
        return "MyFloat(?)"

    __str__ = __repr__


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e300, -1e-300, 5e-324]),
    st.text(max_size=12), st.binary(max_size=8),
    st.text(max_size=4).map(MyStr), st.integers(-5, 5).map(MyInt), st.floats(-2, 2).map(MyFloat),
)
hashables = st.recursive(scalars, lambda inner: st.one_of(
    st.frozensets(inner, max_size=5), st.tuples(inner, inner), st.lists(inner, max_size=3).map(tuple)),
    max_leaves=25)
keys = st.recursive(hashables, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(hashables, inner, max_size=4), st.sets(hashables, max_size=4),
    st.frozensets(hashables, max_size=4), st.tuples(inner, inner)), max_leaves=40)


def reference(key: Any) -> str | None:
    logging.disable(logging.WARNING)  # the reference logs every key it refuses
    try:
        return comfy_harness.serialize_cache_key(key)
    finally:
        logging.disable(logging.NOTSET)


def fast(key: Any) -> str | None:
    try:
        return digest(key)
    except Exception:
        return None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys)
def test_same_digest_as_comfyui_for_any_key(key: Any) -> None:
    assert fast(key) == reference(key)


class Weird:
    """Objects ComfyUI's check handles in its own way: a `value` attribute, an __eq__ that is not reflexive."""

    def __init__(self, value: Any) -> None:
        self.value = value


class NeverEqual:
    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


class RaisingEq:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no")

    __hash__ = object.__hash__


odd = st.sampled_from([Weird(float("nan")), Weird(1), Weird((2, float("nan"))), NeverEqual(), RaisingEq(),
                       comfy_harness.Unhashable(), float("nan"), MyFloat(float("nan"))])
unequal_keys = st.recursive(st.one_of(scalars, odd), lambda inner: st.one_of(
    st.tuples(inner, inner), st.lists(inner, max_size=3), st.frozensets(st.one_of(scalars, st.just(float("nan"))),
                                                                         max_size=3),
    st.dictionaries(st.text(max_size=3), inner, max_size=3)), max_leaves=30)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unequal_keys)
def test_same_self_unequal_answer_as_comfyui(key: Any) -> None:
    original = comfy_harness.contains_self_unequal
    assert contains_self_unequal(key, original) == original(key)
    if REAL is not None:
        assert contains_self_unequal(key, REAL._contains_self_unequal) == REAL._contains_self_unequal(key)


@pytest.mark.parametrize("key", [
    frozenset({("x", object())}), [1, {2: type}], (b"ok", 1j), ("nested", (1, [2, {3: ...}])),
])
def test_keys_comfyui_refuses_are_refused(key: Any) -> None:
    assert reference(key) is None and fast(key) is None


def test_floats_and_unicode_exactly() -> None:
    for key in [frozenset({("v", math.nan)}), (math.inf, -math.inf), (-0.0, 0.0), ("é✓\x00\u2028",), (2**64, -1)]:
        assert fast(key) == reference(key)


def _real_comfyui_module() -> types.ModuleType | None:
    """comfy_execution/cache_provider.py of a real ComfyUI, imported alone (its types module stubbed)."""
    source: str | None = None
    comfy = os.environ.get("COMFYUI_DIR")
    if comfy and (Path(comfy) / "comfy_execution" / "cache_provider.py").exists():
        source = (Path(comfy) / "comfy_execution" / "cache_provider.py").read_text()
    elif MIRROR.exists():
        r = subprocess.run(["git", "-C", str(MIRROR), "show", "HEAD:comfy_execution/cache_provider.py"],
                           capture_output=True, text=True)
        source = r.stdout if r.returncode == 0 else None
    if not source:
        return None
    stub = types.ModuleType("comfy_api.latest._caching")
    stub.CacheProvider = stub.CacheContext = stub.CacheValue = object  # type: ignore[attr-defined]
    saved = {n: sys.modules.get(n) for n in ("comfy_api", "comfy_api.latest", "comfy_api.latest._caching")}
    sys.modules.update({"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": types.ModuleType("x"),
                        "comfy_api.latest._caching": stub})
    try:
        module = types.ModuleType("real_cache_provider")
        exec(compile(source, "comfy_execution/cache_provider.py", "exec"), module.__dict__)
        return module
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


REAL = _real_comfyui_module()


@pytest.mark.skipif(REAL is None, reason="no ComfyUI source here (set COMFYUI_DIR)")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys)
def test_same_digest_as_the_real_comfyui(key: Any) -> None:
    assert REAL is not None
    logging.disable(logging.WARNING)
    try:
        expected = REAL._serialize_cache_key(key)
    finally:
        logging.disable(logging.NOTSET)
    assert fast(key) == expected == reference(key)


@pytest.mark.skipif(REAL is None, reason="no ComfyUI source here (set COMFYUI_DIR)")
def test_installs_into_the_real_comfyui_module() -> None:
    assert REAL is not None
    fk = FastKeys(REAL)
    assert fk.install()
    try:
        for key in reference_keys():
            assert REAL._serialize_cache_key(key) == fk.original_serialize(key)  # type: ignore[misc]
    finally:
        fk.uninstall()
    assert REAL._serialize_cache_key is fk.original_serialize


# -- installing, remembering, switching off --------------------------------------------------------------------

def _api() -> types.SimpleNamespace:
    return types.SimpleNamespace(_serialize_cache_key=comfy_harness.serialize_cache_key,
                                 _contains_self_unequal=comfy_harness.contains_self_unequal,
                                 _canonicalize=comfy_harness._canonicalize)


def test_once_per_key_object_per_prompt() -> None:
    api = _api()
    fk = FastKeys(api)
    assert fk.install() and api._serialize_cache_key == fk.serialize
    key = frozenset({("seed", 1), ("inputs", ("a", 2.5))})
    same_value = frozenset({("seed", 1), ("inputs", ("a", 2.5))})
    first = api._serialize_cache_key(key)
    assert api._serialize_cache_key(key) == api._serialize_cache_key(same_value) == first
    assert fk.counters["computed"] == 2 and fk.counters["remembered"] == 1  # by identity, not by equality
    assert api._contains_self_unequal(key) is False and api._contains_self_unequal(key) is False
    fk.on_prompt_end()
    api._serialize_cache_key(key)
    assert fk.counters["computed"] == 3  # a new prompt computes again
    mutable = [1, 2]
    api._serialize_cache_key(mutable)
    mutable.append(3)
    assert api._serialize_cache_key(mutable) == reference([1, 2, 3])  # lists are never remembered
    fk.uninstall()
    assert api._serialize_cache_key is comfy_harness.serialize_cache_key


def test_not_installed_where_comfyui_differs(caplog: pytest.LogCaptureFixture) -> None:
    other = _api()
    other._serialize_cache_key = lambda key: "0" * 64  # a ComfyUI whose digest is not this one
    with caplog.at_level(logging.INFO, logger="comfy_mesh"):
        assert not FastKeys(other).install()
    assert other._serialize_cache_key("x") == "0" * 64
    assert any("not installed" in r.getMessage() for r in caplog.records)
    missing = types.SimpleNamespace(_serialize_cache_key=comfy_harness.serialize_cache_key)
    assert not FastKeys(missing).install()
    two_args = _api()
    two_args._contains_self_unequal = lambda obj, depth: False
    assert not FastKeys(two_args).install()


def test_a_difference_at_run_time_switches_it_off_for_good(caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    api = _api()
    fk = FastKeys(api, check_fraction=1.0)
    assert fk.install()
    monkeypatch.setattr("provider.fastkeys.digest", lambda key: "f" * 64)  # a bug that shows only at run time
    with caplog.at_level(logging.WARNING, logger="comfy_mesh"):
        got = api._serialize_cache_key(frozenset({("k", 1)}))
    assert got == reference(frozenset({("k", 1)}))  # ComfyUI's answer, not the wrong one
    assert fk.counters["mismatches"] == 1 and not fk.installed
    assert api._serialize_cache_key is comfy_harness.serialize_cache_key
    assert sum("off for good" in r.getMessage() for r in caplog.records) == 1
    assert fk.stats()["provider_fast_keys_mismatches"] == 1


def test_an_accelerated_and_a_plain_instance_share(tmp_path: Path) -> None:
    """A hashes its keys the fast way, B the way ComfyUI does: B still gets every value A computed."""
    a = HarnessProcess(["--secret", "s", "--node-id", "fast", "--fast-keys"], log_path=tmp_path / "a.log")
    b = None
    try:
        b = HarnessProcess(["--secret", "s", "--node-id", "plain", "--seeds", str(a.address)],
                           log_path=tmp_path / "b.log")
        b.wait_members(2)
        b_is_served_what_a_computed(a, b, seed=81)
    finally:
        if b is not None:
            b.quit()
        a.quit()


def test_a_tuple_holding_a_list_is_never_remembered() -> None:
    """Found in review: a tuple is not immutable when it holds a list; its digest must follow a change."""
    api = _api()
    fk = FastKeys(api)
    assert fk.install()
    try:
        inner = [1, 2]
        key = ("k", inner)
        first = api._serialize_cache_key(key)
        inner.append(3)
        assert api._serialize_cache_key(key) != first
        assert api._serialize_cache_key(key) == reference(("k", [1, 2, 3]))
    finally:
        fk.uninstall()
