#!/bin/sh
# Install a comfy-mesh node as a systemd service on this host, from the wheel. Run as root:
#   sh install-systemd.sh comfy_mesh-0.1.0-py3-none-any.whl
# It creates what comfy-mesh.service (next to this script) needs, and keeps what is already there:
#   - the system user and group comfy-mesh (no login, no home of its own);
#   - the venv /opt/comfy-mesh with the wheel and its dependencies (Debian's pip refuses system installs:
#     PEP 668), owned by root, and /usr/local/bin/mesh linking to its `mesh` for the admin CLI;
#   - /etc/comfy-mesh, root:comfy-mesh 0750, holding the cluster secret (a new one unless there is one),
#     mesh.toml (a template unless there is one) and any TLS files you put there (*.pem), all root:comfy-mesh
#     0640: root writes them, the service reads them, nobody else does. Run it again after adding files;
#   - /var/lib/comfy-mesh, the data dir (systemd's StateDirectory= keeps it owned by the service user);
#   - /etc/systemd/system/comfy-mesh.service, then `systemctl daemon-reload` where systemd runs.
# Environment: PYTHON (the interpreter for the venv, default /usr/bin/python3, the system's, which the service
# user can run; Debian needs python3-venv),
# PIP_ARGS (extra `pip install` arguments, e.g. --no-index --find-links DIR on a host without an index),
# ROOT (install below this folder instead of /, for images and tests: no systemctl then).
set -eu

WHEEL=${1:?usage: install-systemd.sh WHEEL (build it with: pip wheel --no-deps -w dist .)}
ROOT=${ROOT:-}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x /usr/bin/python3 ] && PYTHON=/usr/bin/python3
fi
PIP_ARGS=${PIP_ARGS:-}
SERVICE_USER=comfy-mesh
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=/opt/comfy-mesh
ETC=/etc/comfy-mesh
DATA=/var/lib/comfy-mesh

[ -f "$WHEEL" ] || { echo "install-systemd.sh: no wheel at $WHEEL" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "install-systemd.sh: run it as root (it creates a user and writes /etc, /opt)" >&2; exit 2; }

# 1. The service user. With ROOT, useradd edits ROOT/etc/passwd and ROOT/etc/group.
if ! grep -q "^$SERVICE_USER:" "$ROOT/etc/passwd"; then
    useradd ${ROOT:+--prefix "$ROOT"} --system --user-group --home-dir "$DATA" --no-create-home \
        --shell /usr/sbin/nologin --comment "comfy-mesh node" "$SERVICE_USER"
    echo "created the system user $SERVICE_USER"
fi
# Numeric ids, read from the same files useradd wrote: with ROOT the host does not know the name.
uid=$(awk -F: -v u="$SERVICE_USER" '$1 == u { print $3 }' "$ROOT/etc/passwd")
gid=$(awk -F: -v u="$SERVICE_USER" '$1 == u { print $4 }' "$ROOT/etc/passwd")

# 2. The venv, root-owned: the service runs its code and cannot change it.
if [ ! -x "$ROOT$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$ROOT$VENV"
fi
# A venv runs its base interpreter where it lies: one below /root (pyenv) cannot be run by the service user.
# (setpriv itself execs with root's capabilities still held: the try must be exec'd by a shell as the user.)
# shellcheck disable=SC2016  # $0 is expanded by that shell
if ! setpriv --reuid="$uid" --regid="$gid" --clear-groups sh -c '"$0" -c ""' "$ROOT$VENV/bin/python" 2>/dev/null; then
    echo "install-systemd.sh: the user $SERVICE_USER cannot run $VENV/bin/python (it is $(readlink -f "$ROOT$VENV/bin/python")," \
         "in a folder only root may enter?): remove $ROOT$VENV and run again with PYTHON=/usr/bin/python3" >&2
    exit 1
fi
# shellcheck disable=SC2086  # PIP_ARGS is a list of arguments
"$ROOT$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade $PIP_ARGS "$WHEEL"
mkdir -p "$ROOT/usr/local/bin"
ln -sfn "$VENV/bin/mesh" "$ROOT/usr/local/bin/mesh"
echo "installed $("$ROOT$VENV/bin/mesh" --version) in $ROOT$VENV"

# 3. Settings and secrets: root:comfy-mesh, readable by the service, by nobody else.
install -d -o 0 -g "$gid" -m 0750 "$ROOT$ETC"
if [ ! -e "$ROOT$ETC/secret" ]; then
    "$ROOT$VENV/bin/mesh" secret "$ROOT$ETC/secret" >/dev/null
    echo "wrote a new cluster secret to $ROOT$ETC/secret: copy this file to every other host of the fleet"
fi
if [ ! -e "$ROOT$ETC/mesh.toml" ]; then
    cat > "$ROOT$ETC/mesh.toml" <<EOF
# comfy-mesh settings (README: Settings). Every host of the fleet: the same secret and seeds.
secret_file = "$ETC/secret"
# seeds = ["gpu1:8288", "gpu2:8288", "gpu3:8288"]
max_memory = "4GiB"
[serve]
listen = "0.0.0.0:8288"
data_dir = "$DATA"
metrics_listen = "0.0.0.0:9288"
EOF
    echo "wrote $ROOT$ETC/mesh.toml: set seeds (and TLS, see README Security) there"
fi
for f in "$ROOT$ETC"/secret "$ROOT$ETC"/mesh.toml "$ROOT$ETC"/mesh.env "$ROOT$ETC"/*.pem; do
    [ -f "$f" ] || continue
    case "$f" in */ca-key.pem) echo "warning: $f is the CA's key: keep it off the nodes" >&2 ;; esac
    chown "0:$gid" "$f"
    chmod 0640 "$f"
done

# 4. The data dir (StateDirectory= creates it too; here so that `mesh serve` runs without systemd as well).
install -d -o "$uid" -g "$gid" -m 0750 "$ROOT$DATA"

# 5. The unit.
install -d -m 0755 "$ROOT/etc/systemd/system"
install -m 0644 "$HERE/comfy-mesh.service" "$ROOT/etc/systemd/system/comfy-mesh.service"
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "next: edit $ETC/mesh.toml, then systemctl enable --now comfy-mesh"
else
    echo "installed $ROOT/etc/systemd/system/comfy-mesh.service (systemd is not running here: not enabled)"
fi
