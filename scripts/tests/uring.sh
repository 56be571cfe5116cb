#!/usr/bin/env bash
# FUSE over io_uring on real mounts and a real cgroup v1 memory cgroup (root; Linux 6.14+ built
# with CONFIG_FUSE_IO_URING, else every test fails saying so):
#   stalled_charge_uring    io_uring=on, daemon and callers on one CPU (one queue): a write waiting
#                           for a stopped charge helper (as for a frozen target) holds one worker;
#                           stat, listing, reading old data and creating an empty file from that
#                           CPU answer within 2 s; the write completes once the helper resumes
#   stalled_charge_devfuse  the same over /dev/fuse (io_uring=off), for comparison
# /sys/module/fuse/parameters/enable_uring is set only while a mount starts and put back at once
# (and by the exit trap).
# Usage: scripts/tests/uring.sh [TEST...] | --list      Env: CHARGEFSD, CFS_TEST_TIMEOUT (90)
# Prints "N passed, N failed"; exit non-zero when any failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
export CHARGEFS_CGROUP_VERSION=${CHARGEFS_CGROUP_VERSION:-1}
TESTS=(stalled_charge_uring stalled_charge_devfuse)
KNOB=/sys/module/fuse/parameters/enable_uring
CPU=0

# mount_uring MNT OPTS DAEMON_CG: cfs_mount with enable_uring on for the mount's start only.
mount_uring() {
  [ -e "$KNOB" ] || die "$KNOB is missing: $(uname -r) has no FUSE over io_uring (Linux 6.14+ with CONFIG_FUSE_IO_URING)"
  local old rc=0; old=$(cat "$KNOB")
  trap 'echo "$old" > "$KNOB"; bg_cleanup' EXIT
  echo Y > "$KNOB"
  cfs_mount "$@" || rc=$?
  echo "$old" > "$KNOB"
  trap bg_cleanup EXIT
  return "$rc"
}
BGPIDS=()
bg_cleanup() { local p; for p in "${BGPIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done; cfs_cleanup; }
transport_of() { getfattr -n user.chargefs.status --only-values "$1" 2>/dev/null | sed -n 's/^transport=//p'; }
on_cpu() { timeout 2 taskset -c "$CPU" "$@"; }

stalled_charge() {  # stalled_charge io_uring=on|off TRANSPORT
  trap bg_cleanup EXIT
  local scr; scr=$(cfs_tempdir cfsuring); CFS_DIRS+=("$scr"); CFS_LOGDIR=$scr
  local parent; parent=$(cg_parent)
  local t=$parent/cfsuring-$$-target d=$parent/cfsuring-$$-daemon mnt=$scr/mnt
  cg_create "$t" $((256 * MiB)); cg_create "$d"
  CFS_WRAP="taskset -c $CPU" mount_uring "$mnt" "memcg=$t,size=1g,$1" "$d"
  local dpid=$CFS_PID
  check "served over $2" [ "$(transport_of "$mnt")" = "$2" ]
  head -c $((1 * MiB)) /dev/urandom > "$scr/src"
  cp "$scr/src" "$mnt/old"
  local helper; helper=$(pgrep -P "$dpid" -x chargefs-helper || true)
  check "a charge helper runs" [ -n "$helper" ]
  [ -n "$helper" ] || return 0
  kill -STOP "$helper"; BGPIDS+=("$helper")
  taskset -c "$CPU" dd if=/dev/zero of="$mnt/new" bs=1M count=8 status=none & local writer=$!
  BGPIDS+=("$writer")
  sleep 0.5
  check "the writer waits for the stopped helper" kill -0 "$writer"
  check "stat from the writer's CPU answers" on_cpu stat "$mnt/old" >/dev/null
  check "listing from the writer's CPU answers" on_cpu ls "$mnt" >/dev/null
  check "old data reads back from the writer's CPU" on_cpu cmp "$scr/src" "$mnt/old"
  check "an empty file is created from the writer's CPU" on_cpu touch "$mnt/empty"
  kill -CONT "$helper"
  local rc=0; wait "$writer" || rc=$?
  check "the write completes once the helper resumes" [ "$rc" = 0 ]
  check "8 MiB written" [ "$(stat -c %s "$mnt/new")" = $((8 * MiB)) ]
  check "clean unmount" cfs_umount "$mnt" "$dpid"
}
t_stalled_charge_uring() { stalled_charge io_uring=on io_uring; }
t_stalled_charge_devfuse() { stalled_charge io_uring=off dev-fuse; }

if [ "${1:-}" != --one ] && [ "${1:-}" != --list ] && [ ! -e "$KNOB" ]; then
  echo "cannot run: $KNOB is missing ($(uname -r) has no FUSE over io_uring: Linux 6.14+ with CONFIG_FUSE_IO_URING)"
  echo "0 passed, 1 failed"; exit 1
fi
test_main "io_uring tests" 90 "$@"
