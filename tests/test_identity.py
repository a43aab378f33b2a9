"""The identity of a computation, piece by piece: file identities (remembered across restarts), names in model
folders and prompt text, custom-node pack code, and the hook that ties a digest to its identity."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import xxhash

from provider.filehash import FileHashes, Stamp, hash_file
from provider.identity import Identity, KeyIdentities, strings_in
from provider.models import ModelFolders
from provider.packs import PackIdentities, hash_pack
from tests.support.comfy_harness import fake_folder_paths, serialize_cache_key

WAIT = 30.0


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- file identities ---------------------------------------------------------------------------------------------


def test_a_file_identity_is_the_xxh3_128_of_its_bytes_and_equal_for_equal_bytes(tmp_path: Path) -> None:
    a = write(tmp_path / "a" / "model.safetensors", b"weights" * 100_000)
    b = write(tmp_path / "b" / "model.safetensors", b"weights" * 100_000)
    c = write(tmp_path / "c" / "model.safetensors", b"weights" * 99_999 + b"Weights")
    files = FileHashes(None)
    try:
        assert files.identity(str(a)) is None  # not known yet: queued, never hashed on the caller's thread
        ida, idb, idc = (files.wait(str(p), WAIT) for p in (a, b, c))
    finally:
        files.close()
    assert ida == xxhash.xxh3_128(a.read_bytes()).hexdigest() == hash_file(str(a))
    assert ida == idb != idc


def test_identities_are_remembered_across_restarts_and_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    model = write(tmp_path / "m.safetensors", os.urandom(3 << 20))
    table = tmp_path / "state" / "identities.json"
    first = FileHashes(table)
    try:
        known = first.wait(str(model), WAIT)
    finally:
        first.close()
    assert known and json.loads(table.read_text())["files"][Stamp.of(str(model)).slot()]["xxh3_128"] == known

    again = FileHashes(table)  # a restart: answered from the table at once, the file is not read
    try:
        assert again.identity(str(model)) == known
        assert again.counters.hashed == 0 and again.counters.remembered == 1
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
        os.utime(model, ns=(Stamp.of(str(model)).mtime_ns + 1_000_000,) * 2)
        assert again.identity(str(model)) is None  # other bytes: never the old identity
        changed = again.wait(str(model), WAIT)
    finally:
        again.close()
    assert changed == xxhash.xxh3_128(bytes(data)).hexdigest() != known
    assert again.counters.hashed == 1


def test_a_damaged_table_costs_a_rehash_not_a_wrong_identity(tmp_path: Path) -> None:
    model = write(tmp_path / "m.bin", b"abc")
    table = write(tmp_path / "identities.json", b"{not json")
    files = FileHashes(table)
    try:
        assert files.wait(str(model), WAIT) == xxhash.xxh3_128(b"abc").hexdigest()
    finally:
        files.close()
    assert json.loads(table.read_text())["format"] == 2


def test_an_unreadable_table_location_is_contained(tmp_path: Path) -> None:
    blocker = write(tmp_path / "file", b"")  # a file where the table's folder should be
    model = write(tmp_path / "m.bin", b"abc")
    files = FileHashes(blocker / "identities.json")
    try:
        assert files.wait(str(model), WAIT) == xxhash.xxh3_128(b"abc").hexdigest()
    finally:
        files.close()
    assert files.counters.save_errors == 1


# -- names in model folders and in prompt text -------------------------------------------------------------------


def test_strings_naming_model_files_and_embeddings_are_found(tmp_path: Path) -> None:
    write(tmp_path / "loras" / "style.safetensors", b"l")
    write(tmp_path / "checkpoints" / "style.safetensors", b"c")
    write(tmp_path / "checkpoints" / "sd" / "base.ckpt", b"b")
    write(tmp_path / "embeddings" / "easyneg.pt", b"e")
    write(tmp_path / "embeddings" / "bad,name.safetensors", b"x")
    models = ModelFolders(fake_folder_paths(tmp_path))
    models.refresh()
    assert sorted(label for label, _ in models.files_named("style.safetensors")) == [
        "checkpoints/style.safetensors", "loras/style.safetensors"]
    assert [label for label, _ in models.files_named(os.path.join("sd", "base.ckpt"))] == [
        f"checkpoints/{os.path.join('sd', 'base.ckpt')}"]
    assert models.files_named("a cat") == [] and models.files_named("missing.safetensors") == []
    assert [label for label, _ in models.embeddings_in("a photo, embedding:easyneg, (embedding:easyneg:1.2)")] == [
        "embeddings/easyneg.pt"]
    assert [label for label, _ in models.embeddings_in("embedding:easyneg,")] == ["embeddings/easyneg.pt"]
    assert models.embeddings_in("no embeddings here") == []
    assert models.embeddings_in("embedding:../../etc/passwd") == []


def test_embeddings_are_found_in_every_folder_comfyui_searches(tmp_path: Path) -> None:
    """ComfyUI's load_embed tries every folder under the embeddings roots, and `sub/../x` inside a root."""
    write(tmp_path / "embeddings" / "negative" / "easyneg.safetensors", b"n")
    write(tmp_path / "embeddings" / "top.pt", b"t")
    write(tmp_path / "embeddings" / "a" / "b" / "deep.bin", b"d")
    models = ModelFolders(fake_folder_paths(tmp_path))
    models.refresh()
    labels = lambda text: [label for label, _ in models.embeddings_in(text)]  # noqa: E731
    assert labels("a cat, embedding:easyneg") == [f"embeddings/{os.path.join('negative', 'easyneg.safetensors')}"]
    assert labels("embedding:negative/../top") == ["embeddings/top.pt"]
    assert labels("(embedding:deep:0.8)") == [f"embeddings/{os.path.join('a', 'b', 'deep.bin')}"]
    assert labels("embedding:b/deep") == [f"embeddings/{os.path.join('a', 'b', 'deep.bin')}"]  # from folder a


def test_a_model_file_added_since_the_last_listing_is_still_found(tmp_path: Path) -> None:
    models = ModelFolders(fake_folder_paths(tmp_path), refresh_seconds=3600).start()
    try:
        write(tmp_path / "loras" / "new.safetensors", b"fresh")  # after the listing
        assert [label for label, _ in models.files_named("new.safetensors")] == ["loras/new.safetensors"]
    finally:
        models.close()


# -- custom-node packs ----------------------------------------------------------------------------------------


def pack(root: Path, name: str, code: str, extra: str = "X = 1\n") -> Path:
    write(root / name / "__init__.py", (code + "\nclass Node:\n    pass\n").encode())
    write(root / name / "nodes" / "impl.py", extra.encode())
    write(root / name / "__pycache__" / "impl.cpython-311.pyc", os.urandom(64))
    return root / name


_loaded = 0


def node_class(entry: Path | None, pack_name: str | None = None) -> type:
    """A class defined in a pack's file and imported from its path, as ComfyUI's load_custom_node does (and
    stamped as it stamps them); `entry` None: a core class."""
    global _loaded
    if entry is None:
        return type("Core", (), {})
    source = entry / "__init__.py" if entry.is_dir() else entry
    _loaded += 1
    spec = importlib.util.spec_from_file_location(f"test_identity_pack_{_loaded}", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cls = module.Node
    cls.RELATIVE_PYTHON_MODULE = f"custom_nodes.{pack_name or entry.stem}"
    return cls


def test_a_pack_identity_follows_its_code_and_ignores_caches(tmp_path: Path) -> None:
    v1 = pack(tmp_path / "host1", "my-pack", "VERSION = 1\n")
    v1_again = pack(tmp_path / "host2", "my-pack", "VERSION = 1\n")
    v2 = pack(tmp_path / "host3", "my-pack", "VERSION = 2\n")
    deeper = pack(tmp_path / "host4", "my-pack", "VERSION = 1\n", extra="X = 2\n")  # only a submodule differs
    digests = [hash_pack(str(p))[0] for p in (v1, v1_again, v2, deeper)]
    assert digests[0] == digests[1] and len(set(digests)) == 3
    mappings = {"Custom": node_class(v1), "KSampler": node_class(None)}
    packs = PackIdentities(mappings, lambda: [str(tmp_path / "host1")])
    assert packs.of_class("Custom") == f"my-pack@{digests[0]}"
    assert packs.of_class("KSampler") == ""      # core: covered by ComfyUI's version
    assert packs.of_class("Nope") is None        # unknown: never shared
    assert PackIdentities(mappings, lambda: []).of_class("Custom") is None  # no custom_nodes folder holds it


def test_a_pack_holding_a_module_of_its_own_name_is_the_whole_folder(tmp_path: Path) -> None:
    a = pack(tmp_path / "a", "tint", "from .tint import *\n")
    b = pack(tmp_path / "b", "tint", "from .tint import *\n", extra="X = 2\n")
    for root in (a, b):
        write(root / "tint.py", b"Y = 1\n")
    ids = [PackIdentities({"T": node_class(root)}, lambda r=root: [str(r.parent)]).of_class("T") for root in (a, b)]
    assert ids[0] != ids[1]  # nodes/impl.py differs: not hidden behind tint/tint.py


def test_a_single_file_pack_is_that_file(tmp_path: Path) -> None:
    solo = write(tmp_path / "custom_nodes" / "solo.py", b"A = 1\nclass Node:\n    pass\n")
    write(tmp_path / "custom_nodes" / "other" / "__init__.py", b"B = 1\n")
    packs = PackIdentities({"Solo": node_class(solo)}, lambda: [str(tmp_path / "custom_nodes")])
    assert packs.of_class("Solo") == f"solo@{hash_pack(str(solo))[0]}"


def test_a_pack_changed_on_disk_after_start_is_not_shared(tmp_path: Path) -> None:
    v1 = pack(tmp_path / "custom_nodes", "pack", "V = 1\n")
    started = time.time_ns()
    cls = node_class(v1)
    impl = v1 / "nodes" / "impl.py"
    impl.write_text("X = 'updated by the manager'\n")
    os.utime(impl, ns=(started + 10**9, started + 10**9))  # written after ComfyUI started, whatever the clock's grain
    assert PackIdentities({"P": cls}, lambda: [str(tmp_path / "custom_nodes")], started).of_class("P") is None
    later = PackIdentities({"P": cls}, lambda: [str(tmp_path / "custom_nodes")], started + 2 * 10**9)  # restarted
    assert later.of_class("P") == f"pack@{hash_pack(str(v1))[0]}"


# -- the hook -----------------------------------------------------------------------------------------------


def key_of(*nodes: list[Any]) -> frozenset:
    """A key shaped like ComfyUI's: frozenset of (index, frozenset of (position, element))."""
    return frozenset((i, frozenset(enumerate(n))) for i, n in enumerate(nodes))


def identities(models_root: Path, table: Path | None = None, mappings: dict[str, type] | None = None
               ) -> tuple[KeyIdentities, Any]:
    mappings = mappings or {}
    api = types.SimpleNamespace(_serialize_cache_key=serialize_cache_key)  # ComfyUI's own digest
    ids = KeyIdentities(ModelFolders(fake_folder_paths(models_root)).start(), FileHashes(table),
                        PackIdentities(mappings, lambda: [str(models_root / "custom_nodes")]), mappings)
    assert ids.install(api)
    ids.on_prompt_start()
    return ids, api


def settle(ids: KeyIdentities, api: Any, key: Any) -> Identity:
    """Serialise until no file of the key is still being hashed (a new prompt each time, as ComfyUI would)."""
    for path in [p for s in strings_in(key) for _, p in ids.models.files_named(s) + ids.models.embeddings_in(s)]:
        ids.files.wait(path, WAIT)
    ids.on_prompt_start()
    found = ids.of(api._serialize_cache_key(key))
    assert found is not None
    return found


def test_the_hook_keeps_the_digest_and_ties_it_to_the_files_and_code_behind_the_key(tmp_path: Path) -> None:
    write(tmp_path / "a" / "upscale_models" / "tiny2x.safetensors", b"weights A")
    write(tmp_path / "b" / "upscale_models" / "tiny2x.safetensors", b"weights B")
    write(tmp_path / "c" / "upscale_models" / "tiny2x.safetensors", b"weights A")
    key = key_of(["ImageUpscaleWithModel", False, ("image", ("ANCESTOR", 1, 0))],
                 ["UpscaleModelLoader", False, ("model_name", "tiny2x.safetensors")])
    plain = key_of(["EmptyImage", False, ("width", 64)])
    found = {}
    for host in "abc":
        ids, api = identities(tmp_path / host)
        try:
            inner_digest = ids._inner(key)  # type: ignore[misc]
            digest = api._serialize_cache_key(key)
            assert digest == inner_digest  # ComfyUI's digest is never changed
            first = ids.of(digest)
            assert first is not None and first.pending == ("upscale_models/tiny2x.safetensors",)
            assert not first.shareable  # until the file's identity is known: not shared under the bare name
            found[host] = settle(ids, api, key)
            assert ids.of(api._serialize_cache_key(plain)) == Identity()  # no files: the digest alone
        finally:
            ids.close()
        assert api._serialize_cache_key is ids._inner  # uninstalled
    assert all(i.shareable and i.suffix for i in found.values())
    assert found["a"].suffix == found["c"].suffix != found["b"].suffix
    assert found["a"].parts == (f"upscale_models/tiny2x.safetensors=xxh3:{xxhash.xxh3_128(b'weights A').hexdigest()}",)


def test_embeddings_in_prompt_text_and_custom_classes_enter_the_identity(tmp_path: Path) -> None:
    write(tmp_path / "embeddings" / "neg.pt", b"embedding")
    v1 = pack(tmp_path / "custom_nodes", "pack", "V = 1\n")
    mappings = {"PackNode": node_class(v1), "CLIPTextEncode": node_class(None)}
    ids, api = identities(tmp_path, mappings=mappings)
    try:
        key = key_of(["PackNode", False, ("conditioning", ("ANCESTOR", 1, 0))],
                     ["CLIPTextEncode", False, ("text", "a cat, embedding:neg")])
        found = settle(ids, api, key)
        without = ids.of(api._serialize_cache_key(key_of(["CLIPTextEncode", False, ("text", "a cat, embedding:x")])))
    finally:
        ids.close()
    assert found.parts == (f"embeddings/neg.pt=xxh3:{xxhash.xxh3_128(b'embedding').hexdigest()}",
                           f"pack:pack@{hash_pack(str(v1))[0]}")
    assert without == Identity()


def test_unknown_classes_and_unreadable_keys_are_never_shared(tmp_path: Path) -> None:
    gone = node_class(None)
    gone.RELATIVE_PYTHON_MODULE = "custom_nodes.vanished"  # a custom class whose pack no folder holds
    ids, api = identities(tmp_path, mappings={"Gone": gone})
    try:
        assert not ids.of(api._serialize_cache_key(key_of(["Gone", False]))).shareable  # type: ignore[union-attr]
        assert ids.of("0" * 64) is None  # a digest the hook never saw: the provider must not share it
    finally:
        ids.close()


def test_a_file_that_is_not_regular_is_never_read(tmp_path: Path) -> None:
    """A FIFO under a model's name would block the hashing thread for good: it is refused, and the next file is
    still hashed."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    other = write(tmp_path / "other.safetensors", b"fine")
    files = FileHashes(None)
    try:
        assert files.wait(str(fifo), WAIT) is None and files.counters.failed == 1
        assert files.wait(str(other), WAIT) == xxhash.xxh3_128(b"fine").hexdigest()
    finally:
        files.close()


def _every_string(obj: Any) -> set[str]:
    """The plain, obviously right recursion strings_in must agree with."""
    if isinstance(obj, str):
        return {str(obj)}
    if isinstance(obj, dict):
        return set().union(*(_every_string(k) | _every_string(v) for k, v in obj.items()))
    if isinstance(obj, (tuple, frozenset, list, set)):
        return set().union(*(_every_string(i) for i in obj))
    return set()


class _Str(str):
    pass


scalars = st.one_of(st.text(max_size=8), st.integers(), st.floats(), st.booleans(), st.none(), st.binary(max_size=4),
                    st.text(max_size=4).map(_Str))
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
    st.frozensets(st.text(max_size=4) | st.integers(), max_size=4),
    st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=30)


@given(trees)
@settings(max_examples=300, deadline=None)
def test_strings_in_finds_every_string_of_any_key(tree: Any) -> None:
    assert strings_in(tree) == _every_string(tree)


def test_a_rewrite_that_sets_mtime_back_is_still_seen(tmp_path: Path) -> None:
    """`cp -p`, `rsync -a`, `touch -d`: the same size and mtime, other bytes. ctime gives it away."""
    model = write(tmp_path / "m.safetensors", b"A" * 4096)
    before = os.stat(model)
    files = FileHashes(None)
    try:
        old = files.wait(str(model), WAIT)
        model.write_bytes(b"B" * 4096)
        os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(model).st_mtime_ns == before.st_mtime_ns and os.stat(model).st_size == before.st_size
        assert files.identity(str(model)) is None  # not the old identity
        assert files.wait(str(model), WAIT) == xxhash.xxh3_128(b"B" * 4096).hexdigest() != old
    finally:
        files.close()


def test_two_processes_sharing_a_table_keep_each_others_rows(tmp_path: Path) -> None:
    table = tmp_path / "identities.json"
    a, b = write(tmp_path / "a.bin", b"a"), write(tmp_path / "b.bin", b"b")
    first, second = FileHashes(table), FileHashes(table)  # both loaded the empty table
    try:
        assert first.wait(str(a), WAIT) and second.wait(str(b), WAIT)
    finally:
        first.close()
        second.close()
    again = FileHashes(table)
    try:
        assert again.identity(str(a)) and again.identity(str(b))  # neither write dropped the other's row
    finally:
        again.close()
