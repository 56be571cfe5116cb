#!/usr/bin/env bash
# Hostile-input tests of chargefsd on real mounts (root only). Each case runs the same operations
# on a chargefs mount and on a kernel tmpfs and compares every result/errno (scripts/tests/hostile.py):
#   names     every byte but '/' and NUL as a name, invalid UTF-8, 255-byte names, 256 -> ENAMETOOLONG
#   deep      nested 200-byte components to PATH_MAX (4095 ok, 4096 -> ENAMETOOLONG)
#   sizes     pwrite/truncate/fallocate near 2^63 and overflowing offset+length
#   zero      zero-length writes/reads/truncates, reads past EOF, chown(f, -1, -1) moving ctime
#   holes     truncate to 1 TiB: no blocks, no df usage, no memcg charge
#   xattrs    255-byte names, 64 KiB values (and one past each), plus 2000 attributes on one file
#   links     3000 hard links to one inode
#   renames   renames and exchanges that would create loops
#   fuzzbin   a few hundred generated hostile command lines against the real binary: no crash,
#             a one-line error and nothing mounted, or a working mount that unmounts cleanly
# Usage: scripts/tests/hostile.sh [TEST...] | --list       Env: CHARGEFSD, CFS_TEST_TIMEOUT (120),
#        FUZZBIN_COUNT (300), FUZZBIN_SEED (20251123)
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
HOSTILE=("$CFS_PYTHON" "$(dirname "$SELF")/hostile.py")
SLACK=$((1 * MiB))
TESTS=(names deep sizes zero holes xattrs links renames fuzzbin)

# Both mounts below one scratch dir: $MNT (chargefs, memcg= a fresh test cgroup), $TMP (tmpfs).
two_mounts() {
  SCR=$(cfs_tempdir cfshostile); CFS_DIRS+=("$SCR")  # (cfs_tempdir runs in a subshell: record it here)
  CFS_LOGDIR=$SCR
  MNT=$SCR/cfs TMPM=$SCR/tmpfs
  mkdir -p "$MNT" "$TMPM"
  T=$(cg_parent)/cfshostile-$$-target
  cg_create "$T" $((512 * MiB))
  PRE=$(cg_usage "$T")
  cfs_mount "$MNT" "memcg=$T,size=256m"
  DPID=$CFS_PID
  mount -t tmpfs -o size=256m tmpfs "$TMPM"
  CFS_MOUNTS+=("$TMPM")
  sleep 0.2
  BASE=$(cg_usage "$T")
}

compare_case() {
  two_mounts
  check "$1: same results as tmpfs" "${HOSTILE[@]}" compare "$1" "$MNT" "$TMPM"
  check "daemon alive after $1" kill -0 "$DPID"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_names() { compare_case names; }
t_deep() { compare_case deep; }
t_sizes() { compare_case sizes; }
t_zero() { compare_case zero; }
t_xattrs() { compare_case xattrs; }
t_links() { compare_case links; }
t_renames() { compare_case renames; }

t_holes() {
  two_mounts
  local used0; used0=$(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ')
  local u0; u0=$(cg_usage "$T")
  check "holes: same results as tmpfs" "${HOSTILE[@]}" compare holes "$MNT" "$TMPM"
  check "st_blocks 0 after truncate to 1 TiB" [ "$(stat -c %b "$MNT/h")" = 0 ]
  check "df used unchanged" [ "$(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ')" = "$used0" ]
  log "  memcg usage: before $(fmt_mib "$u0"), after $(fmt_mib "$(cg_usage "$T")")"
  check "memcg usage unchanged (±1 MiB)" near "$(cg_usage "$T")" "$u0" "$SLACK"
  # reading the hole charges nothing either (it is zeros, no page instantiated in the arena)
  dd if="$MNT/h" of=/dev/null bs=1M count=64 skip=$((512 * 1024)) status=none
  check "reading 64 MiB of the hole charges nothing (±1 MiB)" near "$(cg_usage "$T")" "$u0" "$SLACK"
  check "st_blocks still 0 after reading the hole" [ "$(stat -c %b "$MNT/h")" = 0 ]
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_fuzzbin() {
  SCR=$(cfs_tempdir cfsfuzzbin); CFS_DIRS+=("$SCR")  # (cfs_tempdir runs in a subshell: record it here)
  MNT=$SCR/mnt
  mkdir -p "$MNT"
  CFS_MOUNTS+=("$MNT")
  T=$(cg_parent)/cfshostile-$$-fuzz
  cg_create "$T" $((256 * MiB))
  check "hostile command lines against the real binary" \
    "${HOSTILE[@]}" fuzzbin "$(cfs_daemon_bin)" "$MNT" "${FUZZBIN_COUNT:-300}" "${FUZZBIN_SEED:-20251123}" "$T"
  check "nothing left mounted" bash -c "! awk -v m='$MNT' '\$2 == m {f=1} END {exit !f}' /proc/mounts"
  check "no chargefs-* leaf left in the test cgroup" [ -z "$(find "$T" -mindepth 1 -type d -name 'chargefs-*')" ]
}

# --- main ----------------------------------------------------------------------------------------
test_main "hostile-input tests" 120 "$@"
