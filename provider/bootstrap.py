"""Loading comfy-mesh from a clone in `ComfyUI/custom_nodes/` (ComfyUI-Manager, comfy-cli, a plain git clone).

ComfyUI imports a custom-node folder as a package by its path, and the Manager only runs
`pip install -r requirements.txt`: comfy-mesh itself is never pip-installed, so `import mesh` (which the provider
does) would fail. The repository's root `__init__.py` calls `enter()`, which loads this clone's `mesh` package and
its provider (as `comfy_mesh_provider`, the name the wheel gives it) straight from the clone's folders, without
putting the clone's root on `sys.path`: that would make its `tests`, `scripts` and `provider` folders top-level
packages and shadow other packages of those names.

Which copy wins is a decision, not an accident of `sys.path`: the clone does. It is the copy the user installed
in ComfyUI and the one the Manager updates, and its provider must run with its own `mesh` (a provider on one
version and a `mesh` of another is never tried). A pip-installed comfy-mesh in the same Python is shadowed for
this process, and the log says so, with both paths. If another copy was already imported (a `custom_nodes/comfy_mesh`
link from `mesh install-comfyui` loaded first), the clone steps aside and says so: two providers in one ComfyUI
would register twice.

Only the standard library here: this module runs before `mesh` can be imported.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger("comfy_mesh")

MESH = "mesh"
PROVIDER = "comfy_mesh_provider"  # the wheel's name for provider/: a top-level "provider" would shadow others


@dataclass(frozen=True)
class Clone:
    """A comfy-mesh checkout: its root holds mesh/, provider/ and requirements.txt."""

    root: Path

    @property
    def folders(self) -> dict[str, Path]:
        return {MESH: self.root / "mesh", PROVIDER: self.root / "provider"}

    def holds(self, module: ModuleType) -> bool:
        where = _where(module)
        return where is not None and where.resolve().is_relative_to(self.root.resolve())


def _where(module: ModuleType) -> Path | None:
    path = getattr(module, "__file__", None)
    return Path(path).parent if path else None


def _installed(name: str) -> Path | None:
    """Where `import name` would find a package on sys.path (a pip install, editable or not), if anywhere."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def _load(name: str, folder: Path) -> ModuleType:
    """Import the package in `folder` under `name`; its submodules and relative imports resolve inside `folder`."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name} from {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        raise
    return module


def install_hint(module_name: str, module_file: str) -> str:
    """What to run so that ComfyUI's Python (this one) can import comfy-mesh and its requirements: real paths,
    never a guessed package name. `module_name`, `module_file`: the provider entry's own, as ComfyUI loaded it
    (a clone's entry is named PROVIDER; a `custom_nodes/comfy_mesh` link is named by its path)."""
    python = sys.executable or "python"
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "mesh").is_dir():
        if module_name == PROVIDER:  # loaded by the root __init__.py of a clone: what the Manager runs
            return f"{python} -m pip install -r {checkout / 'requirements.txt'}"
        return f"{python} -m pip install -e {checkout}"  # custom_nodes/comfy_mesh linked to a checkout's provider/
    entry = Path(module_file).parent  # custom_nodes/comfy_mesh, linked or copied from an installed wheel
    comfy = entry.parent.parent if entry.parent.name == "custom_nodes" else "<ComfyUI folder>"
    return (f"mesh install-comfyui {comfy} --python {python} (with the `mesh` of the comfy-mesh installation that "
            f"made this link), or {python} -m pip install <that comfy-mesh wheel>")


def enter(root: Path) -> ModuleType | None:
    """Load this clone's `mesh` and provider; the provider module (which registers itself inside ComfyUI), or
    None when another copy of comfy-mesh is already loaded in this process."""
    clone = Clone(root)
    for name in (MESH, PROVIDER):
        loaded = sys.modules.get(name)
        if loaded is not None and not clone.holds(loaded):
            log.warning("comfy-mesh: the clone at %s is not loaded: another copy of comfy-mesh is (%s from %s); "
                        "keep one of them in custom_nodes/", root, name, _where(loaded))
            return None
    shadowed = {name: found for name in (MESH, PROVIDER)
                if (found := _installed(name)) is not None and not found.resolve().is_relative_to(root.resolve())}
    mesh = sys.modules.get(MESH) or _load(MESH, clone.folders[MESH])
    version = getattr(mesh, "__version__", "?")
    if shadowed:
        log.info("comfy-mesh: %s from the clone at %s; it wins over the installed copy in this ComfyUI (%s)",
                 version, root, ", ".join(f"{name} at {path}" for name, path in shadowed.items()))
    else:
        log.info("comfy-mesh: %s from the clone at %s", version, root)
    return sys.modules.get(PROVIDER) or _load(PROVIDER, clone.folders[PROVIDER])
