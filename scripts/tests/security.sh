#!/usr/bin/env bash
# Security tests of chargefsd (root only; other users via setpriv). POSIX permissions on a mount
# (modes, sticky directories, setuid/setgid, allow_other) are compared with tmpfs in
# Tests/ChargeFSMountTests/MountPermissionsTests.swift; these are the charging's own:
#   memcg_refused    uid 65534 without delegation: memcg= refused at mount, one-line error,
#                    nothing mounted, nothing created or charged
#   memcg_delegated  uid 65534 with a delegated target (dir + cgroup.procs chowned): mounts,
#                    charges the target, unmounts with fusermount3 -u, leaf removed
#   helper_private   the charge helper holds only /dev/null x3, the arena file and an unnamed
#                    socketpair end; another user cannot see its fds, signal it or reach its socket
# Usage: scripts/tests/security.sh [TEST...] | --list       Env: CHARGEFSD, CFS_TEST_TIMEOUT (90)
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
SLACK=$((1 * MiB))
TESTS=(memcg_refused memcg_delegated helper_private)

as() { local u=$1; shift; setpriv --reuid="$u" --regid="$u" --clear-groups -- "$@"; }
# (cfs_tempdir runs in a subshell, so its dir is recorded for cleanup here)
new_scratch() { SCR=$(cfs_tempdir cfssec); CFS_DIRS+=("$SCR"); chmod 755 "$SCR"; CFS_LOGDIR=$SCR; }
# A copy of the daemon that uid 65534 can reach wherever the checkout lives; sets BIN to it.
usable_by_nobody() {
  cfs_stage_for_others
  BIN=$CFS_PUBLIC/chargefsd
  as 65534 test -x "$BIN"
}

t_memcg_refused() {
  new_scratch
  usable_by_nobody || { check "uid 65534 can run the daemon (searchable paths)" false; return; }
  local MNT=$SCR/mnt T; T=$(cg_parent)/cfssec-$$-target
  mkdir -p "$MNT"; chown 65534:65534 "$MNT"
  cg_create "$T" $((64 * MiB))
  local pre; pre=$(cg_usage "$T")
  CFS_MOUNTS+=("$MNT")
  local rc=0
  as 65534 timeout 20 "$BIN" "$MNT" -o "memcg=$T,size=16m" >"$SCR/out" 2>"$SCR/err" || rc=$?
  log "  exit $rc; stderr: $(cat "$SCR/err")"
  check "refused with a non-zero exit (not a timeout)" [ "$rc" != 0 -a "$rc" != 124 ]
  check "a one-line error" [ "$(grep -c . "$SCR/err")" = 1 ]
  check "it names the cgroup" grep -qF "$T" "$SCR/err"
  check "nothing mounted" bash -c "! awk -v m='$MNT' '\$2 == m {f=1} END {exit !f}' /proc/mounts"
  check "no daemon left" [ -z "$(pgrep -f -- "$BIN $MNT" || true)" ]
  check "nothing created below the target" [ -z "$(find "$T" -mindepth 1 -type d)" ]
  check "nothing charged (±1 MiB)" le "$(cg_usage "$T")" $((pre + SLACK))
}

t_memcg_delegated() {
  new_scratch
  usable_by_nobody || { check "uid 65534 can run the daemon (searchable paths)" false; return; }
  # An unprivileged FUSE mount needs /dev/fuse open to all (its usual 0666); some containers make
  # it 0600. Widen it for this test only and put the old mode back on exit.
  local fmode; fmode=$(stat -c %a /dev/fuse)
  if [ "$fmode" != 666 ]; then
    log "  /dev/fuse is $fmode here: 0666 for this test, restored after"
    trap "chmod $fmode /dev/fuse; cfs_cleanup" EXIT
    chmod 666 /dev/fuse
  fi
  local MNT=$SCR/mnt T; T=$(cg_parent)/cfssec-$$-deleg
  mkdir -p "$MNT"; chown 65534:65534 "$MNT"
  cg_create "$T" $((64 * MiB))
  chown 65534:65534 "$T" "$T/cgroup.procs" "$T/tasks" 2>/dev/null || chown 65534:65534 "$T" "$T/cgroup.procs"
  local pre; pre=$(cg_usage "$T")
  CFS_MOUNTS+=("$MNT")
  local rc=0
  as 65534 timeout 20 "$BIN" "$MNT" -o "memcg=$T,size=32m" >"$SCR/out" 2>"$SCR/err" || rc=$?
  log "  exit $rc; stderr: $(cat "$SCR/err")"
  check "uid 65534 mounts with a delegated target" [ "$rc" = 0 ]
  check "mounted" is_mounted "$MNT"
  local p; for p in $(pgrep -f -- "$MNT" || true); do CFS_PIDS+=("$p"); done
  local dpid; dpid=$(pgrep -f -- "$MNT" | head -1 || true)
  check "the daemon runs as 65534" [ "$(stat -c %u "/proc/$dpid" 2>/dev/null)" = 65534 ]
  check "its leaf exists and is 65534's" [ "$(stat -c %u "$T/chargefs-$dpid" 2>/dev/null)" = 65534 ]
  as 65534 dd if=/dev/urandom of="$MNT/data" bs=1M count=8 status=none
  check "8 MiB written by 65534 charged to the target (±1 MiB)" near $(( $(cg_usage "$T") - pre )) $((8 * MiB)) $((2 * SLACK))
  local rc2=0; as 65534 dd if=/dev/zero of="$MNT/more" bs=1M count=64 status=none 2>"$SCR/dd.err" || rc2=$?
  check "the limit still gives ENOSPC" grep -q "No space left" "$SCR/dd.err"
  check "65534 unmounts with fusermount3 -u" as 65534 fusermount3 -u "$MNT"
  for p in "${CFS_PIDS[@]}"; do
    check "daemon $p exits" bash -c "for i in \$(seq 50); do kill -0 $p 2>/dev/null || exit 0; sleep 0.1; done; exit 1"
  done
  check "leaf removed" [ -z "$(find "$T" -mindepth 1 -type d -name 'chargefs-*')" ]
  check "charges back (±1 MiB)" bash -c "for i in \$(seq 50); do [ \$(cat '$T/memory.usage_in_bytes') -le $((pre + SLACK)) ] && exit 0; sleep 0.1; done; exit 1"
}

t_helper_private() {
  new_scratch
  local MNT=$SCR/mnt T; T=$(cg_parent)/cfssec-$$-helper
  mkdir -p "$MNT"
  cg_create "$T" $((64 * MiB))
  cfs_mount "$MNT" "memcg=$T,size=16m,allow_other"
  echo x > "$MNT/f"
  local h; h=$(pgrep -P "$CFS_PID" -x chargefs-helper || true)
  check "a helper runs" [ -n "$h" ]
  local fds; fds=$(ls -l "/proc/$h/fd" | awk 'NR > 1 {print $9, $11}')
  log "  helper $h fds: $(tr '\n' ';' <<<"$fds")"
  check "exactly 5 fds" [ "$(grep -c . <<<"$fds")" = 5 ]
  check "0, 1, 2 are /dev/null" [ "$(grep -cE '^[012] /dev/null$' <<<"$fds")" = 3 ]
  check "3 is the arena (its file on the daemon's private tmpfs, or a memfd)" grep -qE '^3 (/memfd:|/#[0-9]+)' <<<"$fds"
  check "4 is a socket" grep -qE '^4 socket:\[[0-9]+\]$' <<<"$fds"
  local ino; ino=$(sed -nE 's/^4 socket:\[([0-9]+)\]$/\1/p' <<<"$fds")
  check "the socket has no name (socketpair: not reachable by path or abstract name)" \
    bash -c "awk -v i='$ino' '\$7 == i { if (NF >= 8) exit 1; f=1 } END { exit !f }' /proc/net/unix"
  check "no /dev/fuse in the helper" bash -c "! ls -l /proc/$h/fd | grep -q /dev/fuse"
  check "helper runs as the daemon's user (root)" [ "$(awk '/^Uid:/ {print $2}' "/proc/$h/status")" = 0 ]
  check "another user cannot list its fds" bash -c "! setpriv --reuid=65534 --regid=65534 --clear-groups ls /proc/$h/fd >/dev/null 2>&1"
  check "another user cannot signal it" bash -c "! setpriv --reuid=65534 --regid=65534 --clear-groups kill -0 $h 2>/dev/null"
  check "another user cannot open its memfd via /proc" bash -c "! setpriv --reuid=65534 --regid=65534 --clear-groups cat /proc/$h/fd/3 >/dev/null 2>&1"
  check "helper still alive (not disturbed)" kill -0 "$h"
  check "clean unmount" cfs_umount "$MNT" "$CFS_PID"
}

# --- main ----------------------------------------------------------------------------------------
test_main "security tests" 90 "$@"
