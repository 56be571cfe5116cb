#!/usr/bin/env bash
# The page arena on the host's kernel: huge pages whatever the shmem THP setting (issue 11 case 3),
# core dumps (case 6). Root only; cgroup v1 here (the memcg= tests), or v2 where the host has it.
# Usage: scripts/tests/arena.sh [TEST...]        (all tests when none given)
#        scripts/tests/arena.sh --list
# Env: CHARGEFSD=path to the daemon (default .build/debug/chargefsd), CFS_TEST_TIMEOUT=seconds
# per test (default 120). Every host knob a test changes (THP, core_pattern, a swap file where the
# host has no swap) is put back by its EXIT trap, whatever happens; the change lasts only while
# the test writes.
# Prints "N passed, N failed" and exits non-zero when any test failed.
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"

SLACK=$((1 * MiB))
THP=/sys/kernel/mm/transparent_hugepage
TESTS=(thp_always thp_within_size_and_mthp thp_force_refused thp_memfd_refused core_dump swap)

SWAPFILES=()  # swap files a test turned on
arena_cleanup() {
  local f
  restore_knobs
  for f in "${SWAPFILES[@]}"; do
    swapon --noheadings --show=NAME | grep -qxF "$f" || continue
    swapoff "$f" 2>/dev/null || { sleep 1; swapoff "$f"; } || log "warning: could not swapoff $f"
  done
  SWAPFILES=()
  cfs_cleanup
}

new_env() {
  trap arena_cleanup EXIT
  SCR=$(cfs_tempdir cfsarena); CFS_DIRS+=("$SCR")
  CFS_LOGDIR=$SCR
  MNT=$SCR/mnt
  mkdir -p "$MNT"
}

# A target T and the daemon's cgroup D below our own memory cgroup.
new_cgroups() {
  local parent; parent=$(cg_parent)
  T=$parent/cfsarena-$$-target
  D=$parent/cfsarena-$$-daemon
  cg_create "$T" $((256 * MiB))
  cg_create "$D"
}

need_thp() {
  [ -w "$THP/shmem_enabled" ] || { log "  cannot run: $THP/shmem_enabled is missing or read-only (a kernel without THP cannot show the case)"; return 1; }
}

# small_and_big: 200 files of 4 KiB and one of 1 MiB (1.78 MiB stored), as in the issue.
small_and_big() {
  local i
  for ((i = 0; i < 200; i++)); do head -c 4096 /dev/urandom > "$MNT/s$i"; done
  head -c $MiB /dev/urandom > "$MNT/big"
}

# thp_case NAME: mounts charged to T, stores small_and_big under whatever THP knobs the caller
# set, deletes the small files, puts the knobs back; checks the target's rise both times.
thp_case() {
  new_cgroups
  local pre base rise stored=$((200 * 4096 + MiB)) after
  pre=$(cg_usage "$T")
  cfs_mount "$MNT" "memcg=$T,size=64m" "$D"
  local dpid=$CFS_PID
  sleep 0.3
  base=$(cg_usage "$T")
  small_and_big
  sync "$MNT" 2>/dev/null || true
  rise=$(( $(cg_usage "$T") - base ))
  log "  stored $(fmt_mib $stored) in 201 files: the target rose by $(fmt_mib "$rise") (ShmemHugePages $(awk '/^ShmemHugePages/ {print $2, $3}' /proc/meminfo))"
  check "target rose by the bytes stored (+1 MiB at most)" le "$rise" $((stored + SLACK))
  check "target rose at least by the bytes stored" ge "$rise" $((stored - SLACK))
  rm -f "$MNT"/s*
  after=$(( $(cg_usage "$T") - base ))
  log "  after deleting the 200 small files: $(fmt_mib "$after") above the mount's baseline (1.00 MiB stored)"
  check "charge fell with the deleted files (within 1 MiB of the 1 MiB left)" near "$after" "$MiB" "$SLACK"
  restore_knobs
  check "the 1 MiB file reads back whole" [ "$(stat -c %s "$MNT/big")" = "$MiB" ]
  check "unmounted cleanly" cfs_umount "$MNT" "$dpid"
  check "charge back to the pre-mount baseline (±1 MiB)" near "$(cg_usage "$T")" "$pre" "$SLACK"
}

t_thp_always() {
  new_env; need_thp
  set_knob "$THP/shmem_enabled" always
  thp_case
}

# within_size, and every per-size (mTHP) knob at always: the kernel applies those to anonymous
# shared memory only, a memfd follows within_size, the arena's own huge=never holds.
t_thp_within_size_and_mthp() {
  new_env; need_thp
  local k n=0
  for k in "$THP"/hugepages-*/shmem_enabled; do
    [ -w "$k" ] || continue
    set_knob "$k" always; n=$((n + 1))
  done
  log "  $n per-size shmem knobs set to always"
  set_knob "$THP/shmem_enabled" within_size
  thp_case
}

# force overrides every tmpfs mount's huge= (mm/shmem.c): a memcg= mount must refuse to start,
# saying so, rather than charge 2 MiB per 4 KiB; a mount charging nobody starts with a warning.
t_thp_force_refused() {
  new_env; need_thp; new_cgroups
  local bin out rc=0
  bin=$(cfs_daemon_bin)
  set_knob "$THP/shmem_enabled" force
  out=$(timeout 20 "$bin" "$MNT" -o "memcg=$T" 2>&1) || rc=$?
  local mounted=no; is_mounted "$MNT" && mounted=yes
  if [ "$mounted" = yes ]; then cfs_umount "$MNT"; fi
  log "  memcg= mount under force: exit $rc: $out"
  check "memcg= mount refused (non-zero exit)" [ "$rc" != 0 ]
  check "nothing mounted" [ "$mounted" = no ]
  check "the error names the setting" grep -q "shmem_enabled is 'force'" <<<"$out"
  cfs_mount "$MNT" "size=16m"
  local dpid=$CFS_PID
  restore_knobs
  check "a mount without memcg= starts" is_mounted "$MNT"
  check "and warns about huge pages" grep -q "huge pages" "$CFS_LOG"
  check "unmounted cleanly" cfs_umount "$MNT" "$dpid"
}

# Without CAP_SYS_ADMIN the arena is a memfd, which follows shmem_enabled: under always a memcg=
# mount must refuse to start and say why.
t_thp_memfd_refused() {
  new_env; need_thp; new_cgroups
  local bin out rc=0 mounted=no
  bin=$(cfs_daemon_bin)
  set_knob "$THP/shmem_enabled" always
  out=$(timeout 20 setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin "$bin" "$MNT" -o "memcg=$T" 2>&1) || rc=$?
  restore_knobs
  is_mounted "$MNT" && mounted=yes
  if [ "$mounted" = yes ]; then cfs_umount "$MNT"; fi
  log "  memcg= mount without CAP_SYS_ADMIN under always: exit $rc: $out"
  check "refused (non-zero exit)" [ "$rc" != 0 ]
  check "nothing mounted" [ "$mounted" = no ]
  check "the error says why: a memfd under 'always'" grep -q "uses a memfd.*('always')" <<<"$out"
}

# SIGSEGV, Swift's backtracer off, core_pattern to a file: the core must hold none of the files'
# bytes, and must not carry the arena's address space.
t_core_dump() {
  new_env
  set_knob /proc/sys/kernel/core_pattern "$SCR/core.%p"
  set_knob /proc/sys/kernel/core_uses_pid 0
  ulimit -c unlimited
  export SWIFT_BACKTRACE=enable=no
  cfs_mount "$MNT" "size=1g"
  local dpid=$CFS_PID i core
  # Each file's marker is written in two requests (its two halves), so the whole marker exists
  # only in the arena: libfuse's request buffers keep the payload of the last request each
  # worker thread received, and are the daemon's heap, not the arena.
  local marker
  for ((i = 0; i < 64; i++)); do
    marker="chargefs-secret-$i-$(printf '%08d' $((i * 7919)))-"
    printf '%s' "${marker:0:12}" > "$MNT/f$i"
    printf '%s' "${marker:12}" >> "$MNT/f$i"
  done
  check "the files read back" [ "$(cat "$MNT/f63")" = "chargefs-secret-63-$(printf '%08d' $((63 * 7919)))-" ]
  local vsz; vsz=$(awk '/^VmSize/ {print $2 * 1024}' "/proc/$dpid/status")
  log "  daemon $dpid: VmSize $(fmt_mib "$vsz"), RSS $(awk '/^VmRSS/ {print $2, $3}' "/proc/$dpid/status")"
  kill -SEGV "$dpid"
  for ((i = 0; i < 600; i++)); do kill -0 "$dpid" 2>/dev/null || break; sleep 0.1; done
  wait "$dpid" 2>/dev/null || true
  # The dead daemon leaves a dead FUSE mount.
  fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
  restore_knobs
  core=$(find "$SCR" -maxdepth 1 -name "core.$dpid" -print -quit)
  check "a core was written" [ -n "$core" ]
  [ -n "$core" ] || return 0
  local size found
  size=$(stat -c %s "$core")
  found=$({ grep -a -o 'chargefs-secret-[0-9]*-' "$core" || true; } | sort -u | wc -l)
  [ "$found" = 0 ] || log "  found: $(grep -a -o 'chargefs-secret-[0-9]*-' "$core" | sort | uniq -c | tr '\n' ' ')"
  log "  core: $(fmt_mib "$size") (allocated $(du -k "$core" | awk '{print $1}') KiB) for a process of $(fmt_mib "$vsz"); secrets found in it: $found of 64"
  check "the core holds none of the 64 files' contents" [ "$found" = 0 ]
  check "the core is far smaller than the arena (< 128 MiB for a 1 GiB arena)" le "$size" $((128 * MiB))
}

stat_of() { awk -v k="$2" '$1 == k {print $2; f=1} END {if (!f) print 0}' "$1/memory.stat"; }

# Swap (case 4): under memory pressure in the target, the arena's pages stay in RAM (tmpfs
# noswap, Linux 6.4+) and the target's own anonymous memory is swapped instead. Where the host
# has no swap, a 64 MiB swap file of the test's own is on for the test's few seconds.
t_swap() {
  new_env
  kernel_at_least 6 4 || { log "  cannot run: $(uname -r) has no tmpfs noswap (6.4+): there the arena can be swapped (README)"; return 1; }
  [ "$(cg_version)" = 1 ] || { log "  cannot run: written for cgroup v1's memory.stat (total_swap)"; return 1; }
  new_cgroups
  cg_set_limit "$T" $((64 * MiB))
  if [ -z "$(swapon --noheadings --show=NAME)" ]; then
    local sw=$SCR/swap
    dd if=/dev/zero of="$sw" bs=1M count=64 status=none
    chmod 600 "$sw"
    mkswap "$sw" >/dev/null
    SWAPFILES+=("$sw")
    swapon -p -2 "$sw"
    log "  no swap on this host: a 64 MiB swap file is on for this test"
  fi
  cfs_mount "$MNT" "memcg=$T,size=1g" "$D"
  local dpid=$CFS_PID sum
  head -c $((40 * MiB)) /dev/urandom > "$SCR/data"
  sum=$(sha256sum < "$SCR/data")
  cp "$SCR/data" "$MNT/data"
  rm -f "$SCR/data"
  log "  stored 40 MiB; target: $(cg_describe "$T"), shmem $(fmt_mib "$(stat_of "$T" total_shmem)")"
  # 48 MiB of anonymous memory in the 64 MiB target: 24 MiB must go to swap.
  # It holds its memory until killed; the counters are read while it does.
  ( echo "$BASHPID" > "$T/cgroup.procs" && exec "$CFS_PYTHON" -c 'import sys, time
b = bytearray(48 << 20)
for i in range(0, len(b), 4096): b[i] = 1
open(sys.argv[1], "w").close()
time.sleep(60)' "$SCR/touched" ) &
  local hog=$! i shmem swap
  for ((i = 0; i < 300; i++)); do
    [ ! -e "$SCR/touched" ] && kill -0 "$hog" 2>/dev/null || break
    sleep 0.1
  done
  shmem=$(stat_of "$T" total_shmem); swap=$(stat_of "$T" total_swap)
  check "the memory hog ran to its end" [ -e "$SCR/touched" ]
  kill "$hog" 2>/dev/null || true
  wait "$hog" 2>/dev/null || true
  log "  after 48 MiB of anonymous memory ran in the target: shmem $(fmt_mib "$shmem"), swap used by the target $(fmt_mib "$swap")"
  check "the pressure was real: the target swapped" ge "$swap" $((16 * MiB))
  check "every arena page stayed in RAM (shmem ≥ 40 MiB)" ge "$shmem" $((40 * MiB))
  check "the file reads back whole" [ "$(sha256sum < "$MNT/data")" = "$sum" ]
  check "no OOM kill in the target" [ "$(cg_oom_kills "$T")" = 0 ]
  check "unmounted cleanly" cfs_umount "$MNT" "$dpid"
  local f
  for f in "${SWAPFILES[@]}"; do
    for ((i = 0; i < 20; i++)); do swapoff "$f" 2>/dev/null && break; sleep 0.5; done
    if swapon --noheadings --show=NAME | grep -qxF "$f"; then log "  warning: $f still on; the EXIT trap tries again"; fi
  done
}

test_main "arena tests" 120 "$@"
