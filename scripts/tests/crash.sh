#!/usr/bin/env bash
# A crashing chargefsd leaks no file data into its core dump (issue 21, "A crash leaks no file
# data"). Root only. Each test writes files through a mount, reads them back, kills the daemon
# with SIGSEGV with Swift's backtracer off (SWIFT_BACKTRACE=enable=no, as under systemd-coredump:
# the kernel writes the core) and greps the core for the files' markers:
#   core_small_files   64 small files, each written in ONE write(2) of a unique marker (so the
#                      whole marker passes through a request buffer), read back: none in the core
#   core_large_file    one 2 MiB file of numbered markers written in 1 MiB writes and read back:
#                      none in the core (large requests, several pages of a request buffer)
#   core_backing_read  a 2 MiB file (a backing file of its own with passthrough=auto, Linux 6.9+)
#                      read back through a read-write descriptor with the page cache dropped, so
#                      the daemon preads it into buffers of its own: none in the core
#   core_uring         64 small files and the 2 MiB file over FUSE's io_uring transport (Linux
#                      6.14+): /sys/module/fuse/parameters/enable_uring is Y only from the mount
#                      to the daemon's death (about a second), then put back
# Usage: scripts/tests/crash.sh [TEST...] | --list      Env: CHARGEFSD, CFS_TEST_TIMEOUT (90)
# The host's core_pattern and core_uses_pid are changed only from just before the kill until the
# core is written, and put back by the EXIT trap whatever happens.
# Prints "N passed, N failed"; exit non-zero when any failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
TESTS=(core_small_files core_large_file core_backing_read core_uring)

crash_cleanup() { restore_knobs; cfs_cleanup; }

new_env() {
  trap crash_cleanup EXIT
  SCR=$(cfs_tempdir cfscrash); CFS_DIRS+=("$SCR")
  CFS_LOGDIR=$SCR
  MNT=$SCR/mnt
  mkdir -p "$MNT"
  # A marker no daemon could hold but through file data (file names are f<i>, not markers).
  RUN=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
}

# crash_and_grep PID: SIGSEGV to the daemon, waits for it and its core; sets CORE, CORE_SIZE,
# FOUND (distinct markers in the core) and HITS (occurrences).
crash_and_grep() {
  local dpid=$1 i
  set_knob /proc/sys/kernel/core_pattern "$SCR/core.%p"
  set_knob /proc/sys/kernel/core_uses_pid 0
  kill -SEGV "$dpid"
  for ((i = 0; i < 600; i++)); do kill -0 "$dpid" 2>/dev/null || break; sleep 0.1; done
  wait "$dpid" 2>/dev/null || true
  restore_knobs
  # The dead daemon leaves a dead FUSE mount.
  fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
  CORE=$(find "$SCR" -maxdepth 1 -name "core.$dpid" -print -quit)
  CORE_SIZE=0 FOUND=0 HITS=0
  [ -n "$CORE" ] || return 0
  CORE_SIZE=$(stat -c %s "$CORE")
  FOUND=$({ grep -a -o "cfscrash-$RUN-[0-9]*-" "$CORE" || true; } | sort -u | wc -l)
  HITS=$({ grep -a -o "cfscrash-$RUN-[0-9]*-" "$CORE" || true; } | wc -l)
  log "  core: $(fmt_mib "$CORE_SIZE") (allocated $(du -k "$CORE" | awk '{print $1}') KiB); markers found: $FOUND distinct, $HITS occurrences"
}

# marker_file PATH: 2 MiB of 64-byte lines, each a numbered marker: every page of every request
# that carries it holds markers.
marker_file() {
  awk -v run="$RUN" 'BEGIN { zeros = sprintf("%063d", 0)
    for (i = 0; i < 32768; i++) { line = sprintf("cfscrash-%s-%d-", run, i); printf "%s%s\n", line, substr(zeros, 1, 63 - length(line)) } }' \
    > "$1"
}

# small_marker_files DIR: 64 files f0..f63 in DIR of one marker each, each written by one
# printf (one write(2), one FUSE_WRITE request carrying the whole marker); checks they read back.
small_marker_files() {
  local i ok=0
  for ((i = 0; i < 64; i++)); do printf 'cfscrash-%s-%d-padding-to-make-it-longer\n' "$RUN" "$i" > "$1/f$i"; done
  for ((i = 0; i < 64; i++)); do
    [ "$(cat "$1/f$i")" = "cfscrash-$RUN-$i-padding-to-make-it-longer" ] && ok=$((ok + 1))
  done
  check "the 64 files read back ($ok)" [ "$ok" = 64 ]
}

# large_marker_file FILE: FILE made a 2 MiB file of markers by dd (1 MiB writes), checked whole;
# the source outside the mount is removed, so only FILE's copy remains.
large_marker_file() {
  marker_file "$SCR/source"
  check "the source is 2 MiB" [ "$(stat -c %s "$SCR/source")" = $((2 * MiB)) ]
  dd if="$SCR/source" of="$1" bs=1M status=none
  check "the 2 MiB file reads back whole" cmp -s "$SCR/source" "$1"
  rm -f "$SCR/source"
}

daemon_env() {
  ulimit -c unlimited
  export SWIFT_BACKTRACE=enable=no
}

t_core_small_files() {
  new_env
  daemon_env
  cfs_mount "$MNT" "size=256m"
  local dpid=$CFS_PID
  small_marker_files "$MNT"
  # Metadata a core may hold (docs/takeover.md, "Core dumps"): counted and shown, not refused.
  touch "$MNT/cfsmeta-$RUN-name-"
  ln -s "cfsmeta-$RUN-target-" "$MNT/link"
  setfattr -n user.note -v "cfsmeta-$RUN-xattr-" "$MNT/f0" 2>/dev/null || log "  (no setfattr: no xattr in this run)"
  crash_and_grep "$dpid"
  check "a core was written" [ -n "$CORE" ]
  check "the core holds none of the 64 files' markers (found $FOUND)" [ "$FOUND" = 0 ]
  [ -z "$CORE" ] || log "  metadata in the core (allowed): $({ grep -a -o "cfsmeta-$RUN-[a-z]*-" "$CORE" || true; } | sed "s/cfsmeta-$RUN-//; s/-$//" | sort | uniq -c | tr -s ' \n' ' ')"
}

t_core_large_file() {
  new_env
  daemon_env
  cfs_mount "$MNT" "size=256m"
  local dpid=$CFS_PID
  large_marker_file "$MNT/big"
  crash_and_grep "$dpid"
  check "a core was written" [ -n "$CORE" ]
  check "the core holds none of the file's markers (found $FOUND)" [ "$FOUND" = 0 ]
}

t_core_backing_read() {
  new_env
  daemon_env
  cfs_mount "$MNT" "size=256m"
  local dpid=$CFS_PID
  marker_file "$SCR/source"
  dd if="$SCR/source" of="$MNT/big" bs=1M status=none
  # A read-write descriptor is never passed through: its reads come to the daemon, in 4 KiB and
  # 128 KiB reads, with the file's page cache dropped before each pass.
  check "the file reads back whole through a read-write descriptor" "$CFS_PYTHON" - "$MNT/big" "$SCR/source" <<'PY'
import os, sys
want = open(sys.argv[2], 'rb').read()
fd = os.open(sys.argv[1], os.O_RDWR)
for size in (4096, 131072):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    got = b''.join(os.pread(fd, size, off) for off in range(0, len(want), size))
    if got != want:
        sys.exit(1)
os.close(fd)
PY
  rm -f "$SCR/source"
  crash_and_grep "$dpid"
  check "a core was written" [ -n "$CORE" ]
  check "the core holds none of the file's markers (found $FOUND)" [ "$FOUND" = 0 ]
}

t_core_uring() {
  new_env
  local knob=/sys/module/fuse/parameters/enable_uring
  [ -w "$knob" ] || { log "  cannot run: $knob is missing ($(uname -r) has no FUSE over io_uring: 6.14+ with CONFIG_FUSE_IO_URING)"; return 1; }
  daemon_env
  local old_uring; old_uring=$(cat "$knob")
  set_knob "$knob" Y
  cfs_mount "$MNT" "size=256m,io_uring=on"
  local dpid=$CFS_PID
  check "served over io_uring" grep -q 'transport=io_uring' <(getfattr --only-values -n user.chargefs.status "$MNT" 2>/dev/null)
  small_marker_files "$MNT"
  large_marker_file "$MNT/big"
  # crash_and_grep puts every knob back (enable_uring too) once the daemon is dead.
  crash_and_grep "$dpid"
  check "a core was written" [ -n "$CORE" ]
  check "the core holds none of the markers (found $FOUND)" [ "$FOUND" = 0 ]
  check "enable_uring put back ($old_uring)" [ "$(cat "$knob")" = "$old_uring" ]
}

test_main "crash tests" 90 "$@"
