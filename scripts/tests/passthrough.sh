#!/usr/bin/env bash
# FUSE passthrough for large files (Linux 6.9+, root) on real mounts charged to a real memory
# cgroup: a file of 1 MiB or more opened read-only, with nothing else holding it open and no hole
# in it, is read by the kernel from a backing file of its own, charged to the target like every
# page. Each test mounts with memcg= and reads from a cgroup of its own (the "reader"):
#   reads_bypass_daemon   64 MiB read 16 times: the data, a backing file in the status, and the
#                         daemon's CPU time for those reads against a passthrough=off mount
#   reader_charged_nothing reads and maps (shared, private) of a passthrough open: the reader's
#                         cgroup holds no shmem; the target is charged what is stored (±1 MiB)
#   backed_before_open    files of 16 MiB written without a dense append past 1 MiB (fallocate then
#                         write, writes last piece first, stores through mmap + msync, dd) each
#                         have a backing file before any read-only open (the status), so that
#                         open copies nothing; each passes through and reads back, the reader's
#                         cgroup holds no shmem, the target is charged what is stored (±1 MiB)
#   mmap_cache_dropped    a 32 MiB file written through a shared mapping from a cgroup of its own
#                         (the "writer"): after its close the writer's cgroup holds none of the
#                         page cache the mapping used (the daemon drops it at the last release), so
#                         the reader's passthrough open has none to invalidate; the bytes read back,
#                         the reader holds no shmem and no cache, the target what is stored (±1 MiB)
#   writers_beside_readers a read-only (passthrough) and a read-write open of one file: overwrite,
#                         write past the end, truncate up, punch, truncate down through the writer,
#                         each seen at once through the reader (pread, shared and private maps);
#                         the reader's cgroup holds no shmem after mapping what truncate-up added
#   writer_mmap           a writer opened beside a passthrough reader passes through too (the kernel
#                         takes no other kind of open then), with direct I/O for its read and write:
#                         a store through its shared mapping, its write(2) and the reader agree
#   descriptors_run_short the daemon at RLIMIT_NOFILE 64 and 80 large files: backing files stop
#                         when descriptors do, every file still reads back right through the daemon
#   not_offered           passthrough=off, and cache=page (where a passthrough open and a cached
#                         one would exclude each other): no backing file, reads right
#   crash_with_reader_open the daemon is killed (SIGKILL) while a passthrough reader holds one file
#                         open: another file's backing file (its passthrough opens closed) goes at
#                         once; the held one's stays charged to the target until the unmount (the
#                         kernel keeps a dead connection's registered backing files until then)
# Usage: scripts/tests/passthrough.sh [TEST...] | --list      Env: CHARGEFSD, CFS_TEST_TIMEOUT (90)
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
TESTS=(reads_bypass_daemon reader_charged_nothing backed_before_open mmap_cache_dropped writers_beside_readers writer_mmap descriptors_run_short not_offered
       crash_with_reader_open)
PY=$(dirname "$SELF")/passthrough.py

# shmem_drops_to CG BYTES: the cgroup's shmem (its subtree's) falls to BYTES within 5 s.
shmem_drops_to() { local i; for i in $(seq 50); do [ "$(cg_shmem "$1")" -le "$2" ] && return 0; sleep 0.1; done; return 1; }
status_of() { getfattr -n user.chargefs.status --only-values "$1" 2>/dev/null | sed -n "s/^$2=//p"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# cg_file CG: page cache bytes charged to the cgroup and its descendants (shmem included).
cg_file() {
  if [ "$(cg_version)" = 1 ]; then awk '$1 == "total_cache" {print $2}' "$1/memory.stat"
  else awk '$1 == "file" {print $2}' "$1/memory.stat"; fi
}
# file_drops_to CG BYTES: the cgroup's page cache falls to BYTES within 5 s.
file_drops_to() { local i; for i in $(seq 50); do [ "$(cg_file "$1")" -le "$2" ] && return 0; sleep 0.1; done; return 1; }

# setup NAME [OPTS]: a target (512 MiB), a reader cgroup, a mount; sets SCR MNT T R DPID.
setup() {
  SCR=$(cfs_tempdir cfspt); CFS_DIRS+=("$SCR"); CFS_LOGDIR=$SCR
  local parent; parent=$(cg_parent)
  T=$parent/cfspt-$$-target; R=$parent/cfspt-$$-reader
  cg_create "$T" $((512 * MiB)); cg_create "$R"
  MNT=$SCR/mnt
  cfs_mount "$MNT" "memcg=$T,size=1g${1:+,$1}"
  DPID=$CFS_PID
}
in_reader() { cg_run_in "$R" "$@"; }

t_reads_bypass_daemon() {
  setup
  check "passthrough on (kernel $(uname -r))" [ "$(status_of "$MNT" passthrough)" = on ]
  head -c $((64 * MiB)) /dev/urandom > "$SCR/src"
  cp "$SCR/src" "$MNT/big"
  in_reader cmp "$SCR/src" "$MNT/big"  # the first open moves the file into its backing file
  check "one backing file" [ "$(status_of "$MNT" backing_files)" = 1 ]
  local t0 t1 i; t0=$(cpu_ticks "$DPID")
  for i in $(seq 16); do in_reader cat "$MNT/big" > /dev/null; done
  t1=$(cpu_ticks "$DPID")
  check "the data reads back" in_reader cmp "$SCR/src" "$MNT/big"
  # The same reads from a mount without passthrough, for the daemon's CPU time.
  local off=$SCR/off; cfs_mount "$off" "size=1g,passthrough=off"; local opid=$CFS_PID
  cp "$SCR/src" "$off/big"; cat "$off/big" > /dev/null
  local o0 o1; o0=$(cpu_ticks "$opid")
  for i in $(seq 16); do cat "$off/big" > /dev/null; done
  o1=$(cpu_ticks "$opid")
  log "  daemon CPU for 1 GiB read: $((t1 - t0)) ticks with passthrough, $((o1 - o0)) without"
  check "the daemon's CPU for the reads is under a fifth of what it is without passthrough" \
    [ $(((t1 - t0) * 5)) -lt $((o1 - o0)) ]
  check "clean unmounts" cfs_umount "$off" "$opid"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_reader_charged_nothing() {
  setup
  head -c $((48 * MiB)) /dev/urandom > "$SCR/src"
  cp "$SCR/src" "$MNT/big"
  local base; base=$(cg_usage "$T")
  check "read through passthrough" in_reader cmp "$SCR/src" "$MNT/big"
  check "maps read back (shared, private)" in_reader "$CFS_PYTHON" "$PY" map "$MNT/big"
  check "it passed through" [ "$(status_of "$MNT" backing_files)" = 1 ]
  local rs; rs=$(cg_shmem "$R")
  log "  reader: usage $(cg_usage "$R") shmem $rs; target: usage $(cg_usage "$T") (before the reads $base) shmem $(cg_shmem "$T")"
  check "the reader's cgroup holds no shmem" [ "$rs" = 0 ]
  check "the target is charged what is stored (48 MiB, ±1 MiB)" near "$(cg_shmem "$T")" $((48 * MiB)) "$MiB"
  rm "$MNT/big"
  check "unlink gives the charge back (to the reserve, ≤ 1 MiB)" shmem_drops_to "$T" "$MiB"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_backed_before_open() {
  setup
  head -c $((16 * MiB)) /dev/urandom > "$SCR/src"
  local n=0 pattern
  for pattern in falloc reverse mmap dd; do
    if [ "$pattern" = dd ]; then
      dd if="$SCR/src" of="$MNT/$pattern" bs=4M status=none
    else
      "$CFS_PYTHON" "$PY" fill "$pattern" "$SCR/src" "$MNT/$pattern"
    fi
    n=$((n + 1))
    check "$pattern: backed before its first read-only open" [ "$(status_of "$MNT" backing_files)" = "$n" ]
    check "$pattern: reads back through the reader" in_reader cmp "$SCR/src" "$MNT/$pattern"
    check "$pattern: the open made no other backing file" [ "$(status_of "$MNT" backing_files)" = "$n" ]
  done
  check "maps read back (shared, private)" in_reader "$CFS_PYTHON" "$PY" map "$MNT/falloc"
  check "the reader's cgroup holds no shmem" [ "$(cg_shmem "$R")" = 0 ]
  log "  target: shmem $(cg_shmem "$T"), stored $(status_of "$MNT" stored_bytes)"
  check "the target is charged what is stored (64 MiB, ±1 MiB)" near "$(cg_shmem "$T")" $((64 * MiB)) "$MiB"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_mmap_cache_dropped() {
  setup
  local wcg; wcg=$(cg_parent)/cfspt-$$-writer; cg_create "$wcg"
  head -c $((32 * MiB)) /dev/urandom > "$SCR/src"
  "$CFS_PYTHON" -c 'pass'   # the interpreter's own files cached before the writer's baseline
  local w0; w0=$(cg_file "$wcg")
  # ftruncate to 32 MiB, stores through a shared mapping, msync, munmap, close (passthrough.py fill)
  cg_run_in "$wcg" "$CFS_PYTHON" "$PY" fill mmap "$SCR/src" "$MNT/mapped"
  log "  writer's page cache: $(cg_file "$wcg") right after its close (before it $w0)"
  # Without the drop, the 32 MiB the mapping used stay on the writer until reclaim, and the next
  # passthrough open invalidates them before it returns.
  check "the writer's cgroup gives back the mapping's page cache (≤ its start + 4 MiB)" file_drops_to "$wcg" $((w0 + 4 * MiB))
  log "  writer's page cache: $(cg_file "$wcg") after the last release"
  check "backed before its first read-only open" [ "$(status_of "$MNT" backing_files)" = 1 ]
  local r0; r0=$(cg_file "$R")
  check "the bytes read back through the reader" in_reader cmp "$SCR/src" "$MNT/mapped"
  check "it passed through (no other backing file)" [ "$(status_of "$MNT" backing_files)" = 1 ]
  log "  reader: shmem $(cg_shmem "$R"), page cache $(cg_file "$R") (before the read $r0); target shmem $(cg_shmem "$T")"
  check "the reader's cgroup holds no shmem" [ "$(cg_shmem "$R")" = 0 ]
  check "the reader's cgroup gained no page cache for the file (≤ 4 MiB)" le "$(cg_file "$R")" $((r0 + 4 * MiB))
  check "the target is charged what is stored (32 MiB, ±1 MiB)" near "$(cg_shmem "$T")" $((32 * MiB)) "$MiB"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_writers_beside_readers() {
  setup
  head -c $((2 * MiB)) /dev/urandom > "$MNT/f"
  check "reader and writer agree through every change" in_reader "$CFS_PYTHON" "$PY" rw "$MNT/f"
  check "the reader's open passed through" [ "$(status_of "$MNT" backing_files)" = 1 ]
  local rs; rs=$(cg_shmem "$R")
  log "  reader: usage $(cg_usage "$R") shmem $rs"
  check "the reader's cgroup holds no shmem (its maps never met a hole)" [ "$rs" = 0 ]
  local size; size=$(stat -c %s "$MNT/f")
  check "the target is charged what is stored (±1 MiB)" near "$(cg_shmem "$T")" "$(($(stat -c %b "$MNT/f") * 512))" "$MiB"
  log "  file size $size, stored $(status_of "$MNT" stored_bytes)"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_writer_mmap() {
  setup
  head -c $((2 * MiB)) /dev/urandom > "$MNT/f"
  check "a writer beside a passthrough reader: mapping, write(2) and reader agree" \
    in_reader "$CFS_PYTHON" "$PY" writer_mmap "$MNT/f"
  check "the reader's cgroup holds no shmem" [ "$(cg_shmem "$R")" = 0 ]
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_descriptors_run_short() {
  SCR=$(cfs_tempdir cfspt); CFS_DIRS+=("$SCR"); CFS_LOGDIR=$SCR
  local parent; parent=$(cg_parent); T=$parent/cfspt-$$-target; cg_create "$T" $((512 * MiB))
  MNT=$SCR/mnt
  CFS_WRAP="prlimit --nofile=64:64" cfs_mount "$MNT" "memcg=$T,size=1g"; DPID=$CFS_PID
  head -c $((1 * MiB + 4096)) /dev/urandom > "$SCR/src"
  local i bad=0
  for i in $(seq 80); do cp "$SCR/src" "$MNT/f$i"; done
  for i in $(seq 80); do cmp -s "$SCR/src" "$MNT/f$i" || bad=$((bad + 1)); done
  local n; n=$(status_of "$MNT" backing_files)
  log "  backing files: $n of 80 files (daemon at RLIMIT_NOFILE 64)"
  check "every file reads back" [ "$bad" = 0 ]
  check "backing files stopped short of 80" [ "$n" -lt 80 ]
  check "and some were made" [ "$n" -gt 0 ]
  check "again, now that they are settled" bash -c "for i in \$(seq 80); do cmp -s '$SCR/src' '$MNT/f'\$i || exit 1; done"
  check "the daemon is alive" kill -0 "$DPID"
  check "clean unmount" cfs_umount "$MNT" "$DPID"
}

t_not_offered() {
  setup passthrough=off
  head -c $((4 * MiB)) /dev/urandom > "$SCR/src"
  cp "$SCR/src" "$MNT/big"
  check "passthrough=off: reads right" in_reader cmp "$SCR/src" "$MNT/big"
  check "passthrough=off: status says off" [ "$(status_of "$MNT" passthrough)" = off ]
  check "passthrough=off: no backing file" [ "$(status_of "$MNT" backing_files)" = 0 ]
  check "clean unmount" cfs_umount "$MNT" "$DPID"
  local page=$SCR/page; cfs_mount "$page" "size=1g,cache=page"; local ppid=$CFS_PID
  cp "$SCR/src" "$page/big"
  check "cache=page: reads right" cmp "$SCR/src" "$page/big"
  check "cache=page: status says off" [ "$(status_of "$page" passthrough)" = off ]
  check "cache=page: no backing file" [ "$(status_of "$page" backing_files)" = 0 ]
  check "clean unmount" cfs_umount "$page" "$ppid"
}

t_crash_with_reader_open() {
  setup
  head -c $((16 * MiB)) /dev/urandom > "$MNT/held"
  head -c $((16 * MiB)) /dev/urandom > "$MNT/closed"
  in_reader cat "$MNT/closed" > /dev/null  # a passthrough open, closed again
  local fifo=$SCR/hold; mkfifo "$fifo"
  # A reader holds a passthrough open of the other file until told (a line on the fifo).
  cg_run_in "$R" "$CFS_PYTHON" -c "
import os, sys
fd = os.open('$MNT/held', os.O_RDONLY); os.pread(fd, 4096, 0)
print('held', flush=True); open('$fifo').read(); os.close(fd)" > "$SCR/reader.out" &
  local rpid=$!
  for _ in $(seq 50); do grep -q held "$SCR/reader.out" 2>/dev/null && break; sleep 0.1; done
  check "both files have backing files" [ "$(status_of "$MNT" backing_files)" = 2 ]
  kill -9 "$DPID"; wait "$DPID" 2>/dev/null || true
  sleep 0.5
  local held; held=$(cg_shmem "$T")
  log "  target shmem with the daemon dead and one reader open: $held"
  check "the closed file's pages went with the daemon; the held one's stay (16 MiB, ±1 MiB)" near "$held" $((16 * MiB)) "$MiB"
  echo > "$fifo"; wait "$rpid" || true
  log "  target shmem after the reader closed: $(cg_shmem "$T") (the dead connection holds the backing file until the unmount)"
  check "unmounted" cfs_umount "$MNT"
  check "the rest goes with the unmount" shmem_drops_to "$T" "$MiB"
  log "  target shmem after the unmount: $(cg_shmem "$T")"
}

if [ "${1:-}" != --one ] && [ "${1:-}" != --list ]; then
  major=$(uname -r | cut -d. -f1); minor=$(uname -r | cut -d. -f2)
  if [ "$major" -lt 6 ] || { [ "$major" = 6 ] && [ "$minor" -lt 9 ]; }; then
    echo "cannot run: FUSE passthrough needs Linux 6.9+, this is $(uname -r)"; echo "0 passed, 1 failed"; exit 1
  fi
fi
test_main "passthrough tests" 90 "$@"
