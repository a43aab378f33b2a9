"""Which strings of a cache key name files in ComfyUI's model folders, and where those files are.

ComfyUI's cache key holds a loader's inputs as they were typed: `("ckpt_name", "model.safetensors")`. Any string
of a key that is a file name listed in one of ComfyUI's model folders (`folder_paths`: checkpoints, loras, vae,
upscale_models, controlnet, clip, diffusion_models, embeddings, ...) is taken to name that file, whichever node
and input holds it; so is an `embedding:NAME` inside prompt text, resolved as ComfyUI's tokenizer resolves it.
Matching every string, not known loader inputs, covers custom loaders too; a string that names a file by
accident only makes a key narrower, never wrong.

A name found in several folders names all of them (the key then carries every one's identity).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger("comfy_mesh")

NOT_MODELS = {"custom_nodes"}  # folders of folder_paths that hold code, not model files (code: packs.py)
EMBEDDING = re.compile(r"embedding:([^\s]+)")
EMBEDDING_EXTENSIONS = ("", ".safetensors", ".pt", ".bin")  # as comfy/sd1_clip.py's load_embed tries them


class ModelFolders:
    """A view of ComfyUI's `folder_paths`, refreshed at every prompt start (ComfyUI caches its own listings)."""

    def __init__(self, folder_paths: Any | None) -> None:
        self.folder_paths = folder_paths
        self._folders_of: dict[str, list[str]] = {}   # file name -> the model folders that list it

    def refresh(self) -> None:
        fp = self.folder_paths
        if fp is None:
            return
        index: dict[str, list[str]] = {}
        for folder in list(getattr(fp, "folder_names_and_paths", {})):
            if folder in NOT_MODELS:
                continue
            try:
                names = fp.get_filename_list(folder)
            except Exception as e:  # an unreadable folder: its files are simply not named by keys
                log.debug("cannot list model folder %s: %r", folder, e)
                continue
            for name in names:
                index.setdefault(name, []).append(folder)
        self._folders_of = index

    def files_named(self, name: str) -> list[tuple[str, str]]:
        """(label, full path) of every model file this string names; [] for most strings (one dict lookup)."""
        folders = self._folders_of.get(name)
        if not folders:
            return []
        found = []
        for folder in folders:
            path = self.folder_paths.get_full_path(folder, name)
            if path is not None:
                found.append((f"{folder}/{name}", path))
        return found

    def embeddings_in(self, text: str) -> list[tuple[str, str]]:
        """(label, full path) of every embedding file an `embedding:NAME` of this text can load."""
        if "embedding:" not in text or self.folder_paths is None:
            return []
        try:
            dirs = self.folder_paths.get_folder_paths("embeddings")
        except Exception:
            return []
        found = []
        for match in EMBEDDING.finditer(text):
            for name in _candidates(match.group(1)):
                for d in dirs:
                    for ext in EMBEDDING_EXTENSIONS:
                        path = os.path.join(d, name + ext)
                        if os.path.isfile(path):
                            found.append((f"embeddings/{name}{ext}", path))
        return found


def _candidates(token: str) -> set[str]:
    """The names ComfyUI may read out of one `embedding:` token: as written, without trailing commas (its
    fallback), and without a weight suffix or closing brackets (`(embedding:x:1.2)`). Each one that exists is
    counted, so the key covers whichever ComfyUI picks."""
    token = token.strip("\n")
    out = {token, token.strip(",")}
    base = token.split(":", 1)[0]
    out.update({base, base.rstrip(",)]"), token.rstrip(",)]")})
    return {name for name in out if name and ".." not in name.replace("\\", "/").split("/")}
