"""One install story for ComfyUI hosts, tried as users do it, with real clones, venvs, pip and wheels:

- ComfyUI-Manager / comfy-cli / a person: the repository cloned into `ComfyUI/custom_nodes/`, its
  requirements.txt pip-installed into a fresh Python that has no comfy-mesh, the folder imported the way
  ComfyUI's `nodes.load_custom_node` imports it;
- `mesh install-comfyui --python PY` from a wheel: comfy-mesh lands in that other Python;
- `pip install -e .` from a fresh clone: the committed generated code imports.

The clones are of this repository's committed state (HEAD), as the Manager fetches it: commit a change to the
root entry, provider/ or mesh/ before these tests can see it. Each builds venvs and runs pip: marked slow.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.shell import sh

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "tests" / "support" / "comfy_harness.py"
SECRET = "install-test-secret"


def clone(dest: Path) -> Path:
    """A git clone of this repository's committed state (what the Manager fetches), at `dest`."""
    sh("git", "clone", "-q", REPO, dest)
    return dest


def venv(path: Path) -> Path:
    """A fresh venv (no comfy-mesh in it); its python."""
    sh(sys.executable, "-m", "venv", path)
    return path / "bin" / "python"


def fake_comfyui(root: Path) -> Path:
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("# a fake ComfyUI\n")
    return root


def requirement_names(lines: list[str]) -> list[str]:
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_requirements_txt_is_pyprojects_dependencies_without_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = requirement_names((REPO / "requirements.txt").read_text().splitlines())
    assert requirements == project["dependencies"]
    assert not any(r.lower().startswith("torch") for r in requirements)  # ComfyUI brings its own build


def test_registry_metadata_is_complete() -> None:
    """What `comfy node publish` reads (https://docs.comfy.org/registry/specifications)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy, project = data["tool"]["comfy"], data["project"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert isinstance(comfy["includes"], list)
    assert project["urls"]["Repository"].startswith("https://") and project["license"]
    assert any(c.startswith("Operating System ::") for c in project["classifiers"])
    assert (REPO / comfy["Icon"].split("/main/", 1)[1]).is_file()  # the icon the URL names is in the repository


# ComfyUI 0.21's nodes.load_custom_node, the part that imports a custom-node folder (nodes.py): the folder is a
# package named by its path, built from its __init__.py; WEB_DIRECTORY is taken relative to the folder.
LOAD_AS_COMFYUI = r"""
import importlib.util, json, logging, os, sys, types
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
how = json.loads(sys.argv[1])
registered = []
if how["mode"] != "bare":  # inside ComfyUI: its `nodes` module is there
    nodes = types.ModuleType("nodes"); nodes.NODE_CLASS_MAPPINGS = {}; nodes.load_custom_node = lambda *a: None
    sys.modules["nodes"] = nodes
if how["mode"] == "comfy":  # and its cache API, as the provider uses it (tests/test_provider.py fakes it alike)
    spec = importlib.util.spec_from_file_location("comfy_harness_stub", how["harness"])
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # by path: the test's own support, not a package of the clone's
    spec.loader.exec_module(harness)
    sys.modules["folder_paths"] = harness.fake_folder_paths(harness.Path(how["comfy"]))
    api = types.ModuleType("comfy_execution.cache_provider")
    api.CacheProvider, api.CacheValue = harness.CacheProvider, harness.CacheValue
    api._serialize_cache_key = harness.serialize_cache_key
    api._contains_self_unequal = harness.contains_self_unequal
    api.register_cache_provider, api.unregister_cache_provider = registered.append, registered.remove
    pkg = types.ModuleType("comfy_execution"); pkg.cache_provider = api
    sys.modules["comfy_execution"], sys.modules["comfy_execution.cache_provider"] = pkg, api
seen = []
for module_path in how["folders"]:
    sys_module_name = module_path.replace(".", "_x_")
    module_spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[sys_module_name] = module
    module_spec.loader.exec_module(module)
    web = getattr(module, "WEB_DIRECTORY", None)
    seen.append({
        "mappings": getattr(module, "NODE_CLASS_MAPPINGS", None),
        "display": getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None),
        "web": None if web is None else os.path.abspath(os.path.join(module_path, web)),
    })
mesh = sys.modules.get("mesh")
pb = None
if mesh is not None:
    try:
        import mesh.pb.mesh_pb2  # the committed generated code, with the protobuf that requirements.txt installed
        pb = True
    except ImportError:
        pb = False
print(json.dumps({
    "entries": seen, "mesh": getattr(mesh, "__file__", None), "pb": pb,
    "top_level": {n: importlib.util.find_spec(n) is not None for n in ("provider", "tests", "scripts")},
    "registered": [type(p).__name__ for p in registered],
}))
"""


def load_as_comfyui(python: Path, *folders: Path, mode: str, comfy: Path | None = None,
                    env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[dict, str]:
    """Load `folders` in that order as ComfyUI loads custom nodes, in `mode`: "bare" (no ComfyUI), "nodes" (its
    `nodes` module only), "comfy" (and the CacheProvider API): what was seen, and the log."""
    how = {"mode": mode, "folders": [str(f) for f in folders], "harness": str(HARNESS), "comfy": str(comfy)}
    done = sh(python, "-c", LOAD_AS_COMFYUI, json.dumps(how), env=env, cwd=cwd, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_a_clone_in_custom_nodes_loads_and_registers_with_only_its_requirements(tmp_path: Path) -> None:
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    folder = clone(comfy / "custom_nodes" / "comfy-mesh")
    # The provider's WEB_DIRECTORY (the web page's extension) is relative to provider/: the root entry passes it on.
    assert (folder / "provider" / "web" / "comfy_mesh.js").is_file()
    python = venv(tmp_path / "venv")
    # Before its requirements are installed, ComfyUI's log names the command that installs them, with real paths.
    seen, log = load_as_comfyui(python, folder, mode="nodes", cwd=tmp_path)
    assert seen["registered"] == [] and seen["pb"] is False
    assert f"install it into ComfyUI's Python: {python} -m pip install -r {folder / 'requirements.txt'}" in log, log

    sh(python, "-m", "pip", "install", "-q", "-r", folder / "requirements.txt")  # all the Manager does
    assert "comfy-mesh" not in sh(python, "-m", "pip", "list").stdout  # comfy-mesh itself is not installed
    assert sh(python, "-c", "import mesh", cwd=tmp_path, ok=False).returncode != 0

    # Outside ComfyUI (no `nodes` module): the entry loads, exports its mappings, starts nothing.
    seen, log = load_as_comfyui(python, folder, mode="bare", cwd=tmp_path)
    entry = seen["entries"][0]
    assert entry["mappings"] == {} and entry["display"] == {} and seen["registered"] == []
    assert entry["web"] == str(folder / "provider" / "web")
    assert Path(seen["mesh"]).is_relative_to(folder) and seen["pb"] is True
    assert seen["top_level"] == {"provider": False, "tests": False, "scripts": False}  # the clone shadows nothing
    assert f"from the clone at {folder}" in log

    # Inside ComfyUI (its modules faked; torch is ComfyUI's, taken from this test's Python): the provider
    # registers with the CacheProvider API, as `mesh install-comfyui` makes it do.
    import torch

    site = next((python.parent.parent / "lib").glob("python3*/site-packages"))
    (site / "zz-comfyui-torch.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    env = {"MESH_SECRET": SECRET, "MESH_LISTEN": "127.0.0.1:0", "MESH_MIN_FREE_RAM": "0",
           "MESH_IDENTITY_CACHE": str(tmp_path / "identities.json")}
    seen, log = load_as_comfyui(python, folder, mode="comfy", comfy=comfy, env=env, cwd=tmp_path)
    assert seen["registered"] == ["MeshCacheProvider"], log
    assert Path(seen["mesh"]).is_relative_to(folder)
    assert "comfy-mesh: embedded node" in log


@pytest.mark.slow
def test_the_clone_wins_over_an_installed_comfy_mesh_and_says_so(tmp_path: Path) -> None:
    """This test's Python has comfy-mesh installed (editable, the main checkout): a clone in custom_nodes/ uses
    its own mesh and provider, and the log names both copies."""
    found = sh(sys.executable, "-c", "import mesh; print(mesh.__file__)", cwd=tmp_path, ok=False)
    if found.returncode != 0:
        pytest.skip("comfy-mesh is not installed in this Python (make install installs it, editable)")
    installed = found.stdout.strip()
    folder = clone(fake_comfyui(tmp_path / "ComfyUI") / "custom_nodes" / "comfy-mesh")
    assert not Path(installed).is_relative_to(folder)
    seen, log = load_as_comfyui(Path(sys.executable), folder, mode="bare", cwd=tmp_path)
    assert Path(seen["mesh"]).is_relative_to(folder)
    assert f"from the clone at {folder}; it wins over the installed copy" in log
    assert f"mesh at {Path(installed).parent}" in log


@pytest.mark.slow
@pytest.mark.parametrize("clone_first", [True, False])
def test_a_clone_and_an_install_comfyui_link_register_one_provider(tmp_path: Path, clone_first: bool) -> None:
    """Both in custom_nodes/ (a clone from the Manager, a link from `mesh install-comfyui`): whichever ComfyUI
    loads first registers; the other says so and does nothing."""
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    folder = clone(comfy / "custom_nodes" / "comfy-mesh")
    link = comfy / "custom_nodes" / "comfy_mesh"
    link.symlink_to(folder / "provider", target_is_directory=True)
    env = {"MESH_SECRET": SECRET, "MESH_LISTEN": "127.0.0.1:0", "MESH_MIN_FREE_RAM": "0",
           "MESH_IDENTITY_CACHE": str(tmp_path / "identities.json")}
    order = (folder, link) if clone_first else (link, folder)
    seen, log = load_as_comfyui(Path(sys.executable), *order, mode="comfy", comfy=comfy, env=env, cwd=tmp_path)
    assert seen["registered"] == ["MeshCacheProvider"], log
    assert log.count("comfy-mesh: embedded node") == 1
    if clone_first:
        assert f"comfy-mesh: already loaded from {folder / 'provider' / '__init__.py'}" in log
    else:
        assert f"the clone at {folder} is not loaded: another copy of comfy-mesh is" in log


@pytest.mark.slow
def test_b_install_comfyui_from_a_wheel_puts_comfy_mesh_into_comfyuis_python(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, REPO)
    wheel = next(dist.glob("comfy_mesh-*.whl"))
    cli_python = venv(tmp_path / "cli-venv")
    sh(cli_python, "-m", "pip", "install", "-q", wheel)
    mesh = cli_python.parent / "mesh"
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    comfy_python = venv(tmp_path / "comfy-venv")  # ComfyUI's own Python: no comfy-mesh
    probe = "import mesh, comfy_mesh_provider, mesh.pb.mesh_pb2; print(mesh.__version__, comfy_mesh_provider.__file__)"
    assert sh(comfy_python, "-c", probe, cwd=tmp_path, ok=False).returncode != 0

    # Without --python nothing is put into ComfyUI's Python, and the output says exactly what to run.
    told = sh(mesh, "install-comfyui", comfy, cwd=tmp_path)
    assert "NOT installed" in told.stdout and f"mesh install-comfyui {comfy} --python" in told.stdout
    assert f"-m pip install {wheel}" in told.stdout
    # ComfyUI then says the same, with its own Python's path, and names no package that exists nowhere.
    seen, log = load_as_comfyui(comfy_python, comfy / "custom_nodes" / "comfy_mesh", mode="nodes", cwd=tmp_path)
    assert seen["registered"] == [] and seen["entries"][0]["mappings"] == {}
    assert f"mesh install-comfyui {comfy} --python {comfy_python}" in log, log
    assert "pip install comfy-mesh" not in log

    # With --python: the wheel it was installed from goes into ComfyUI's Python; the link is that Python's.
    done = sh(mesh, "install-comfyui", comfy, "--python", comfy_python, "--force", cwd=tmp_path)
    assert f"installing the wheel {wheel}" in done.stdout
    version, provider_file = sh(comfy_python, "-c", probe, cwd=tmp_path).stdout.split()
    link = comfy / "custom_nodes" / "comfy_mesh"
    assert link.resolve() == Path(provider_file).parent.resolve()
    assert link.resolve().is_relative_to((tmp_path / "comfy-venv").resolve())

    # The wheel gone (a temporary download): one rebuilt from the installed files, byte for byte what pip put there.
    sh(comfy_python, "-m", "pip", "uninstall", "-q", "-y", "comfy-mesh")
    wheel.unlink()
    again = sh(mesh, "install-comfyui", comfy, "--python", comfy_python, "--force", cwd=tmp_path)
    assert f"comfy-mesh {version} as installed at" in again.stdout
    assert sh(comfy_python, "-c", probe, cwd=tmp_path).stdout.split()[0] == version

    # A Python that cannot be run is an error naming it, never a silent exit 0.
    bad = sh(mesh, "install-comfyui", comfy, "--python", tmp_path / "no-python", "--force", cwd=tmp_path, ok=False)
    assert bad.returncode == 1 and "no-python" in bad.stderr


@pytest.mark.slow
def test_c_pip_install_editable_from_a_fresh_clone_imports_the_generated_code(tmp_path: Path) -> None:
    folder = clone(tmp_path / "comfy-mesh")
    python = venv(tmp_path / "venv")
    sh(python, "-m", "pip", "install", "-q", "-e", folder)
    where = sh(python, "-c", "import mesh.pb.mesh_pb2 as pb, comfy_mesh_provider as p; print(pb.__file__, p.__file__)",
               cwd=tmp_path).stdout.split()
    assert Path(where[0]) == folder / "mesh" / "pb" / "mesh_pb2.py"
    assert Path(where[1]) == folder / "provider" / "__init__.py"


ONE_CONFTEST = '''
import sys

def test_one_conftest(request):
    from tests.conftest import SECRET  # as the suite's tests import it
    loaded = [p for p in request.config.pluginmanager.get_plugins()
              if str(getattr(p, "__file__", "")).endswith("conftest.py")]
    assert [m.__name__ for m in loaded] == [__name__.rsplit(".", 1)[0] + ".conftest"]
    assert sys.modules["tests.conftest"] is loaded[0]
'''


@pytest.mark.slow
def test_pytest_runs_in_a_checkout_whose_folder_name_makes_it_a_package(tmp_path: Path) -> None:
    """A checkout in `comfy_mesh/` (a valid package name, unlike `comfy-mesh`) is a package for pytest because of
    the root __init__.py: its tests still run, with one conftest module."""
    folder = clone(tmp_path / "comfy_mesh")
    (folder / "tests" / "test_zz_one_conftest.py").write_text(ONE_CONFTEST)
    done = sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_zz_one_conftest.py",
              "tests/test_layers.py", cwd=folder, env={"PYTHONPATH": str(folder)}, ok=False, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
