#!/usr/bin/env bash
# 100 volumes on one node (cgroup v1, cgroupfs layout): publish N volumes for N pods one at a
# time, then N again 10 at once; publish/unpublish p50/p99, each idle daemon's and charge
# helper's RSS, PSS and threads and the cgroup that pays, the plugin's RSS, CPU while idle.
# Prints a Markdown table (deploy/kubernetes/README.md has the figures). Not part of the test
# suite (about 2 minutes). Root only; cleans up after itself.
# Usage: scripts/density.sh [--image IMAGE] [-n N] [-c CONCURRENCY]
#   --image IMAGE  run the plugin in a container of IMAGE as the DaemonSet does (podman, runc);
#                  default: chargefs-csi as a plain process from the build folder
# Env: CHARGEFSD (the build folder: chargefs-csi and chargefs-charge-helper beside it)
set -euo pipefail
image= n=100 conc=10
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=${2:?}; shift 2 ;;
    -n) n=${2:?}; shift 2 ;;
    -c) conc=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "density.sh: unknown argument \"$1\"" >&2; exit 2 ;;
  esac
done
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/tests/lib.sh
source "$repo/scripts/tests/lib.sh"
[ "$(id -u)" = 0 ] || die "density.sh needs root"
[ "$(cg_version)" = 1 ] || die "density.sh lays pods out in the v1 memory hierarchy (cgroupfs driver)"
export PYTHONPATH=$repo/.build-csi-py${PYTHONPATH:+:$PYTHONPATH}

scr=$(mktemp -d /tmp/chargefs-density.XXXXXX); chmod 755 "$scr"
kdir=$scr/kubelet; mkdir -p "$kdir"
mount --bind "$kdir" "$kdir"; mount --make-rshared "$kdir"
pdir=$kdir/plugins/csi.chargefs.io; mkdir -p "$pdir"
cgname=chargefs-density-$$
cgroot=/sys/fs/cgroup/memory/$cgname; mkdir -p "$cgroot"
ctr=chargefs-density-$$ plugin_pid=
cleanup() {
  set +e
  [ -z "$image" ] || podman --runtime runc rm -f -t 0 "$ctr" >/dev/null 2>&1
  [ -z "$plugin_pid" ] || [ -n "$image" ] || { kill "$plugin_pid"; wait "$plugin_pid"; } 2>/dev/null
  for m in $(awk -v d="$kdir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r); do umount "$m" || umount -l "$m"; done 2>/dev/null
  find "$kdir" -xdev -type d -exec chattr -i {} + 2>/dev/null
  umount "$kdir" 2>/dev/null || umount -l "$kdir"
  sleep 0.5
  for h in /sys/fs/cgroup/*/; do [ -d "$h$cgname" ] && find "$h$cgname" -depth -type d -exec rmdir {} \; 2>/dev/null; done
  rm -rf "$scr"
}
trap cleanup EXIT

common=(--endpoint "unix://$pdir/csi.sock" --node-id density --cgroup-root "$cgroot" --state-dir "$pdir/state" --daemon-cgroup csi.chargefs.io)
if [ -n "$image" ]; then
  podman --runtime runc run -d --name "$ctr" --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    --privileged --pid=host -v "$kdir:$kdir:rshared" -v /dev/fuse:/dev/fuse -v /sys/fs/cgroup:/sys/fs/cgroup \
    --entrypoint '["/bin/sh","-c","exec nsenter --target \"$PPID\" --cgroup -- \"$@\"","nsenter"]' "$image" \
    /usr/local/bin/chargefs-csi "${common[@]}" --daemon-bundle /usr/local/lib/chargefs/daemon --daemon-dir "$pdir/daemon" >/dev/null
  plugin_pid=$(podman inspect -f '{{.State.Pid}}' "$ctr")
  where="in a container of $image"
else
  bin=$(dirname "$(cfs_daemon_bin)")
  "$bin/chargefs-csi" "${common[@]}" --chargefsd "$bin/chargefsd" >"$scr/plugin.log" 2>&1 &
  plugin_pid=$!
  where="as a plain process ($bin)"
fi
for ((i = 0; i < 300; i++)); do [ -S "$pdir/csi.sock" ] && break; sleep 0.1; done
[ -S "$pdir/csi.sock" ] || die "the plugin did not start"
echo "density.sh: plugin $where, $(nproc) CPUs, $(uname -r), $(date -u +%F)"
rc=0
/usr/bin/python3 "$repo/scripts/density.py" "unix://$pdir/csi.sock" "$kdir" "$cgroot" "$plugin_pid" "$n" "$conc" || rc=$?
if [ "$rc" != 0 ]; then
  echo "density.sh: failed; the plugin's log:" >&2
  if [ -n "$image" ]; then podman logs "$ctr" 2>&1 | tail -n 20 >&2; else tail -n 20 "$scr/plugin.log" >&2; fi
fi
exit "$rc"
