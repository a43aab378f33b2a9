"""Never a wrong image: hosts whose model files, embeddings or custom-node code differ under the same names never
share, hosts with identical ones do, also after a restart. Three ComfyUI-like processes (tests/support/
comfy_harness.py, which hands the provider ComfyUI's real key function, model folders and custom-node packs):
A and C hold the same bytes, B other bytes under every one of the same names."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from xxhash import xxh3_128

from tests.support.cli import run_cli
from tests.support.comfy_harness import HarnessProcess
from tests.support.poll import poll

SECRET = "identity-test-secret"

PACK = '''
import torch


class PackTint:
    """A custom node whose result depends on its pack's version."""
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, image):
        return (torch.clamp(image * {factor}, 0, 1),)


NODE_CLASS_MAPPINGS = {{"PackTint": PackTint}}
'''


def make_host(root: Path, *, model: bytes, embedding: bytes, pack_factor: str) -> Path:
    (root / "upscale_models").mkdir(parents=True)
    (root / "upscale_models" / "tiny2x.safetensors").write_bytes(model)
    (root / "embeddings").mkdir()
    (root / "embeddings" / "neg.pt").write_bytes(embedding)
    (root / "custom_nodes" / "tint-pack").mkdir(parents=True)
    (root / "custom_nodes" / "tint-pack" / "__init__.py").write_text(PACK.format(factor=pack_factor))
    return root


def upscale(seed: int) -> dict[str, Any]:
    return {"img": {"class_type": "MakeImage", "inputs": {"seed": seed, "height": 16, "width": 16}},
            "loader": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny2x.safetensors"}},
            "up": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["loader", 0],
                                                                      "image": ["img", 0]}}}


def encode(seed: int) -> dict[str, Any]:
    return {"cond": {"class_type": "CLIPTextEncode", "inputs": {"text": f"a cat #{seed}, embedding:neg"}}}


def tint(seed: int) -> dict[str, Any]:
    return {"img": {"class_type": "MakeImage", "inputs": {"seed": seed, "height": 16, "width": 16}},
            "tint": {"class_type": "PackTint", "inputs": {"image": ["img", 0]}}}


def start(tmp_path: Path, name: str, models: Path, *extra: str) -> HarnessProcess:
    return HarnessProcess(["--secret", SECRET, "--node-id", name, "--models", str(models), "--identity-cache",
                           str(tmp_path / f"{name}-identities.json"), *extra], log_path=tmp_path / f"{name}.log")


def settle_identities(host: HarnessProcess) -> None:
    """Run every workflow once (that queues each file for hashing), then wait until no file is left to hash."""
    for workflow in (upscale, encode, tint):
        assert host.run(prompt=workflow(0))["errors"] == []
    poll(lambda: host.stats()["provider"].get("provider_identity_files_queued") == 0, "files hashed", timeout=30)
    assert host.stats()["provider"]["provider_identity_files_hashed"] == 2  # the upscale model and the embedding


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("identity")
    same = {"model": os.urandom(4096), "embedding": os.urandom(512), "pack_factor": "0.8"}
    other = {"model": os.urandom(4096), "embedding": os.urandom(512), "pack_factor": "0.9"}
    roots = {"a": make_host(tmp / "a", **same), "b": make_host(tmp / "b", **other), "c": make_host(tmp / "c", **same)}
    hosts: dict[str, HarnessProcess] = {}
    try:
        hosts["a"] = start(tmp, "a", roots["a"])
        for name in "bc":
            hosts[name] = start(tmp, name, roots[name], "--seeds", str(hosts["a"].address))
        for h in hosts.values():
            h.wait_members(3)
            settle_identities(h)
        yield {"tmp": tmp, "roots": roots, "hosts": hosts, "model_a": same["model"]}
    finally:
        for h in hosts.values():
            h.kill()


def shared(fleet: dict[str, Any], workflow: Any, node: str, seed: int) -> dict[str, dict[str, Any]]:
    """A computes and stores; then B and C run the same prompt. Returns the three results."""
    a, b, c = (fleet["hosts"][n] for n in "abc")
    ra = a.run(prompt=workflow(seed))
    assert ra["errors"] == [] and node in ra["executed"] and a.flush(30)
    rb, rc = b.run(prompt=workflow(seed)), c.run(prompt=workflow(seed))
    assert rb["errors"] == [] and rc["errors"] == []
    return {"a": ra, "b": rb, "c": rc}


def test_same_model_name_other_weights_never_share_identical_files_do(fleet: dict[str, Any]) -> None:
    r = shared(fleet, upscale, "up", seed=11)
    assert "up" in r["b"]["executed"] and "up" not in r["b"]["provider_hits"]   # other weights: computed here
    assert r["b"]["outputs"]["up"] != r["a"]["outputs"]["up"]                  # ...and rightly different
    assert "up" in r["c"]["provider_hits"] and "up" not in r["c"]["executed"]  # identical bytes: shared
    assert r["c"]["outputs"]["up"] == r["a"]["outputs"]["up"]


def test_an_embedding_named_in_prompt_text_is_part_of_the_key(fleet: dict[str, Any]) -> None:
    r = shared(fleet, encode, "cond", seed=12)
    assert "cond" in r["b"]["executed"] and r["b"]["outputs"]["cond"] != r["a"]["outputs"]["cond"]
    assert "cond" in r["c"]["provider_hits"] and r["c"]["outputs"]["cond"] == r["a"]["outputs"]["cond"]


def test_two_versions_of_a_custom_node_pack_never_share(fleet: dict[str, Any]) -> None:
    r = shared(fleet, tint, "tint", seed=13)
    assert "tint" in r["b"]["executed"] and r["b"]["outputs"]["tint"] != r["a"]["outputs"]["tint"]
    assert "tint" in r["c"]["provider_hits"] and r["c"]["outputs"]["tint"] == r["a"]["outputs"]["tint"]
    assert "img" in r["b"]["provider_hits"]  # a core node's output is still shared between all three


def test_the_stored_identity_names_the_file_and_pack(fleet: dict[str, Any]) -> None:
    a = fleet["hosts"]["a"]
    keys = a.call({"cmd": "contexts", "prompt": upscale(11)})["contexts"]
    assert keys["up"]["key"].startswith(f"{a.namespace}/{keys['up']['cache_key_hash']}.")  # digest + identity
    assert keys["img"]["key"] == f"{a.namespace}/{keys['img']['cache_key_hash']}"        # no files: digest alone
    stats = a.stats()["provider"]
    assert stats["provider_identity_with_files"] >= 1 and stats["provider_identity_with_packs"] >= 1

    model_id = f"upscale_models/tiny2x.safetensors=xxh3:{xxh3_128(fleet['model_a']).hexdigest()}"
    secret = fleet["tmp"] / "secret"
    secret.write_text(SECRET)
    identities: dict[str, str] = {}  # each node lists the keys it holds (it owns 2 of every 3): ask all three
    tables = ""
    for host in fleet["hosts"].values():
        listed = run_cli("keys", "--json", node=host.address, secret_file=secret, check=True)
        identities.update({k["key"]: k["meta"].get("identity") for k in json.loads(listed.stdout)})
        tables += run_cli("keys", node=host.address, secret_file=secret, check=True, env={"COLUMNS": "300"}).stdout
    assert identities[keys["up"]["key"]] == model_id
    assert identities[keys["img"]["key"]] == "comfyui"  # a core node with no files: ComfyUI's version covers it
    assert f"upscale_models/tiny2x.safetensors=xxh3:{model_id[-32:][:8]}" in tables
    described = run_cli("get", keys["up"]["key"], "--describe", node=a.address, secret_file=secret, check=True)
    assert f"identity={model_id}" in described.stdout


def test_a_file_being_hashed_is_not_shared_under_its_bare_name(tmp_path: Path) -> None:
    root = make_host(tmp_path / "x", model=os.urandom(1 << 20), embedding=b"e", pack_factor="0.5")
    x = start(tmp_path, "x", root)
    try:
        first = x.run(prompt=upscale(21))  # the file is seen for the first time: queued for hashing
        assert first["errors"] == [] and "up" in first["executed"]
        assert x.flush(30)
        stats = x.stats()["provider"]
        assert stats["provider_stores_unshared"] >= 1 and stats["provider_lookups_unshared"] >= 1
        keys = x.call({"cmd": "contexts", "prompt": upscale(21)})["contexts"]
        assert keys["up"]["key"] is None or "." in keys["up"]["key"].rsplit("/", 1)[1]
    finally:
        x.kill()


def test_identities_are_remembered_across_a_restart_and_still_shared(fleet: dict[str, Any]) -> None:
    hosts, tmp = fleet["hosts"], fleet["tmp"]
    hosts["c"].quit()
    hosts["c"] = c = start(tmp, "c", fleet["roots"]["c"], "--seeds", str(hosts["a"].address))
    c.wait_members(3)
    a = hosts["a"]
    ra = a.run(prompt=upscale(31))
    assert "up" in ra["executed"] and a.flush(30)
    rc = c.run(prompt=upscale(31))  # the first prompt after the restart: no file is read again
    assert "up" in rc["provider_hits"] and rc["outputs"]["up"] == ra["outputs"]["up"]
    stats = c.stats()["provider"]
    assert stats["provider_identity_files_hashed"] == 0 and stats["provider_identity_files_remembered"] >= 1


def test_without_identity_the_same_name_serves_another_hosts_weights(tmp_path: Path) -> None:
    """What the identity prevents, shown: MESH_IDENTITY=0 keys by names, and B takes A's image."""
    a_root = make_host(tmp_path / "a", model=os.urandom(4096), embedding=b"e", pack_factor="0.5")
    b_root = make_host(tmp_path / "b", model=os.urandom(4096), embedding=b"e", pack_factor="0.5")
    a = start(tmp_path, "na", a_root, "--no-identity")
    try:
        b = start(tmp_path, "nb", b_root, "--no-identity", "--seeds", str(a.address))
        try:
            b.wait_members(2)
            ra = a.run(prompt=upscale(41))
            assert a.flush(30)
            rb = b.run(prompt=upscale(41))
            assert "up" in rb["provider_hits"] and rb["outputs"]["up"] == ra["outputs"]["up"]  # the wrong image
        finally:
            b.kill()
    finally:
        a.kill()


def test_a_model_replaced_under_a_running_comfyui_is_not_shared_until_restart(tmp_path: Path) -> None:
    """ComfyUI keeps a loaded model by its name: after the file is overwritten (a re-download, a LoRA trainer's
    next epoch) this process may still compute with the old weights, so nothing that names the file is shared."""
    old, new = os.urandom(4096), os.urandom(4096)
    a_root = make_host(tmp_path / "a", model=old, embedding=b"e", pack_factor="0.5")
    b_root = make_host(tmp_path / "b", model=new, embedding=b"e", pack_factor="0.5")
    a = start(tmp_path, "a", a_root)
    try:
        b = start(tmp_path, "b", b_root, "--seeds", str(a.address))
        try:
            b.wait_members(2)
            for host in (a, b):
                settle_identities(host)
            assert "up" in a.run(prompt=upscale(50))["executed"]  # the loader's model is now in A's local cache
            (a_root / "upscale_models" / "tiny2x.safetensors").write_bytes(new)  # A now holds B's file
            assert a.run(prompt=upscale(51))["errors"] == []  # the new bytes would be hashed meanwhile
            poll(lambda: a.stats()["provider"].get("provider_identity_files_queued") == 0, "hashed", timeout=30)
            ra = a.run(prompt=upscale(52))
            assert "loader" in ra["local_hits"] and "up" in ra["executed"]  # computed with the old weights
            assert a.flush(30)
            rb = b.run(prompt=upscale(52))
            assert "up" in rb["executed"] and "up" not in rb["provider_hits"]  # never served A's stale image
            assert rb["outputs"]["up"] != ra["outputs"]["up"]
            assert a.stats()["provider"]["provider_stores_unshared"] >= 1
        finally:
            b.kill()
    finally:
        a.kill()
    assert "changed while ComfyUI runs" in (tmp_path / "a.log").read_text()


def computed(seed: int) -> dict[str, Any]:
    """The embedding's name is built by a node: no cache key holds "embedding:neg"."""
    return {"s": {"class_type": "StringConcatenate", "inputs": {"string_a": f"a cat #{seed}, embedding:",
                                                                 "string_b": "neg"}},
            "cond": {"class_type": "CLIPTextEncode", "inputs": {"text": ["s", 0]}}}


def test_a_file_opened_by_a_computed_name_is_never_shared(tmp_path: Path) -> None:
    a_root = make_host(tmp_path / "a", model=b"m", embedding=os.urandom(512), pack_factor="0.5")
    b_root = make_host(tmp_path / "b", model=b"m", embedding=os.urandom(512), pack_factor="0.5")
    a = start(tmp_path, "a", a_root)
    try:
        b = start(tmp_path, "b", b_root, "--seeds", str(a.address))
        try:
            b.wait_members(2)
            ra = a.run(prompt=computed(61))
            assert ra["errors"] == [] and "cond" in ra["executed"] and a.flush(30)
            rb = b.run(prompt=computed(61))
            assert "cond" in rb["executed"] and rb["outputs"]["cond"] != ra["outputs"]["cond"]
            again = a.run(prompt=computed(62))  # later prompts of A: its CLIPTextEncode keys stay unshared
            assert a.flush(30) and "cond" in b.run(prompt=computed(62))["executed"]
            assert "cond" in again["executed"] and a.stats()["provider"]["provider_stores_unshared"] >= 2
        finally:
            b.kill()
    finally:
        a.kill()
    assert "which its cache key does not name" in (tmp_path / "a.log").read_text()
