"""`mesh install-comfyui`: the comfy-mesh provider in a ComfyUI folder, and comfy-mesh in ComfyUI's own Python.

ComfyUI often runs on a Python of its own (a venv, a portable build), not the one `mesh` was installed into. The
provider it loads from `custom_nodes/comfy_mesh` imports `mesh`, so that Python needs this very comfy-mesh:
from a checkout `pip install -e` of it; from a wheel the wheel it was installed from when it is still on disk,
else a wheel rebuilt from the installed files (what pip installed, byte for byte: no package name is guessed,
none is on an index). With `--python` the install is done and checked (the ComfyUI Python then imports comfy-mesh
of this version), and the link points at that Python's own provider, so the two can never drift apart; without it
the command says exactly what to run, with the real paths.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import mesh

DIST = "comfy-mesh"
PIP_TIMEOUT = 900.0  # seconds: pip may download grpcio and friends on a slow link
PROBE_TIMEOUT = 120.0
PROBE = ("import json, mesh, comfy_mesh_provider, mesh.pb.mesh_pb2; "
         "print(json.dumps({'version': mesh.__version__, 'provider': comfy_mesh_provider.__path__[0]}))")


class InstallError(Exception):
    """Installing into ComfyUI failed; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """This comfy-mesh, as pip can install it elsewhere."""

    provider: Path  # this installation's provider folder
    pip_args: tuple[str, ...]  # after `pip install`; empty: a wheel must be rebuilt from the installed files
    what: str  # for people: "the checkout at ...", "the wheel ...", ...


def locate() -> Source:
    """Where this comfy-mesh came from: a checkout, the wheel it was installed from, or only its installed files."""
    root = Path(mesh.__file__).resolve().parent.parent
    if (root / "provider" / "__init__.py").is_file() and (root / "pyproject.toml").is_file():
        return Source(root / "provider", ("-e", str(root)), f"the checkout at {root}")
    spec = importlib.util.find_spec("comfy_mesh_provider")
    if spec is None or spec.origin is None:
        raise InstallError("the comfy-mesh provider (comfy_mesh_provider) is not installed with this mesh package")
    provider = Path(spec.origin).parent
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise InstallError(f"mesh at {root} is not an installed {DIST} distribution nor a checkout") from None
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct.get("url", "")
    if url.startswith("file://"):
        path = Path(unquote(urlparse(url).path))
        if "archive_info" in direct and path.is_file():
            return Source(provider, (str(path),), f"the wheel {path}")
        if "dir_info" in direct and (path / "pyproject.toml").is_file():
            args = ("-e", str(path)) if direct["dir_info"].get("editable") else (str(path),)
            return Source(provider, args, f"the source folder {path}")
    return Source(provider, (), f"{DIST} {dist.version} as installed at {provider.parent}")


def repack(out_dir: Path) -> Path:
    """A wheel of the installed comfy-mesh rebuilt from its RECORD: the files pip installed, and a fresh RECORD."""
    dist = importlib.metadata.distribution(DIST)
    info = next((f for f in dist.files or () if f.name == "WHEEL" and f.parent.name.endswith(".dist-info")), None)
    if info is None:
        raise InstallError(f"the installed {DIST} has no WHEEL record to rebuild a wheel from")
    tag = next((line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
                if line.startswith("Tag:")), "py3-none-any")
    info_dir = str(info.parent)
    skip = {f"{info_dir}/{name}" for name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    wheel = out_dir / f"{DIST.replace('-', '_')}-{dist.version}-{tag}.whl"
    record: list[str] = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry in dist.files or ():
            name = entry.as_posix()
            if name.startswith("..") or name in skip or "__pycache__" in entry.parts or name.endswith(".pyc"):
                continue  # scripts (pip writes them anew), installer records, byte code
            data = Path(dist.locate_file(entry)).read_bytes()
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return wheel


def probe(python: str) -> dict[str, str] | None:
    """The comfy-mesh that `python` imports ({"version", "provider"}), or None when it has none that works."""
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InstallError(f"cannot run ComfyUI's Python {python}: {e}") from None
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def pip_install(python: str, source: Source) -> None:
    """Install `source` into `python`, then check that it imports this version; raises InstallError otherwise."""
    with tempfile.TemporaryDirectory(prefix="comfy-mesh-wheel-") as tmp:
        args = source.pip_args or (str(repack(Path(tmp))),)
        cmd = [python, "-m", "pip", "install", *args]
        print(f"installing {source.what} into ComfyUI's Python: {' '.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, timeout=PIP_TIMEOUT).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InstallError(f"pip in ComfyUI's Python failed: {e}") from None
        if rc != 0:
            raise InstallError(f"pip exited {rc}: ComfyUI's Python {python} does not have comfy-mesh")


def install(comfyui_dir: str, python: str | None, copy: bool = False, force: bool = False) -> int:
    """Put comfy-mesh into ComfyUI (and into its Python when `python` is given); prints what it did."""
    source = locate()
    comfy = Path(comfyui_dir).expanduser().resolve()
    custom = comfy / "custom_nodes"
    if not (comfy / "main.py").exists() or not custom.is_dir():
        raise InstallError(f"{comfy} does not look like a ComfyUI folder (no main.py or custom_nodes/)")
    provider = source.provider
    if python:
        have = probe(python)
        if have is not None and have["version"] == mesh.__version__ and Path(have["provider"]) == provider:
            print(f"ComfyUI's Python {python} already has this comfy-mesh {mesh.__version__}")
        else:
            pip_install(python, source)
            have = probe(python)
            if have is None or have["version"] != mesh.__version__:
                raise InstallError(f"after pip, {python} imports comfy-mesh {have and have['version']}, "
                                   f"not {mesh.__version__}")
        provider = Path(have["provider"])  # the link uses that Python's own copy of the provider
    _link(provider, custom / "comfy_mesh", copy=copy, force=force)
    if python:
        print(f"ComfyUI's Python {python} has comfy-mesh {mesh.__version__} (provider at {provider})")
    else:
        hint = f"mesh install-comfyui {comfy} --python <ComfyUI's python>"
        guess = next((p for p in (comfy / "venv" / "bin" / "python", comfy / ".venv" / "bin" / "python")
                      if p.exists()), None)
        if guess is not None:
            hint = f"mesh install-comfyui {comfy} --python {guess}"
        direct = f", or <ComfyUI's python> -m pip install {' '.join(source.pip_args)}" if source.pip_args else ""
        print(f"ComfyUI's Python was not given (--python), so comfy-mesh is NOT installed into it; "
              f"run: {hint}{direct}")
    print("configure with MESH_* environment variables (see README.md), then restart ComfyUI")
    return 0


def _link(source: Path, target: Path, copy: bool, force: bool) -> None:
    if target.is_symlink() or target.exists():
        if target.is_symlink() and target.resolve() == source.resolve() and not copy:
            print(f"{target} already links to {source}")
            return
        if not force:
            raise InstallError(f"{target} exists; pass --force to replace it")
        target.unlink() if target.is_symlink() or target.is_file() else shutil.rmtree(target)
    if copy:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(source, target_is_directory=True)
    print(f"{'copied' if copy else 'linked'} {source} -> {target}")

