"""Which strings of a cache key name files in ComfyUI's model folders, and where those files are.

ComfyUI's cache key holds a loader's inputs as they were typed: `("ckpt_name", "model.safetensors")`. Any string
of a key that names a file in one of ComfyUI's model folders (`folder_paths`: checkpoints, loras, vae,
upscale_models, controlnet, clip, diffusion_models, embeddings, ...) is taken to name that file, whichever node
and input holds it; so is an `embedding:NAME` inside prompt text, resolved as ComfyUI's tokenizer resolves it.
Matching every string, not known loader inputs, covers custom loaders too; a string that names a file by
accident only makes a key narrower, never wrong.

A name found in several folders names all of them (the key then carries every one's identity).

Two ways a string is found to name a file, so that nothing here walks the folders on ComfyUI's prompt thread:
- the folders' listings (ComfyUI's `get_filename_list`, cached by ComfyUI), rebuilt every few seconds on a
  thread of ours (a fleet host may hold 50,000 LoRAs: re-checking them took 17-25 ms a prompt);
- and, for a file added since the last listing, a direct `get_full_path` of any string whose extension one of the
  folders takes: a new file is never missed, and most strings ("a cat", "seed") cost one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

log = logging.getLogger("comfy_mesh")

NOT_MODELS = {"custom_nodes"}  # folders of folder_paths that hold code, not model files (code: packs.py)
EMBEDDING = re.compile(r"embedding:([^\s]+)")
EMBEDDING_EXTENSIONS = ("", ".safetensors", ".pt", ".bin")  # as comfy/sd1_clip.py's load_embed tries them
REFRESH_SECONDS = 5.0


class ModelFolders:
    """A view of ComfyUI's `folder_paths`: listings refreshed in the background, files found by name."""

    def __init__(self, folder_paths: Any | None, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.folder_paths = folder_paths
        # ComfyUI's own function, taken before the provider watches it (identity.py): finding what a key names
        # is not a node opening a file.
        self.get_full_path = getattr(folder_paths, "get_full_path", None)
        self.refresh_seconds = refresh_seconds
        self._folders_of: dict[str, list[str]] = {}      # listed file name -> the model folders that list it
        self._by_extension: dict[str, list[str]] = {}    # ".safetensors" -> the folders that take it
        self._embeddings: set[str] = set()                # listed embedding files, relative to their root
        self._embedding_dirs: list[str] = [""]            # their folders, as load_embed expands them
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ModelFolders:
        self.refresh()
        if self.folder_paths is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mesh-model-folders", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            self.refresh()

    def close(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        fp = self.folder_paths
        if fp is None:
            return
        index: dict[str, list[str]] = {}
        by_extension: dict[str, list[str]] = {}
        embeddings: set[str] = set()
        for folder, (_, extensions) in list(getattr(fp, "folder_names_and_paths", {}).items()):
            if folder in NOT_MODELS:
                continue
            for ext in extensions or ():
                if ext:
                    by_extension.setdefault(str(ext).lower(), []).append(folder)
            try:
                names = fp.get_filename_list(folder)
            except Exception as e:  # an unreadable folder: its files are found by the direct check alone
                log.debug("cannot list model folder %s: %r", folder, e)
                continue
            for name in names:
                index.setdefault(name, []).append(folder)
            if folder == "embeddings":
                embeddings = set(names)
        dirs = {""} | {os.path.dirname(n) for n in embeddings}
        for d in list(dirs):  # every parent too: load_embed tries each folder under the root
            while d:
                d = os.path.dirname(d)
                dirs.add(d)
        with self._lock:
            self._folders_of, self._by_extension = index, by_extension
            self._embeddings, self._embedding_dirs = embeddings, sorted(dirs)

    def files_named(self, name: str) -> list[tuple[str, str]]:
        """(label, full path) of every model file this string names; [] for most strings (a dict lookup)."""
        folders = self._folders_of.get(name)
        ext = os.path.splitext(name)[1].lower() if "." in name and len(name) < 1024 else ""
        direct = self._by_extension.get(ext) if ext else None
        if not folders and not direct:
            return []
        found = []
        for folder in dict.fromkeys((folders or []) + (direct or [])):
            try:
                path = self.get_full_path(folder, name)
            except Exception:
                path = None
            if path is not None:
                found.append((f"{folder}/{name}", path))
        return found

    def embeddings_in(self, text: str) -> list[tuple[str, str]]:
        """(label, full path) of every embedding file an `embedding:NAME` of this text can load: in any folder
        under the embeddings roots (ComfyUI searches them all), with or without an extension."""
        if "embedding:" not in text or self.folder_paths is None:
            return []
        try:
            roots = self.folder_paths.get_folder_paths("embeddings")
        except Exception:
            return []
        with self._lock:
            listed, dirs = self._embeddings, self._embedding_dirs
        found: dict[str, str] = {}
        for match in EMBEDDING.finditer(text):
            for name in _candidates(match.group(1)):
                for ext in EMBEDDING_EXTENSIONS:
                    for d in dirs:
                        rel = _inside(d, name + ext)
                        if rel is None:
                            continue
                        if rel in listed or not d:  # not listed: a file the listing filters out, at the root
                            for root in roots:
                                path = os.path.join(root, rel)
                                if os.path.isfile(path):
                                    found[f"embeddings/{rel}"] = path
        return sorted(found.items())


def _inside(folder: str, name: str) -> str | None:
    """`name` joined to `folder` (relative to an embeddings root), or None where it leaves that folder (load_embed
    refuses those)."""
    if os.path.isabs(name):
        return None
    joined = os.path.normpath(os.path.join(folder, name))
    if joined == ".." or joined.startswith(".." + os.sep) or (folder and not joined.startswith(folder + os.sep)):
        return None
    return joined


def _candidates(token: str) -> set[str]:
    """The names ComfyUI may read out of one `embedding:` token: as written, without trailing commas (its
    fallback), and without a weight suffix or closing brackets (`(embedding:x:1.2)`). Each one that exists is
    counted, so the key covers whichever ComfyUI picks."""
    token = token.strip("\n")
    out = {token, token.strip(",")}
    base = token.split(":", 1)[0]
    out.update({base, base.rstrip(",)]"), token.rstrip(",)]")})
    return {name for name in out if name}
