#!/usr/bin/env bash
# Prepares a machine to build, test, demo and benchmark chargefs. Idempotent.
# Usage: scripts/setup.sh [--release] [--daemon] [--no-build]
#   installs the Debian packages that are missing (apt-get update only then), checks /dev/fuse,
#   builds debug what ships (scripts/build.sh), and release too with --release; --daemon builds
#   only chargefsd and its helper (the demo's need). --no-build only installs.
# Env: SWIFT_SCRATCH=DIR builds into DIR instead of .build (--scratch-path).
set -euo pipefail
usage() { sed -n '2,7s/^# \{0,1\}//p' "$0"; }
release=0 build=1 only=()
for a in "$@"; do
  case "$a" in
    --release) release=1 ;;
    --no-build) build=0 ;;
    --daemon) only=(--daemon) ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

# Build: libfuse3-dev pkg-config gcc (metabench). Run: fuse3 (fusermount3, mount.fuse3).
# Tests: user-mode-linux busybox-static kmod, or qemu-system-x86 cpio xz-utils where UML cannot
# boot (cgroup v2 in a guest kernel: scripts/vm-run.sh), attr (getfattr), util-linux
# (fallocate, setpriv, taskset), procps (pgrep), psmisc (fuser), python3, fio, coreutils.
# CSI tests: python3-pip (grpcio below), python3-yaml (manifest check). Container tests and the
# image (deploy/build-image.sh): podman, runc (crun refuses hybrid cgroup hosts), debootstrap.
packages=(libfuse3-dev fuse3 pkg-config gcc libc6-dev user-mode-linux busybox-static kmod
          qemu-system-x86 cpio xz-utils fio attr
          util-linux procps psmisc python3 coreutils findutils gawk python3-pip python3-yaml
          podman runc debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=(); [ "$(id -u)" = 0 ] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: Debian packages present"
fi

# /dev/fuse
if [ ! -c /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
  [ -c /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
fi
[ -c /dev/fuse ] || { echo "setup: /dev/fuse is missing and could not be created" >&2; exit 1; }
echo "setup: /dev/fuse present"

# The CSI tests' gRPC client: grpcio from PyPI for Debian's /usr/bin/python3 (the python that
# exists inside User-Mode Linux too), in .build-csi-py/ (not under /root or /tmp, which are fresh
# tmpfs in the guest). Pinned, so every machine tests with the same client.
csi_py=$repo/.build-csi-py
csi_py_pkgs=(grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2)
if PYTHONPATH=$csi_py /usr/bin/python3 -c 'import grpc, grpc_tools, google.protobuf' 2>/dev/null; then
  echo "setup: grpcio present in .build-csi-py"
else
  echo "setup: pip install --target .build-csi-py ${csi_py_pkgs[*]}"
  /usr/bin/python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --root-user-action=ignore --upgrade --target "$csi_py" "${csi_py_pkgs[@]}"
fi

# The cgroup v2 guest: a probe boot picks User-Mode Linux or QEMU; QEMU's kernel is fetched now.
echo "setup: cgroup v2 guest: $(bash "$repo/scripts/vm-run.sh" --which)"
bash "$repo/scripts/vm-run.sh" --prepare

[ "$build" = 1 ] || exit 0
bash "$repo/scripts/build.sh" "${only[@]}" -c debug
[ "$release" = 0 ] || bash "$repo/scripts/build.sh" "${only[@]}" -c release
