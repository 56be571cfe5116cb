#!/bin/bash
# The pod scenario behind chargefsd's automatic cache mode (docs/vm.md), once per MODE given
# (page, direct or default), on cgroup v2: a 64 MiB pod with containers ctr-a and ctr-b, a mount
# charged to the pod, 40 MiB written (by WRITER: root, a or b), then ctr-b writes with dd bs=BS
# until dd stops. One line per run: how dd ended, what it filled, the pod's usage and OOM kills.
# Usage (root, cgroup v2 with memory; on this host through the guest):
#   CHARGEFS_VM=qemu CHARGEFS_VM_MEM=512 bash scripts/vm-run.sh -- \
#     env CHARGEFSD=$PWD/.build/debug/chargefsd bash scripts/bench/pod-cache-modes.sh page direct
# Env: WRITER (default root), BS (default 1M), CHARGEFSD.
set -u
: "${CHARGEFSD:?set CHARGEFSD to a built chargefsd}"
WRITER=${WRITER:-root} BS=${BS:-1M}
P=/sys/fs/cgroup/chargefs-pod-cache-modes M=$(mktemp -d /tmp/pod-cache-modes.XXXXXX)
cleanup() {
  mountpoint -q "$M" && umount "$M"
  rmdir "$P/ctr-a" "$P/ctr-b" "$P" 2>/dev/null
  rmdir "$M" 2>/dev/null
}
trap cleanup EXIT
grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null || { echo "pod-cache-modes: needs cgroup v2 with memory" >&2; exit 1; }
for mode in "$@"; do
  mkdir -p "$P"; echo $((64 << 20)) >"$P/memory.max"; echo +memory >"$P/cgroup.subtree_control"
  mkdir -p "$P/ctr-a" "$P/ctr-b"
  opt="memcg=$P"; [ "$mode" = default ] || opt="$opt,cache=$mode"
  "$CHARGEFSD" "$M" -o "$opt" || { echo "mode=$mode: mount failed"; continue; }
  if [ "$WRITER" = root ]; then dd if=/dev/urandom of="$M/a" bs=1M count=40 status=none
  else (echo $BASHPID >"$P/ctr-$WRITER/cgroup.procs"; exec dd if=/dev/urandom of="$M/a" bs=1M count=40 status=none); fi
  rc=0; (echo $BASHPID >"$P/ctr-b/cgroup.procs"; exec dd if=/dev/zero of="$M/fill" bs="$BS" status=none) 2>/dev/null || rc=$?
  echo "mode=$mode writer=$WRITER bs=$BS dd_exit=$rc filled=$(stat -c %s "$M/fill") pod_usage=$(cat "$P/memory.current") $(grep oom_kill "$P/memory.events")"
  umount "$M"; sleep 0.5
  rmdir "$P/ctr-a" "$P/ctr-b" "$P"
done
