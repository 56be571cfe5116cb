#!/usr/bin/env bash
# FUSE over io_uring on real mounts and a real cgroup v1 memory cgroup (root; Linux 6.14+ built
# with CONFIG_FUSE_IO_URING, else every test fails saying so):
#   stalled_charge_uring    io_uring=on, daemon and callers on one CPU (one queue): a write waiting
#                           for a stopped charge helper (as for a frozen target) holds one worker;
#                           stat, listing, reading old data and creating an empty file from that
#                           CPU answer within 2 s; the write completes once the helper resumes
#   stalled_charge_devfuse  the same over /dev/fuse (io_uring=off), for comparison
#   takeover_uring_kernel   what the kernel does with a dead io_uring server's requests (test hooks
#                           CHARGEFS_TEST_TAKEOVER_URING and CHARGEFS_TEST_KILL_BEFORE_REPLY=mkdir; a
#                           takeover mount serves /dev/fuse without them): kill -9 of a server holding
#                           a MKDIR in a ring entry, with statfs calls queued on both CPUs' queues while no
#                           successor runs. Asserts this kernel's behaviour (docs/takeover.md,
#                           "io_uring"): the successor registers new entries on the live connection
#                           (enable_uring put back first) and serves; FUSE_NOTIFY_RESEND does not
#                           resend the held MKDIR; the queued statfs calls wait until a new request on their
#                           CPU's queue is answered; the MKDIR's caller survives SIGKILL (D state)
#                           until another process commits the entry by its unique with a reply at the
#                           dead entry's header address (scripts/tests/uring_commit.c): then it ends;
#                           a second commit of that unique is refused with ENOENT
#   takeover_uring_default  without the hooks, io_uring=on,takeover (enable_uring Y) serves /dev/fuse and
#                           logs the warning that says why (the fact above)
# /sys/module/fuse/parameters/enable_uring is set only while a mount starts and put back at once
# (and by the exit trap).
# Usage: scripts/tests/uring.sh [TEST...] | --list      Env: CHARGEFSD, CFS_TEST_TIMEOUT (90)
# Prints "N passed, N failed"; exit non-zero when any failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
export CHARGEFS_CGROUP_VERSION=${CHARGEFS_CGROUP_VERSION:-1}
TESTS=(stalled_charge_uring stalled_charge_devfuse takeover_uring_kernel takeover_uring_default)
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

# field NAME: the value the driver printed for NAME (uring_takeover.py's "name=value" lines).
field() { sed -n "s/^$1=//p" "$SCR/facts" | head -1; }
alive() { [ -e "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
ended() { ! alive "$1"; }

t_takeover_uring_kernel() {
  new_env_uring
  # The connection's abort (every caller still waiting gets ECONNABORTED): cleanup's last resort.
  trap 'restore_knobs; cfs_abort_conn "$(cfs_conn_of "$MNT")"; bg_cleanup' EXIT
  gcc -O2 -Wall -o "$SCR/uring_commit" "$(dirname "$SELF")/uring_commit.c" || die "cannot build uring_commit"
  [ -e "$KNOB" ] || die "$KNOB is missing: $(uname -r) has no FUSE over io_uring (Linux 6.14+ with CONFIG_FUSE_IO_URING)"
  set_knob "$KNOB" Y
  CHARGEFS_TEST_TAKEOVER_URING=1 CHARGEFS_TEST_KILL_BEFORE_REPLY=mkdir cfs_mount "$MNT" "size=64m,takeover,io_uring=on"
  local keeper=$CFS_PID
  check "a takeover mount served over io_uring (test hook)" [ "$(transport_of "$MNT")" = io_uring ]
  # The connection has io_uring now: the knob goes back before the successor registers.
  restore_knobs
  echo x > "$MNT/f"   # no MKDIR before the one the hook kills on
  "$CFS_PYTHON" "$(dirname "$SELF")/uring_takeover.py" "$MNT" "$keeper" "$CFS_LOG" > "$SCR/facts" || true
  sed 's/^/  | /' "$SCR/facts" >&2
  local n; n=$(field cpus | tr ',' '\n' | grep -c .)
  check "the server died holding the MKDIR" [ "$(field server_died_on_mkdir)" = yes ]
  check "no caller answered while nobody serves" [ "$(grep -c '^before_successor\..*=waiting' "$SCR/facts")" = $((n + 1)) ]
  check "the successor serves" grep -q '^successor_serving=yes' "$SCR/facts"
  check "it registered new ring entries on the live connection" [ "$(field successor_registered)" = yes ]
  check "and asked for the resend" grep -q 'resend asked' "$CFS_LOG"
  check "the held MKDIR is not resent: its caller waits 3 s after" grep -q '^after_successor\.held=waiting' "$SCR/facts"
  check "queued statfs calls wait too (no entry takes a request queued before it registered)" \
    [ "$(grep -c '^after_successor\.queued[0-9]*=waiting' "$SCR/facts")" = "$n" ]
  check "a new statfs from each CPU is answered" [ "$(grep -c '^kick\.kick[0-9]*=ok' "$SCR/facts")" = "$n" ]
  check "then the queued statfs calls are answered" [ "$(grep -c '^after_kick\.queued[0-9]*=ok' "$SCR/facts")" = "$n" ]
  check "the held MKDIR's caller survives SIGKILL (uninterruptible)" grep -q '^after_sigkill\.held=D' "$SCR/facts"
  # The request as the dead server took it (the hook logs each entry's header address).
  local took; took=$(grep 'io_uring test: queue .* opcode 9 ' "$CFS_LOG" | head -1)
  local qid unique header
  qid=$(sed -n 's/.*queue \([0-9]*\) took.*/\1/p' <<<"$took")
  unique=$(sed -n 's/.*took unique \([0-9]*\) .*/\1/p' <<<"$took")
  header=$(sed -n 's/.*header 0x\([0-9a-f]*\).*/\1/p' <<<"$took")
  check "the dead server logged the MKDIR's entry ($took)" [ -n "$header" ]
  local held out; held=$(field pid.held)
  out=$("$SCR/uring_commit" "$keeper" "$qid" "$unique" "$header" 116 2>&1) || true
  log "  uring_commit: $out"
  check "another process commits the dead entry by its unique" grep -q '^committed' <<<"$out"
  local i; for ((i = 0; i < 200; i++)); do alive "$held" || break; sleep 0.01; done
  check "and the held caller ends (gone $((i * 10)) ms after uring_commit returned, 200 ms after its commit)" ended "$held"
  out=$("$SCR/uring_commit" "$keeper" "$qid" "$unique" "$header" 116 2>&1) || true
  log "  uring_commit again: $out"
  check "a second commit of the same unique is refused (ENOENT: no longer on the list)" grep -q 'refused: No such file or directory' <<<"$out"
  check "the directory the dead server made is there" [ -d "$MNT/held" ]
  check "clean unmount" cfs_umount "$MNT" "$keeper"
}

t_takeover_uring_default() {
  new_env_uring
  trap bg_cleanup EXIT
  mount_uring "$MNT" "size=64m,takeover,io_uring=on"
  check "a takeover mount serves /dev/fuse although io_uring=on" [ "$(transport_of "$MNT")" = dev-fuse ]
  check "and says why" grep -q 'io_uring=on with takeover: serving over /dev/fuse.*not resent.*unkillable' "$CFS_LOG"
  check "clean unmount" cfs_umount "$MNT" "$CFS_PID"
}

new_env_uring() {
  SCR=$(cfs_tempdir cfsuring); CFS_DIRS+=("$SCR"); CFS_LOGDIR=$SCR; MNT=$SCR/mnt; mkdir -p "$MNT"
}

if [ "${1:-}" != --one ] && [ "${1:-}" != --list ] && [ ! -e "$KNOB" ]; then
  echo "cannot run: $KNOB is missing ($(uname -r) has no FUSE over io_uring: Linux 6.14+ with CONFIG_FUSE_IO_URING)"
  echo "0 passed, 1 failed"; exit 1
fi
test_main "io_uring tests" 90 "$@"
