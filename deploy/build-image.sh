#!/usr/bin/env bash
# Builds the chargefs-csi image on this machine with no registry: a Debian 12 base made with
# debootstrap from the package mirror apt uses (cached in .build-image/ and as the podman image
# localhost/chargefs-base:bookworm), the three binaries built here (release, static Swift
# runtime), deploy/Containerfile.prebuilt. Prints the image's size. Where registries are
# reachable, deploy/Containerfile builds the same image from docker.io images.
# Usage: deploy/build-image.sh [--tag IMAGE] [--bin-dir DIR] [--no-build]
#   --tag IMAGE    default localhost/chargefs-csi:0.1.0
#   --bin-dir DIR  take chargefsd, chargefs-charge-helper and chargefs-csi from DIR (default: the
#                  release build's folder, built first unless --no-build)
# Env: MIRROR (default: the first http(s) Debian mirror in apt's sources), PODMAN_RUNTIME (runc:
#      crun 1.8 refuses hybrid cgroup hosts)
set -euo pipefail
usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }
tag=localhost/chargefs-csi:0.1.0 bin_dir= build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a value}; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-image.sh: unknown argument \"$1\" (see --help)" >&2; exit 2 ;;
  esac
done
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=$repo/.build-image
base_image=localhost/chargefs-base:bookworm
runtime=${PODMAN_RUNTIME:-runc}
# podman's default ulimits exceed what an unprivileged-resource session may set; runc refuses them
podman_opts=(--runtime "$runtime")
build_opts=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
command -v podman >/dev/null || { echo "build-image.sh: podman is not installed (scripts/setup.sh installs it)" >&2; exit 1; }

# 1. The base: a minimal Debian 12 with what the image needs at run time.
if ! podman image exists "$base_image"; then
  rootfs=$cache/base-bookworm
  if [ ! -x "$rootfs/usr/bin/nsenter" ] || [ ! -x "$rootfs/usr/bin/fusermount3" ]; then
    command -v debootstrap >/dev/null || { echo "build-image.sh: debootstrap is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
    # Comment lines are skipped: Debian's images name a snapshot.debian.org mirror in a comment.
    mirror=${MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
      grep -vE '^[[:space:]]*#' | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "build-image.sh: debootstrap bookworm from $mirror into $rootfs"
    rm -rf "$rootfs.tmp"; mkdir -p "$cache"
    debootstrap --variant=minbase --include=fuse3,libfuse3-3,attr bookworm "$rootfs.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -n 20 "$cache/debootstrap.log" >&2; echo "build-image.sh: debootstrap failed (log: $cache/debootstrap.log)" >&2; exit 1; }
    rm -rf "$rootfs"; mv "$rootfs.tmp" "$rootfs"
  fi
  echo "build-image.sh: importing $rootfs as $base_image"
  # without apt's downloaded packages and lists: the image never runs apt
  tar -C "$rootfs" --exclude=./var/cache/apt/archives/'*.deb' --exclude=./var/lib/apt/lists/'*' \
    --exclude=./proc/'*' --exclude=./sys/'*' --exclude=./dev/'*' -c . \
    | podman import --change 'CMD ["/bin/bash"]' - "$base_image" >"$cache/import.log" 2>&1
fi

# 2. The binaries.
if [ -z "$bin_dir" ]; then
  if [ "$build" = 1 ]; then
    command -v swift >/dev/null || export PATH=$PATH:/opt/swift/usr/bin
    for p in chargefsd chargefs-charge-helper chargefs-keeper chargefs-csi; do
      echo "build-image.sh: swift build -c release --static-swift-stdlib --product $p"
      (cd "$repo" && swift build -c release --static-swift-stdlib --product "$p" >"$cache/swift-build-$p.log" 2>&1) \
        || { tail -n 20 "$cache/swift-build-$p.log" >&2; exit 1; }
    done
  fi
  bin_dir=$(cd "$repo" && swift build -c release --show-bin-path 2>/dev/null || echo "$repo/.build/release")
fi
ctx=$cache/context
rm -rf "$ctx"; mkdir -p "$ctx"
for p in chargefsd chargefs-charge-helper chargefs-keeper chargefs-csi; do
  [ -x "$bin_dir/$p" ] || { echo "build-image.sh: $bin_dir/$p is missing (build it, or drop --no-build)" >&2; exit 1; }
  cp "$bin_dir/$p" "$ctx/"
  # without DWARF (symbols stay, for backtraces): the release chargefs-csi is 160 MB with it
  if command -v strip >/dev/null; then strip --strip-debug "$ctx/$p"; fi
done
cp "$repo/deploy/bundle-daemon.sh" "$repo/deploy/Containerfile.prebuilt" "$ctx/"
# Libraries outside the system's folders (a debug build links the Swift runtime of the
# toolchain) go into the image at the same paths, where the binaries' RUNPATH looks for them.
mkdir -p "$ctx/rootfs"
for p in chargefsd chargefs-charge-helper chargefs-keeper chargefs-csi; do
  for l in $(ldd "$ctx/$p" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do
    case "$l" in /lib/*|/usr/lib/*|/lib64/*) continue ;; esac
    mkdir -p "$ctx/rootfs$(dirname "$l")"; cp -L "$l" "$ctx/rootfs$l"
  done
done

# 3. The image.
echo "build-image.sh: podman build $tag"
podman "${podman_opts[@]}" build --pull=never "${build_opts[@]}" --build-arg BASE="$base_image" \
  -f "$ctx/Containerfile.prebuilt" -t "$tag" "$ctx" >"$cache/podman-build.log" 2>&1 \
  || { tail -n 20 "$cache/podman-build.log" >&2; echo "build-image.sh: podman build failed (log: $cache/podman-build.log)" >&2; exit 1; }
rm -rf "$ctx"
size=$(podman image inspect --format '{{.Size}}' "$tag")
base_size=$(podman image inspect --format '{{.Size}}' "$base_image")
awk -v t="$tag" -v s="$size" -v b="$base_size" 'BEGIN { printf "build-image.sh: %s: %.1f MB (base %.1f MB, chargefs layers %.1f MB)\n", t, s / 1e6, b / 1e6, (s - b) / 1e6 }'
