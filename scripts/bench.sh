#!/usr/bin/env bash
# Benchmark: kernel tmpfs vs chargefs (no memcg) vs chargefs with memcg= on a real cgroup (and
# chargefs over FUSE's io_uring transport where the kernel has it), side by side, same pinning,
# each workload on each in alternation, medians of 4 runs.
# Usage: bash scripts/bench.sh [--quick] [--scale] [--reps N] [--only GROUP] [--baseline BIN [--ab]] [--cfs-opts OPTS] [--no-uring] [--no-setup]
#   --quick     small sizes and one repetition (a smoke run of a minute or two)
#   --scale     adds per-op cost at 1k/100k/1M files and 16 GiB stored (needs ~18 GiB free RAM)
#   --only      runs one group of workloads (seq, rand, first, meta, readdir, par8, real, writes, retarget) and no memory probe;
#               first: the first sequential read of a file just written by each pattern (fallocate
#               then write, dense append, random 1 MiB fill, mmap, O_DIRECT, cp, dd);
#               real: untar, git clone, git fsck, make, SQLite and rm -rf as a user runs them
#               (unpinned), on fresh tmpfs, chargefs over /dev/fuse and (where the kernel has it)
#               over io_uring, and memfs_ll where it is built;
#               writes (only with --only): 1 MiB sequential writes, the read of that file and 4 KiB
#               random overwrites of a laid-out file, with the daemons and fio on one CPU and then
#               on two (daemons on BENCH_CROSS_CPU, default 1), on tmpfs, chargefs, floorfs and
#               floorfs --splice;
#               retarget (only with --only): what moving a tree's charge to another cgroup costs:
#               1 GiB of 256 KiB files under a directory of chargefs memcg=, setfattr
#               user.chargefs.memcg to another cgroup and back (-x), against tmpfs's way (cp -r by a
#               process of the other cgroup, then rm -rf of the old tree)
#   --no-uring  every chargefs mount says io_uring=off, and no io_uring column
#   --cfs-opts  more mount options for this build's mounts (not the baseline's): with --ab and
#               --baseline set to this same build, `--cfs-opts takeover` measures what -o takeover
#               costs, row by row
#   --baseline  also mounts another build of chargefsd (e.g. an older commit's) with the default
#               options, in the same run, and prints chargefs/baseline per workload
#   --ab        with --baseline: only tmpfs, chargefs, chargefs memcg= and the baseline (no cache=page,
#               io_uring, floor or peer column and no real workloads, which have no baseline
#               column): the A/B of every pinned row and the memory table in about half the time.
#               chargefs and the baseline run side by side after chargefs memcg=, swapping places
#               every repetition (so the memcg/no-memcg ratio is not fair there: memcg= always
#               runs right after tmpfs); the table adds the median of the paired ratios
# Env: BENCH_DAEMON_CPU (default 0), BENCH_CLIENT_CPU (default 0), CHARGEFSD=a built daemon
#      (default: release build in .build-bench), BENCH_DIR=work dir (default /tmp),
#      LIBFUSE_SRC=a libfuse source tree (3.17+), whose example/memfs_ll.cc is built with g++
#      against the installed fuse3 as a peer column for create/stat/unlink and the real workloads,
#      or MEMFS_LL=a built memfs_ll; without either the column is skipped (no libfuse code lives
#      in this repository).
# Root only. Leaves nothing mounted, running or created.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# 4 repetitions by default: the two chargefs mounts swap order every repetition, and an even
# count gives each order the same weight in the memcg/no-memcg ratio (whichever ran second lost
# 5-18% in some 3-repetition runs, on rows where memcg= runs no code at all).
quick=0 scale=0 reps=4 setup=1 only= only_given=0 baseline= uring=1 ab=0 cfs_opts=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; reps=1 ;;
    --scale) scale=1 ;;
    --reps) reps=${2:-}; shift $(($# > 1)) ;;
    --only) only=${2:-}; only_given=1; shift $(($# > 1)) ;;
    --baseline) baseline=${2:-}; shift $(($# > 1)); [ -x "$baseline" ] ||
      { echo "bench.sh: --baseline needs an executable chargefsd, not '$baseline'" >&2; exit 2; } ;;
    --no-setup) setup=0 ;;
    --no-uring) uring=0 ;;
    --ab) ab=1 ;;
    --cfs-opts) cfs_opts=${2:-}; shift $(($# > 1)); [[ $cfs_opts =~ ^[a-z_]+(=[A-Za-z0-9_./-]+)?(,[a-z_]+(=[A-Za-z0-9_./-]+)?)*$ ]] ||
      { echo "bench.sh: --cfs-opts needs mount options like takeover or takeover,takeover_max=3, not '$cfs_opts'" >&2; exit 2; } ;;
    -h|--help) sed -n '2,/^# Root only/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) sed -n '5s/^# //p' "$0" >&2; exit 2 ;;
  esac
  shift
done
case "$only_given:$only" in 0:|1:seq|1:rand|1:first|1:meta|1:readdir|1:par8|1:real|1:writes|1:retarget) ;;
  *) echo "bench.sh: --only needs one of seq, rand, first, meta, readdir, par8, real, writes, retarget, not '$only'" >&2; exit 2 ;;
esac
[ "$ab" = 0 ] || [ -n "$baseline" ] || { echo "bench.sh: --ab needs --baseline BIN" >&2; exit 2; }
[ "$ab" = 0 ] || [ "$only" != writes ] || { echo "bench.sh: --ab has no writes group (use --only writes --baseline BIN)" >&2; exit 2; }
[ "$ab" = 0 ] || [ "$only" != retarget ] || { echo "bench.sh: --ab has no retarget group (the baseline has no per-directory target)" >&2; exit 2; }
[[ $reps =~ ^[1-9][0-9]{0,2}$ ]] || { echo "bench.sh: --reps needs a whole number from 1 to 999, not '$reps'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "bench.sh: run as root" >&2; exit 1; }
unset CHARGEFS_CGROUP_VERSION
# shellcheck source=scripts/tests/lib.sh
source "$here/tests/lib.sh"
trap cfs_cleanup EXIT
trap 'exit 130' INT TERM

if [ "$setup" = 1 ] && [ -z "${CHARGEFSD:-}" ]; then
  SWIFT_SCRATCH=${SWIFT_SCRATCH:-$repo/.build-bench} bash "$here/setup.sh" --release
fi
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
if [ -z "${CHARGEFSD:-}" ]; then
  CHARGEFSD=$(cd "$repo" && swift build -c release --scratch-path "${SWIFT_SCRATCH:-$repo/.build-bench}" --show-bin-path)/chargefsd
fi
[ -x "$CHARGEFSD" ] || die "no daemon at $CHARGEFSD"
export CHARGEFSD
for t in fio taskset cc; do command -v "$t" >/dev/null || die "$t missing (scripts/setup.sh installs it)"; done

# --- sizes ---------------------------------------------------------------------------------------
if [ "$quick" = 1 ]; then
  SEQ=128M; SEQ_B=$((128 * MiB)); RAND=32M; RUNTIME=3; NMETA=2000; NDIR=10000; PAR=16M
else
  SEQ=1G; SEQ_B=$((1024 * MiB)); RAND=256M; RUNTIME=20; NMETA=20000; NDIR=100000; PAR=128M
fi
FSSIZE=4G; [ "$scale" = 1 ] && FSSIZE=18G
PREFAULT_MIB=3072; [ "$quick" = 1 ] && PREFAULT_MIB=512

ncpu=$(nproc)
# Daemon and client share one CPU by default: on this VM a wakeup across CPUs (an IPI) costs
# ~150 us, and a FUSE request needs two, so split pinning measured 6x fewer 4k IOPS (5.9k vs
# 37.8k randwrite). The kernel's tmpfs runs under the same pinning.
DCPU=${BENCH_DAEMON_CPU:-0}
CCPU=${BENCH_CLIENT_CPU:-0}
W=$(cfs_tempdir chargefs-bench); CFS_DIRS+=("$W")  # (recorded here: cfs_tempdir ran in a subshell)
CFS_LOGDIR=$W
MB=$W/metabench
cc -O2 -o "$MB" "$here/bench/metabench.c"
FLOOR=$W/floorfs
# shellcheck disable=SC2046
cc -O2 -o "$FLOOR" "$here/bench/floorfs.c" $(pkg-config --cflags --libs fuse3)

PARENT=$(cg_parent)
CGW=$PARENT/cfsbench-$$-workload   # fio and metabench run here
CGD=$PARENT/cfsbench-$$-daemon     # both daemons run here (one at a time is measured)
CGT=$PARENT/cfsbench-$$-target     # memcg= target
CGR=$PARENT/cfsbench-$$-reader     # the memory probe reads back from here
cg_create "$CGW"; cg_create "$CGD"; cg_create "$CGT" "$(numfmt --from=iec "$FSSIZE")"; cg_create "$CGR"

FS=(tmpfs cfs cfsm cfsp)
[ -z "$baseline" ] || FS+=(base)
[ "$ab" = 0 ] || FS=(tmpfs cfs cfsm base)
# chargefs over FUSE's io_uring transport (Linux 6.14+), where the kernel has it: enable_uring is
# set only while that mount starts (INIT settles the transport) and put back at once, and by the
# exit trap if anything fails in between.
URING_KNOB=/sys/module/fuse/parameters/enable_uring
URING_OLD=
if [ "$ab" = 1 ]; then
  echo "no io_uring column (--ab)" >&2
elif [ "$uring" = 0 ]; then
  echo "no io_uring column (--no-uring); every chargefs mount says io_uring=off" >&2
elif [ -e "$URING_KNOB" ]; then
  URING_OLD=$(cat "$URING_KNOB")
  trap 'echo "$URING_OLD" > "$URING_KNOB"; cfs_cleanup' EXIT
  FS+=(cfsu)
else
  echo "no io_uring column: $(uname -r) has no FUSE over io_uring ($URING_KNOB missing)" >&2
fi
CFS=("${FS[@]:1}")   # the chargefs mounts
declare -A MNT PID
for f in "${FS[@]}"; do MNT[$f]=$W/$f; done
mkdir -p "${MNT[tmpfs]}"
mount -t tmpfs -o "size=$FSSIZE" tmpfs "${MNT[tmpfs]}"; CFS_MOUNTS+=("${MNT[tmpfs]}")
CFS_WRAP="taskset -c $DCPU"
declare -A OPTS=([cfs]="size=$FSSIZE" [cfsm]="size=$FSSIZE,memcg=$CGT" [cfsp]="size=$FSSIZE,cache=page"
                 [base]="size=$FSSIZE" [cfsu]="size=$FSSIZE,io_uring=on")
if [ "$uring" = 0 ] && [ "$ab" = 0 ]; then for f in cfs cfsm cfsp base; do OPTS[$f]+=,io_uring=off; done; fi
if [ -n "$cfs_opts" ]; then for f in cfs cfsm cfsp cfsu; do OPTS[$f]+=,$cfs_opts; done; fi
# mount_cfs F: mounts chargefs mount F with its options, from the baseline build for "base".
mount_cfs() {
  if [ "$1" = base ]; then CHARGEFSD=$baseline cfs_mount "${MNT[$1]}" "${OPTS[$1]}" "$CGD"
  elif [ "$1" = cfsu ]; then
    echo Y > "$URING_KNOB"
    cfs_mount "${MNT[$1]}" "${OPTS[$1]}" "$CGD" || { echo "$URING_OLD" > "$URING_KNOB"; return 1; }
    echo "$URING_OLD" > "$URING_KNOB"
    [ "$(getfattr -n user.chargefs.status --only-values "${MNT[$1]}" 2>/dev/null | sed -n 's/^transport=//p')" = io_uring ] ||
      die "chargefs io_uring=on at ${MNT[$1]} does not serve over io_uring"
  else cfs_mount "${MNT[$1]}" "${OPTS[$1]}" "$CGD"; fi
  # The process serving requests (with -o takeover that is not the one started: the keeper).
  PID[$1]=$(getfattr -n user.chargefs.status --only-values "${MNT[$1]}" 2>/dev/null | tr ' ' '\n' | sed -n 's/^pid=\([0-9]*\)$/\1/p' | head -1)
  [ -n "${PID[$1]}" ] || PID[$1]=$CFS_PID
}
for f in "${CFS[@]}"; do mount_cfs "$f"; done
PID[tmpfs]=
# The floors: a minimal C FUSE file system (scripts/bench/floorfs.c), for the random and
# sequential I/O rows only: what the FUSE round trip itself allows on this machine, under the same
# pinning (floor), and what reads cost when the kernel serves them without the daemon (pass).
FLOORS=()
start_floor() {
  local f=$1; shift
  MNT[$f]=$W/$f; mkdir -p "${MNT[$f]}"
  ( echo "$BASHPID" > "$CGD/cgroup.procs" && exec taskset -c "$DCPU" "$FLOOR" "$@" "${MNT[$f]}" ) >"$W/$f.log" 2>&1 &
  PID[$f]=$!; CFS_PIDS+=("${PID[$f]}"); CFS_MOUNTS+=("${MNT[$f]}")
  wait_mounted "${MNT[$f]}" 20 "${PID[$f]}" || die "floorfs $* did not mount: $(cat "$W/$f.log")"
  FLOORS+=("$f")
}
if [ "$ab" = 0 ]; then
  start_floor floor
  start_floor pass --passthrough
  grep -q "passthrough negotiated" "$W/pass.log" ||
    { echo "no passthrough floor: $(cat "$W/pass.log")"; FLOORS=(floor); }
fi
# floorfs --splice (the writes group only): libfuse's splice paths, requests spliced from
# /dev/fuse into a pipe and a write's data from there into the memfd, reads spliced back out.
if [ "$only" = writes ]; then
  start_floor splice --splice
  grep -q "splice negotiated" "$W/splice.log" || die "floorfs --splice: $(cat "$W/splice.log")"
fi

# The peer: libfuse's own example memfs_ll (example/memfs_ll.cc, libfuse 3.17+), a multithreaded
# low-level FUSE file system holding files in std::vectors, for the metadata rows (create, stat,
# unlink), pinned like the others. Built from the user's libfuse tree (LIBFUSE_SRC) with g++
# against the installed fuse3. When that fails (a newer tree than the installed fuse3), it is
# built once more from a copy ported minimally to the older API: without the tmpfile handler and
# parallel_direct_writes (3.17+; the latter only with its -o fuse_dio, unused here), and with a
# stand-in for 3.19's fuse_daemonize.h (the peer runs in the foreground; FUSE_CAP flags set the
# 3.14 way). MEMFS_LL=a binary built elsewhere (e.g. against its own libfuse) is used as given.
PEERS=()
peer_skip=
build_memfs_ll() {
  if [ -n "${MEMFS_LL:-}" ]; then
    [ -x "$MEMFS_LL" ] || { peer_skip="MEMFS_LL=$MEMFS_LL is not executable"; return 1; }
    PEER_BIN=$MEMFS_LL; PEER_FROM=$MEMFS_LL; return 0
  fi
  [ -n "${LIBFUSE_SRC:-}" ] || { peer_skip="set LIBFUSE_SRC to a libfuse 3.17+ source tree (or MEMFS_LL to a built memfs_ll)"; return 1; }
  local src=$LIBFUSE_SRC/example/memfs_ll.cc fuse3v
  fuse3v=$(pkg-config --modversion fuse3 2>/dev/null) || { peer_skip="no fuse3 development files (pkg-config fuse3)"; return 1; }
  [ -f "$src" ] || { peer_skip="no $src (memfs_ll came with libfuse 3.17)"; return 1; }
  command -v g++ >/dev/null || { peer_skip="g++ missing"; return 1; }
  PEER_BIN=$W/memfs_ll
  PEER_FROM="$src$(git -C "$LIBFUSE_SRC" describe --tags --always 2>/dev/null | sed 's/^/ at /')"
  local flags=(-O2 -std=c++17 -DHAVE_LINUX_LIMITS_H -pthread)
  # shellcheck disable=SC2046
  g++ "${flags[@]}" -o "$PEER_BIN" "$src" $(pkg-config --cflags --libs fuse3) >"$W/memfs_ll.build" 2>&1 && return 0
  mkdir -p "$W/memfs_ll.port"
  sed -e '/^[[:space:]]*\.tmpfile[[:space:]]*=/d' -e '/parallel_direct_writes[[:space:]]*=/d' "$src" > "$W/memfs_ll.port/memfs_ll.cc"
  cat > "$W/memfs_ll.port/fuse_daemonize.h" <<'H'
/* bench.sh's stand-in for libfuse 3.19's fuse_daemonize.h on an older fuse3: foreground only. */
#pragma once
#include <fuse_lowlevel.h>
#define FUSE_DAEMONIZE_NO_BACKGROUND 1
static inline int fuse_daemonize_early_start(unsigned int flags) { (void)flags; return 0; }
static inline void fuse_daemonize_early_success(void) {}
static inline void fuse_daemonize_early_fail(int err) { (void)err; }
#ifndef FUSE_CONN_FLAG_SINGLE_ISSUER
#define fuse_set_conn_flag(conn, flag) ((void)(conn))
#endif
#if FUSE_MINOR_VERSION < 17
#define fuse_set_feature_flag(conn, flag) ((conn)->want |= (flag))
#endif
H
  # shellcheck disable=SC2046
  if g++ "${flags[@]}" -I"$W/memfs_ll.port" -o "$PEER_BIN" "$W/memfs_ll.port/memfs_ll.cc" $(pkg-config --cflags --libs fuse3) \
       >"$W/memfs_ll.build" 2>&1; then
    PEER_FROM="$PEER_FROM, ported to fuse3 $fuse3v"
    return 0
  fi
  peer_skip="$src does not build against fuse3 $fuse3v, even ported: $(grep -m1 'error' "$W/memfs_ll.build" || tail -1 "$W/memfs_ll.build")"
  return 1
}
# Two mounts of it where it has -o no_timeout (libfuse 3.19): memfs (its defaults: entries and
# attributes expire at once, so every stat and unlink looks the name up again) and memfsc, which
# caches them as chargefs does (for an hour; no_timeout: a day), with direct I/O as chargefs's
# default cache=direct where it has -o fuse_dio. Neither mounts with default_permissions (memfs_ll
# checks no permission at all); chargefs does, and kernels up to at least 6.18 then re-read a
# directory's attributes (a GETATTR) after every create or unlink in it.
declare -A PEER_OPTS=([memfs]="")
# start_peer NAME [OPTS] [unpinned]: mounts memfs_ll at $W/NAME (pinned like the daemons unless
# "unpinned"); on success NAME joins PEERS (pinned) or is left to the caller (unpinned).
start_peer() {
  local f=$1 opts=${2-${PEER_OPTS[$1]}} pin=(taskset -c "$DCPU")
  [ "${3:-}" != unpinned ] || pin=()
  MNT[$f]=$W/$f; mkdir -p "${MNT[$f]}"
  # shellcheck disable=SC2086
  ( echo "$BASHPID" > "$CGD/cgroup.procs" && exec "${pin[@]}" "$PEER_BIN" -f ${opts:+-o "$opts"} "${MNT[$f]}" ) >"$W/$f.log" 2>&1 &
  PID[$f]=$!; CFS_PIDS+=("${PID[$f]}"); CFS_MOUNTS+=("${MNT[$f]}")
  if wait_mounted "${MNT[$f]}" 20 "${PID[$f]}"; then [ "${3:-}" = unpinned ] || PEERS+=("$f")
  else peer_skip="memfs_ll $opts did not mount: $(cat "$W/$f.log")"; return 1; fi
}
PEER_BUILT=0
if [ "$ab" = 0 ] && { [ "$only_given:$only" = 0: ] || [ "$only" = meta ] || [ "$only" = real ]; }; then
  if build_memfs_ll; then
    PEER_BUILT=1
    if "$PEER_BIN" --help 2>&1 | grep -q no_timeout; then
      PEER_OPTS[memfsc]=no_timeout
      ! "$PEER_BIN" --help 2>&1 | grep -q fuse_dio || PEER_OPTS[memfsc]+=,fuse_dio
    fi
    if [ "$only" != real ]; then for f in "${!PEER_OPTS[@]}"; do start_peer "$f" || true; done; fi
  fi
  [ -z "$peer_skip" ] || echo "no memfs_ll column: $peer_skip"
fi

echo "chargefs benchmark: $(date -u +%F) $(uname -r), $ncpu CPUs, cgroup v$(cg_version), $reps repetition(s)$([ "$quick" = 1 ] && echo ", quick sizes")"
echo "daemon: $CHARGEFSD${cfs_opts:+ (its mounts with -o $cfs_opts too)}"
[ -z "$baseline" ] || echo "baseline daemon (mount base, default options): $baseline"
grep -q page_reporting /proc/cmdline && echo "free page reporting is on: $PREFAULT_MIB MiB of memory touched before every run"
echo "pinning: daemons on CPU $DCPU (taskset -c $DCPU), fio/metabench on CPU $CCPU (taskset -c $CCPU), same for every filesystem"
for f in "${CFS[@]}"; do echo "  $f pid ${PID[$f]}: $(taskset -cp "${PID[$f]}" | sed 's/.*: //') ($(cg_of_pid "${PID[$f]}"))"; done
echo "mounts: tmpfs ${MNT[tmpfs]} | chargefs ${MNT[cfs]} | chargefs memcg=$CGT ${MNT[cfsm]}"
echo

# run in the workload cgroup, pinned
run() { cg_run_in "$CGW" taskset -c "$CCPU" "$@"; }
# fio_val MNT METRIC FIO-ARGS...: one fio job, prints bw (MiB/s) or iops
fio_val() {
  local dir=$1 metric=$2; shift 2
  run fio --directory="$dir" --ioengine=psync --iodepth=1 --fallocate=none --output-format=json "$@" > "$W/fio.json"
  "$CFS_PYTHON" - "$W/fio.json" "$metric" "$W/fio.readbytes" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
io = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
open(sys.argv[3], "w").write("%d\n" % j["read"]["io_bytes"])
print("%.1f" % (io["bw_bytes"] / 1048576.0 if sys.argv[2] == "bw" else io["iops"]))
EOF
}
# A daemon's user+system CPU time, in clock ticks.
cpu_ticks() { if [ -n "${1:-}" ]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }
TICK=$(getconf CLK_TCK)
# the daemon's own resident memory: RssAnon + RssFile (RssShmem, the mapped arena, is the data)
rss_kib() { awk '$1 == "RssAnon:" || $1 == "RssFile:" {s += $2} END {print s}' "/proc/$1/status"; }
mb_val() { run "$MB" "$1" "$2" "$3" | awk '{print $4}'; }

declare -A R   # R[workload|fs] = "v1 v2 v3"
declare -A UNIT
WLS=()
add() { R["$1|$2"]="${R["$1|$2"]:-} $3"; }
wl() { WLS+=("$1"); UNIT[$1]=$2; }

# This VM reports free memory to its host (page_reporting): memory left free for a few seconds
# is given back, and touching it again costs a host page fault per page. Whichever run came
# first after a quiet moment paid that (a 1 GiB write at 190-450 MiB/s instead of 700-900), so
# every run starts from memory touched just before.
prefault() {
  "$CFS_PYTHON" -c 'import mmap, sys
n = int(sys.argv[1]) << 20
m = mmap.mmap(-1, n)
for i in range(0, n, 4096): m[i] = 1' "$PREFAULT_MIB"
}

# fill MNT FIO-ARGS...: writes first.0.0 ($SEQ bytes, 1 MiB blocks) the way the arguments say.
fill() {
  local dir=$1; shift
  run fio --directory="$dir" --name=first --bs=1M --size="$SEQ" --ioengine=psync --fallocate=none "$@" --output-format=terse >/dev/null
}

# One workload on one filesystem; appends to R (and, for reads, the daemon's CPU time to CPUR
# and the bytes read to BYTESR).
declare -A CPUR BYTESR
do_wl() {
  local w=$1 f=$2 m=${MNT[$2]} v c0
  prefault
  c0=$(cpu_ticks "${PID[$f]:-}")
  case "$w" in
    seqwrite) v=$(fio_val "$m" bw --name=seq --rw=write --bs=1M --size="$SEQ" --end_fsync=1) ;;
    seqread)  v=$(fio_val "$m" bw --name=seq --rw=read --bs=1M --size="$SEQ"); rm -f "$m"/seq.* ;;
    randwrite) v=$(fio_val "$m" iops --name=rnd --rw=randwrite --bs=4k --size="$RAND" --runtime="$RUNTIME") ;;
    # Random reads of a file fio lays out whole first (randwrite's leaves holes where it did not
    # write, and a file with holes is never read through passthrough), for the whole runtime (one
    # pass over the file took 15-100 ms: fio's start-up weighed as much as the reads).
    randread) rm -f "$m"/rnd.*
              v=$(fio_val "$m" iops --name=rrd --rw=randread --bs=4k --size="$RAND" --runtime="$RUNTIME" --time_based) ;;
    # The same file read again without dropping the cache: hot data, where a page cache wins.
    reread) v=$(fio_val "$m" iops --name=rrd --rw=randread --bs=4k --size="$RAND" --runtime="$RUNTIME" --time_based --invalidate=0)
            rm -f "$m"/rrd.* ;;
    create|stat|unlink)
      [ "$w" != create ] || { rm -rf "$m/meta"; mkdir "$m/meta"; }
      v=$(mb_val "$w" "$m/meta" "$NMETA")
      [ "$w" != unlink ] || rmdir "$m/meta" ;;
    readdir)
      rm -rf "$m/dir"; mkdir "$m/dir"; run "$MB" mkempty "$m/dir" "$NDIR" >/dev/null
      v=$(mb_val readdir "$m/dir" "$NDIR")
      run "$MB" unlink "$m/dir" "$NDIR" >/dev/null; rmdir "$m/dir" ;;
    par8) v=$(fio_val "$m" bw --name=par --rw=write --bs=1M --size="$PAR" --numjobs=8 --group_reporting --end_fsync=1)
          rm -f "$m"/par.* ;;
    # The first sequential read of a file just written (the write is not timed): whatever the
    # file system does at the first open of a file written that way (a move into a backing
    # file, say) is in the figure.
    1st-*)
      rm -f "$m"/first.*
      case "$w" in
        1st-falloc) fill "$m" --rw=write --fallocate=posix ;;
        1st-append) fill "$m" --rw=write ;;
        1st-rand)   fill "$m" --rw=randwrite ;;
        1st-mmap)   fill "$m" --rw=write --ioengine=mmap ;;
        1st-direct) fill "$m" --rw=write --direct=1 ;;
        1st-cp)     run cp "$W/first.src" "$m/first.0.0" ;;
        1st-dd)     run dd if="$W/first.src" of="$m/first.0.0" bs=1M status=none ;;
      esac
      v=$(fio_val "$m" bw --name=first --rw=read --bs=1M --size="$SEQ"); rm -f "$m"/first.* ;;
  esac
  add "$w" "$f" "$v"
  case "$w" in
    seqread|randread|reread)
      CPUR["$w|$f"]=$(( ${CPUR["$w|$f"]:-0} + $(cpu_ticks "${PID[$f]:-}") - c0 ))
      BYTESR["$w|$f"]=$(( ${BYTESR["$w|$f"]:-0} + $(cat "$W/fio.readbytes") )) ;;
  esac
}

wl seqwrite MiB/s; wl seqread MiB/s; wl randwrite IOPS; wl randread IOPS; wl reread IOPS
wl create ops/s; wl stat ops/s; wl unlink ops/s; wl readdir entries/s; wl par8 MiB/s
FIRSTS="1st-falloc 1st-append 1st-rand 1st-mmap 1st-direct 1st-cp 1st-dd"
for w in $FIRSTS; do wl "$w" MiB/s; done
# order matters: seqread reads seqwrite's file, randread and reread randwrite's, stat/unlink create's
groups=("seqwrite seqread" "randwrite randread reread" "$FIRSTS" "create stat unlink" "readdir" "par8")
case "$only" in
  "") ;;
  real) groups=() ;;
  seq) groups=("seqwrite seqread") ;;
  rand) groups=("randwrite randread reread") ;;
  first) groups=("$FIRSTS") ;;
  meta) groups=("create stat unlink") ;;
  readdir|par8) groups=("$only") ;;
  writes|retarget) groups=() ;;
esac
# cp's and dd's source for the first-read rows, written once (random: nothing compresses or dedups)
case " ${groups[*]+"${groups[*]}"} " in *" 1st-cp "*) head -c "$SEQ_B" /dev/urandom > "$W/first.src" ;; esac
for g in ${groups[@]+"${groups[@]}"}; do
  for ((r = 1; r <= reps; r++)); do
    if [ "$ab" = 1 ]; then
      # --ab compares this build with the baseline: the two run side by side, neither right
      # after tmpfs (whatever ran right after tmpfs ran 5-25% slower on some rows), swapping places.
      if [ $((r % 2)) = 1 ]; then order=(tmpfs cfsm cfs base); else order=(tmpfs cfsm base cfs); fi
    else
      # The two chargefs mounts swap places every repetition, so neither always runs right after
      # the other's workload (the memcg/no-memcg ratio was skewed by that order).
      # The baseline build takes the default mount's place in the other order.
      extra=(); for f in "${FS[@]:3}"; do case $f in base|cfsu) ;; *) extra+=("$f") ;; esac; done
      if [ $((r % 2)) = 1 ]; then order=(tmpfs cfs cfsm "${extra[@]}" ${baseline:+base})
      else order=(tmpfs ${baseline:+base} cfsm cfs "${extra[@]}"); fi
    fi
    [ -z "$URING_OLD" ] || order+=(cfsu)
    case "$g" in seqwrite*|randwrite*) order+=("${FLOORS[@]}") ;; esac
    # The peer runs last in one repetition and right after tmpfs in the next.
    if [ "$g" = "create stat unlink" ] && [ ${#PEERS[@]} -gt 0 ]; then
      if [ $((r % 2)) = 1 ]; then order+=("${PEERS[@]}"); else order=(tmpfs "${PEERS[@]}" "${order[@]:1}"); fi
    fi
    for f in "${order[@]}"; do
      for w in $g; do do_wl "$w" "$f"; done
    done
    echo "  [$g] repetition $r done:$(for f in "${order[@]}"; do for w in $g; do printf ' %s/%s=%s' "$f" "$w" "$(awk '{print $NF}' <<<"${R["$w|$f"]}")"; done; done)" >&2
  done
done

# --- writes: what a write costs, on one CPU and across two -----------------------------------------
# 1 MiB sequential writes of a new file (then one sequential read of it), and 4 KiB random
# overwrites of a file fio lays out whole first (every page exists: nothing is allocated or
# charged by an overwrite), on tmpfs, chargefs (the default mount), floorfs (the round trip
# alone) and floorfs --splice, in alternation; first with the daemons and fio on CPU $DCPU/$CCPU as
# everywhere else, then with the daemons moved (taskset -a) to BENCH_CROSS_CPU: a request then
# wakes a thread on the other CPU and its reply wakes fio back.
XCPU=${BENCH_CROSS_CPU:-1}
WROWS=(wseq-same wread-same wovw-same wseq-cross wread-cross wovw-cross)
declare -A WLABEL=([wseq-same]="seq write 1M, same CPU" [wread-same]="its read 1M, same CPU" [wovw-same]="4k overwrite, same CPU"
                   [wseq-cross]="seq write 1M, cross CPU" [wread-cross]="its read 1M, cross CPU" [wovw-cross]="4k overwrite, cross CPU")
declare -A WUNIT=([wseq]=MiB/s [wread]=MiB/s [wovw]=IOPS) WREQ
if [ "$only" = writes ]; then
  WFS=(tmpfs cfs floor splice); [ -z "$baseline" ] || WFS+=(base)
  [ "$XCPU" != "$CCPU" ] || die "BENCH_CROSS_CPU ($XCPU) must differ from BENCH_CLIENT_CPU ($CCPU)"
  [ "$XCPU" -lt "$ncpu" ] || die "BENCH_CROSS_CPU $XCPU: this machine has $ncpu CPUs"
  # repin CPU: every thread of every daemon of the writes rows onto CPU (threads made later inherit it)
  repin() { local f; for f in "${WFS[@]}"; do [ -z "${PID[$f]:-}" ] || taskset -a -cp "$1" "${PID[$f]}" >/dev/null; done; }
  for ((r = 1; r <= reps; r++)); do
    order=("${WFS[@]}"); [ $((r % 2)) = 0 ] && order=(tmpfs "${WFS[@]:2}" cfs)
    for place in same cross; do
      if [ "$place" = same ]; then repin "$DCPU"; else repin "$XCPU"; fi
      for f in "${order[@]}"; do
        m=${MNT[$f]}
        prefault
        add "wseq-$place" "$f" "$(fio_val "$m" bw --name=wseq --rw=write --bs=1M --size="$SEQ" --end_fsync=1)"
        add "wread-$place" "$f" "$(fio_val "$m" bw --name=wseq --rw=read --bs=1M --size="$SEQ")"
        rm -f "$m"/wseq.*
        prefault
        # chargefs's own count of WRITE requests during the overwrites: one per write(2)?
        [ "$f" != cfs ] || w0=$(getfattr --only-values -n user.chargefs.requests "$m" 2>/dev/null | sed -n 's/^WRITE=//p')
        add "wovw-$place" "$f" "$(fio_val "$m" iops --name=wovw --rw=randwrite --bs=4k --size="$RAND" --overwrite=1 --runtime="$RUNTIME" --time_based)"
        [ "$f" != cfs ] || WREQ[$place]="${WREQ[$place]:-} $(( $(getfattr --only-values -n user.chargefs.requests "$m" 2>/dev/null | sed -n 's/^WRITE=//p') - w0 ))"
        rm -f "$m"/wovw.*
      done
      echo "  [writes, $place CPU] repetition $r done:$(for f in "${order[@]}"; do for w in wseq wread wovw; do printf ' %s/%s=%s' "$f" "$w" "$(awk '{print $NF}' <<<"${R["$w-$place|$f"]}")"; done; done)" >&2
    done
  done
  repin "$DCPU"
fi

# --- retarget: what moving a tree's charge to another cgroup costs -------------------------------
# chargefs: SEQ bytes in 256 KiB files under a directory of the memcg= mount (charged to CGT),
# then `setfattr -n user.chargefs.memcg -v CGT2 DIR` (every page charged to CGT2, copied, the old
# one freed, under the tree lock) and `setfattr -x` (back to CGT). tmpfs has no such call: its
# way to move a charge is a copy by a process of the other cgroup and rm -rf of the original
# (what the copy's process writes first is charged to its cgroup). Seconds per GiB, and what
# CGT2's usage rose by meanwhile (the kernel's own counter).
declare -A RTG
if [ "$only" = retarget ]; then
  CGT2=$PARENT/cfsbench-$$-target2
  cg_create "$CGT2" "$(numfmt --from=iec "$FSSIZE")"
  head -c "$SEQ_B" /dev/urandom > "$W/retarget.src"
  now_ns() { date +%s%N; }
  per_gib() { awk -v ns="$1" -v b="$SEQ_B" 'BEGIN {printf "%.3f", ns / 1e9 / (b / 1073741824)}'; }
  for ((r = 1; r <= reps; r++)); do
    for f in tmpfs cfsm; do
      m=${MNT[$f]}
      rm -rf "$m/rt" "$m/rt2"; mkdir "$m/rt"
      prefault
      run split -a 4 -b 256K "$W/retarget.src" "$m/rt/f."
      u0=$(cg_usage "$CGT2")
      if [ "$f" = tmpfs ]; then
        t0=$(now_ns)
        cg_run_in "$CGT2" taskset -c "$CCPU" cp -r "$m/rt" "$m/rt2"
        run rm -rf "$m/rt"
        t1=$(now_ns)
        u1=$(cg_usage "$CGT2")
        t2=$(now_ns)
        cg_run_in "$CGW" taskset -c "$CCPU" cp -r "$m/rt2" "$m/rt"
        run rm -rf "$m/rt2"
        t3=$(now_ns)
      else
        t0=$(now_ns)
        setfattr -n user.chargefs.memcg -v "$CGT2" "$m/rt"
        t1=$(now_ns)
        u1=$(cg_usage "$CGT2")
        t2=$(now_ns)
        setfattr -x user.chargefs.memcg "$m/rt"
        t3=$(now_ns)
      fi
      RTG["to|$f"]+=" $(per_gib $((t1 - t0)))"; RTG["back|$f"]+=" $(per_gib $((t3 - t2)))"
      RTG["moved|$f"]+=" $(( (u1 - u0) / 1048576 ))"
      cmp -s <(cat "$m"/rt/f.*) "$W/retarget.src" || die "$f: the moved tree does not read back as written"
      rm -rf "$m/rt"
    done
    echo "  [retarget] repetition $r done: tmpfs $(awk '{print $NF}' <<<"${RTG[to|tmpfs]}") s/GiB, chargefs $(awk '{print $NF}' <<<"${RTG[to|cfsm]}") s/GiB" >&2
  done
fi

# --- real workloads: what a pod does on its scratch volume, unpinned -----------------------------
# Fresh mounts whose daemons run unpinned (the kernel places them, as for a user), each workload
# timed in ms: untar of a source tree, git clone of this repository and git fsck of the clone,
# make -j2 of two C programs compiled against the untarred headers, SQLite (WAL, rows in
# transactions), rm -rf of all of it. The file systems alternate every repetition; medians.
# With memfs_ll built (LIBFUSE_SRC or MEMFS_LL), a C FUSE file system that caches entries and
# attributes and checks no permission runs them too, unpinned: what FUSE itself allows here.
declare -A RT
REAL_FS=()
REAL_WL=(untar "git clone" "git fsck" make sqlite "rm -rf")
if { [ -z "$only" ] && [ "$ab" = 0 ]; } || [ "$only" = real ]; then
  if [ "$quick" = 1 ]; then TAR_SRC=/usr/include/linux; SQL_ROWS=20000; SQL_TX=40
  else TAR_SRC=/usr/include; SQL_ROWS=100000; SQL_TX=200; fi
  # Symlinks archived as the files they name (-h): memfs_ll has no symlink.
  tar -C "$(dirname "$TAR_SRC")" -chf "$W/src.tar" "$(basename "$TAR_SRC")"
  TAR_ENTRIES=$(tar -tf "$W/src.tar" | wc -l)
  # Two programs whose compilation reads a few hundred headers from the mount.
  mkdir -p "$W/mk"
  for prog in one two; do
    { printf '#include <linux/%s.h>\n' fs bpf perf_event io_uring netlink if_link ethtool kvm nl80211 videodev2
      printf 'int main(void) { return (int)sizeof(%s); }\n' "$([ $prog = one ] && echo 'union bpf_attr' || echo 'struct perf_event_attr')"
    } > "$W/mk/$prog.c"
  done
  printf 'all: one two\n%%: %%.c\n\t$(CC) -O2 -I$(INC) -o $@ $<\n' > "$W/mk/Makefile"
  REAL_FS=(rtmpfs rcfs)
  MNT[rtmpfs]=$W/rtmpfs; mkdir -p "${MNT[rtmpfs]}"
  mount -t tmpfs -o "size=$FSSIZE" tmpfs "${MNT[rtmpfs]}"; CFS_MOUNTS+=("${MNT[rtmpfs]}")
  saved_wrap=$CFS_WRAP; CFS_WRAP=
  MNT[rcfs]=$W/rcfs; OPTS[rcfs]="size=$FSSIZE,io_uring=off"; mount_cfs rcfs
  if [ -n "$URING_OLD" ]; then
    REAL_FS+=(rcfsu); MNT[rcfsu]=$W/rcfsu; OPTS[rcfsu]="size=$FSSIZE,io_uring=on"
    echo Y > "$URING_KNOB"
    cfs_mount "${MNT[rcfsu]}" "${OPTS[rcfsu]}" "$CGD" || { echo "$URING_OLD" > "$URING_KNOB"; die "cannot mount ${MNT[rcfsu]}"; }
    echo "$URING_OLD" > "$URING_KNOB"
    PID[rcfsu]=$CFS_PID
  fi
  CFS_WRAP=$saved_wrap
  declare -A PEER_FAILED=()
  if [ "$PEER_BUILT" = 1 ] && start_peer rpeer "${PEER_OPTS[memfsc]-}" unpinned; then REAL_FS+=(rpeer)
  elif [ "$PEER_BUILT" = 1 ]; then echo "no memfs_ll in the real workloads: $peer_skip"; fi
  ms() { echo $(( $(date +%s%N) / 1000000 )); }
  # What each workload costs in requests, from the /dev/fuse mount's own counter (the root's
  # user.chargefs.requests attribute: what the kernel sent, by kind); the last repetition's.
  declare -A REQ
  req_counts() { { getfattr --only-values -n user.chargefs.requests "$1" 2>/dev/null || true; } | tr '=' ' '; echo; }
  # timed FS WORKLOAD CMD...: runs CMD in the workload cgroup, appends its ms to RT. A failure is
  # chargefs's bug (the run stops) but only a missing feature of the peer (its cell shows it).
  timed() {
    local f=$1 w=$2 t0 ok=1; shift 2
    [ "$f" != rcfs ] || req_counts "${MNT[$f]}" > "$W/req.before"
    t0=$(ms)
    if cg_run_in "$CGW" "$@" >"$W/real.out" 2>&1; then RT["$w|$f"]+=" $(( $(ms) - t0 ))"; else ok=0; fi
    if [ "$f" = rcfs ]; then
      req_counts "${MNT[$f]}" > "$W/req.after"
      REQ[$w]=$(awk 'NR == FNR {b[$1] = $2; next} NF == 2 && $2 > b[$1] {print $1, $2 - b[$1]}' "$W/req.before" "$W/req.after" |
        sort -k2,2nr | awk '{t += $2; s = s (NR > 1 ? " " : "") $1 "=" $2} END {print t + 0, s}')
    fi
    [ "$ok" = 0 ] || return 0
    [ "$f" = rpeer ] || die "$w failed on ${MNT[$f]}: $(tail -3 "$W/real.out")"
    PEER_FAILED[$w]=1
  }
  # real_wl FS: one repetition of every real workload on FS.
  real_wl() {
    local f=$1 m=${MNT[$1]} inc
    inc=$m; [ "$(basename "$TAR_SRC")" = linux ] || inc=$m/$(basename "$TAR_SRC")
    prefault
    timed "$f" untar tar -C "$m" -xf "$W/src.tar"
    timed "$f" "git clone" git clone -q --no-local "$repo" "$m/clone"
    timed "$f" "git fsck" git -C "$m/clone" fsck --full --no-progress
    cp -r "$W/mk" "$m/mk"
    timed "$f" make make -s -j2 -C "$m/mk" INC="$inc"
    timed "$f" sqlite "$CFS_PYTHON" -c '
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("pragma journal_mode=wal")
db.execute("create table t (id integer primary key, name text, value blob)")
rows, tx = int(sys.argv[2]), int(sys.argv[3])
for i in range(tx):
    db.execute("begin")
    db.executemany("insert into t (name, value) values (?, ?)",
                   ((f"row {j}", bytes(64)) for j in range(i * rows // tx, (i + 1) * rows // tx)))
    db.execute("commit")
assert db.execute("select count(*) from t").fetchone()[0] == rows
db.close()
' "$m/db.sqlite" "$SQL_ROWS" "$SQL_TX"
    timed "$f" "rm -rf" rm -rf "$m/$(basename "$TAR_SRC")" "$m/clone" "$m/mk" "$m"/db.sqlite*
    [ -z "$(ls -A "$m")" ] || die "rm -rf left files in $m"
  }
  for ((r = 1; r <= reps; r++)); do
    order=("${REAL_FS[@]}"); [ $((r % 2)) = 0 ] && order=(rtmpfs "${REAL_FS[@]:2}" rcfs)
    for f in "${order[@]}"; do real_wl "$f"; done
    echo "  [real] repetition $r done:$(for f in "${order[@]}"; do for w in "${REAL_WL[@]}"; do printf ' %s/%s=%s' "$f" "${w// /-}" "$(awk '{print $NF}' <<<"${RT["$w|$f"]:-fail}")"; done; done)" >&2
  done
fi

# --- memory: daemon RSS per GiB stored / per 100,000 empty files, charge per GiB ----------------
declare -A MEM
# mib_per_gib AFTER BEFORE GIB: a charge delta in MiB per GiB stored, whole MiB ("0", never "-0")
mib_per_gib() { awk -v a="$1" -v b="$2" -v g="$3" 'BEGIN {v = sprintf("%.0f", (a - b) / g / 1048576); print (v == "-0" ? "0" : v)}'; }
mem_probe() {  # fills $SEQ_B bytes then $NDIR empty files on fs $1; records where the charge went
  local f=$1 m=${MNT[$1]} pid=${PID[$1]} r0 w0 d0 t0 r1
  # Warm up first: the first 1 MiB request makes a fresh daemon touch its 1 MiB receive buffer,
  # a fixed cost that is not "per GiB stored".
  run fio --directory="$m" --name=warm --rw=write --bs=1M --size=8M --ioengine=psync --output-format=terse >/dev/null
  rm -f "$m"/warm.*
  sync
  w0=$(cg_usage "$CGW"); d0=$(cg_usage "$CGD"); t0=$(cg_usage "$CGT")
  r0=0; [ -z "$pid" ] || r0=$(rss_kib "$pid")
  run fio --directory="$m" --name=mem --rw=write --bs=1M --size="$SEQ_B" --ioengine=psync --end_fsync=1 --output-format=terse >/dev/null
  local gib; gib=$(awk -v b="$SEQ_B" 'BEGIN {print b / 1073741824}')
  MEM["$f|w"]=$(mib_per_gib "$(cg_usage "$CGW")" "$w0" "$gib")
  MEM["$f|d"]=$(mib_per_gib "$(cg_usage "$CGD")" "$d0" "$gib")
  MEM["$f|t"]=$(mib_per_gib "$(cg_usage "$CGT")" "$t0" "$gib")
  # Read it all back from a cgroup of its own (with passthrough: the kernel reads the backing file).
  local rd0 t1; rd0=$(cg_usage "$CGR"); t1=$(cg_usage "$CGT")
  cg_run_in "$CGR" taskset -c "$CCPU" cat "$m"/mem.* > /dev/null
  MEM["$f|r"]=$(mib_per_gib "$(cg_usage "$CGR")" "$rd0" "$gib")
  MEM["$f|tr"]=$(mib_per_gib "$(cg_usage "$CGT")" "$t1" "$gib")
  if [ -n "$pid" ]; then
    r1=$(rss_kib "$pid")
    MEM["$f|rssgib"]=$(awk -v a="$r1" -v b="$r0" -v g="$gib" 'BEGIN {printf "%.1f", (a - b) / g / 1024}')
  else MEM["$f|rssgib"]=-; fi
  rm -f "$m"/mem.*
  mkdir "$m/empty"
  [ -z "$pid" ] || r0=$(rss_kib "$pid")
  run "$MB" mkempty "$m/empty" "$NDIR" >/dev/null
  if [ -n "$pid" ]; then
    r1=$(rss_kib "$pid")
    MEM["$f|rssfiles"]=$(awk -v a="$r1" -v b="$r0" -v n="$NDIR" 'BEGIN {printf "%.1f", (a - b) / 1024 * 100000 / n}')
  else MEM["$f|rssfiles"]=-; fi
  run "$MB" unlink "$m/empty" "$NDIR" >/dev/null; rmdir "$m/empty"
}
# The probes run on fresh daemons: a daemon's heap keeps (and reuses) what earlier workloads
# freed, which hid the cost of 100,000 new inodes (0.0 MiB measured on the used daemons).
remount_fresh() {
  cfs_umount "${MNT[$1]}" "${PID[$1]}" || die "cannot unmount ${MNT[$1]}"
  mount_cfs "$1"
}
if [ -z "$only" ]; then
  for f in "${FS[@]}"; do
    [ "$f" = tmpfs ] || remount_fresh "$f"
    mem_probe "$f"
  done
fi

# --- report --------------------------------------------------------------------------------------
median() { tr ' ' '\n' | { grep -v '^$' || true; } | sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b + 0 == 0 || a == "-" || b == "-") print "-"; else printf "%.2f", a / b}'; }
# paired_ratio "A1 A2 .." "B1 B2 ..": the median of Ai/Bi (repetition by repetition).
paired_ratio() {
  local -a a b; local i out=
  read -ra a <<<"$1"; read -ra b <<<"$2"
  [ ${#a[@]} -gt 0 ] && [ ${#a[@]} = ${#b[@]} ] || { echo -; return; }
  for i in "${!a[@]}"; do out+=" $(awk -v x="${a[$i]}" -v y="${b[$i]}" 'BEGIN {if (y + 0 == 0) print ""; else printf "%.4f", x / y}')"; done
  printf '%.2f' "$(median <<<"$out")"
}
if [ "$only" = writes ]; then
  echo
  echo "Writes, medians of $reps run(s); higher is better. same CPU: daemons on CPU $DCPU, fio on CPU $CCPU;"
  echo "cross CPU: daemons on CPU $XCPU, fio on CPU $CCPU. floor = floorfs; splice = floorfs --splice."
  printf '| %-24s | %-6s | %9s | %9s | %7s | %9s | %7s | %9s | %7s | %9s | %9s |' row unit tmpfs chargefs /tmpfs floor /tmpfs splice /tmpfs splice/floor cfs/floor
  [ -z "$baseline" ] || printf ' %9s | %9s |' baseline cfs/base
  printf '\n|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|' -------------------------- -------- ----------- ----------- --------- ----------- --------- ----------- --------- ----------- -----------
  [ -z "$baseline" ] || printf '%s|%s|' ----------- -----------
  echo
  for w in "${WROWS[@]}"; do
    t=$(median <<<"${R["$w|tmpfs"]:-}"); c=$(median <<<"${R["$w|cfs"]:-}"); fl=$(median <<<"${R["$w|floor"]:-}"); sp=$(median <<<"${R["$w|splice"]:-}")
    printf '| %-24s | %-6s | %9s | %9s | %7s | %9s | %7s | %9s | %7s | %9s | %9s |' "${WLABEL[$w]}" "${WUNIT[${w%-*}]}" "$t" "$c" "$(ratio "$c" "$t")" \
      "$fl" "$(ratio "$fl" "$t")" "$sp" "$(ratio "$sp" "$t")" "$(ratio "$sp" "$fl")" "$(ratio "$c" "$fl")"
    if [ -n "$baseline" ]; then b=$(median <<<"${R["$w|base"]:-}"); printf ' %9s | %9s |' "$b" "$(ratio "$c" "$b")"; fi
    echo
  done
  echo "Each repetition (tmpfs chargefs floor splice${baseline:+ baseline}):"
  for w in "${WROWS[@]}"; do
    printf '  %-24s' "${WLABEL[$w]}"; for f in "${WFS[@]}"; do printf ' %s:%s' "$f" "$(echo ${R["$w|$f"]:-} | tr ' ' ',')"; done; echo
  done
  echo "chargefs WRITE requests during each repetition's overwrite run (fio's 4 KiB layout of $RAND included): same CPU${WREQ[same]:-}; cross CPU${WREQ[cross]:-}"
fi
if [ "$only" = retarget ]; then
  echo
  echo "Moving the charge of $SEQ in 256 KiB files to another cgroup and back; medians of $reps run(s),"
  echo "seconds per GiB (lower is better). chargefs: setfattr user.chargefs.memcg on the directory,"
  echo "then setfattr -x; tmpfs: cp -r by a process of the other cgroup, then rm -rf of the original."
  printf '| %-18s | %10s | %10s | %17s |\n' move tmpfs chargefs chargefs/tmpfs
  printf '|%s|%s|%s|%s|\n' -------------------- ------------ ------------ -------------------
  for d in to back; do
    t=$(median <<<"${RTG["$d|tmpfs"]}"); c=$(median <<<"${RTG["$d|cfsm"]}")
    printf '| %-18s | %10s | %10s | %17s |\n' "$([ $d = to ] && echo "to the other" || echo back)" "$t" "$c" "$(ratio "$c" "$t")"
  done
  echo "The other cgroup's usage rose by (MiB, each repetition): tmpfs${RTG[moved|tmpfs]}; chargefs${RTG[moved|cfsm]}"
  echo "Each repetition, s/GiB: tmpfs to${RTG[to|tmpfs]}, back${RTG[back|tmpfs]}; chargefs to${RTG[to|cfsm]}, back${RTG[back|cfsm]}"
fi
if [ "$only" != real ] && [ "$only" != writes ] && [ "$only" != retarget ]; then
echo
echo "Medians of $reps run(s); higher is better; ratios: chargefs/tmpfs and memcg/no-memcg."
echo "chargefs = the default (cache=direct); cache=page = chargefs -o cache=page, without memcg=."
printf '| %-10s | %-9s | %12s | %12s | %14s | %13s | %15s | %12s | %11s | %12s | %12s | %12s | %12s |\n' workload unit tmpfs chargefs "chargefs+memcg" chargefs/tmpfs memcg/no-memcg cache=page page/tmpfs "floor*" floor/tmpfs "pass**" pass/tmpfs
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------------ ----------- -------------- -------------- ---------------- --------------- ----------------- -------------- ------------- -------------- -------------- -------------- --------------
for w in "${WLS[@]}"; do
  t=$(median <<<"${R["$w|tmpfs"]:-}"); c=$(median <<<"${R["$w|cfs"]:-}"); cm=$(median <<<"${R["$w|cfsm"]:-}")
  cp=$(median <<<"${R["$w|cfsp"]:-}"); fl=$(median <<<"${R["$w|floor"]:-}"); pa=$(median <<<"${R["$w|pass"]:-}")
  # --ab always runs memcg= right after tmpfs, so memcg/no-memcg would not be a fair ratio there.
  mr=$(ratio "$cm" "$c"); [ "$ab" = 0 ] || mr=-
  printf '| %-10s | %-9s | %12s | %12s | %14s | %13s | %15s | %12s | %11s | %12s | %12s | %12s | %12s |\n' "$w" "${UNIT[$w]}" "$t" "$c" "$cm" "$(ratio "$c" "$t")" "$mr" "$cp" "$(ratio "$cp" "$t")" "$fl" "$(ratio "$fl" "$t")" "$pa" "$(ratio "$pa" "$t")"
done
echo "* floor: scripts/bench/floorfs.c, a minimal single-threaded C FUSE file system (one memfd, no"
echo "  inodes, locks, permissions, xattrs or charging, direct I/O like chargefs), pinned like chargefs:"
echo "  the FUSE round trip alone."
echo "** pass: floorfs --passthrough, whose read-only opens the kernel serves from the memfd itself"
echo "  (FUSE passthrough); writes as floor: reads without a round trip to any daemon."
echo
echo "Daemon CPU per GiB read (user+system, from /proc/PID/stat, all repetitions; passthrough reads need none):"
printf '| %-10s | %14s | %14s | %14s | %14s |\n' workload chargefs "chargefs+memcg" "cache=page" "io_uring"
printf '|%s|%s|%s|%s|%s|\n' ------------ ---------------- ---------------- ---------------- ----------------
cpu_per_gib() {
  local b=${BYTESR["$1|$2"]:-0} t=${CPUR["$1|$2"]:-}
  if [ -z "$t" ] || [ "$b" = 0 ]; then echo -; else awk -v t="$t" -v b="$b" -v hz="$TICK" 'BEGIN {printf "%.3f s", t / hz / (b / 1073741824)}'; fi
}
for w in seqread randread reread; do
  [ -n "${BYTESR["$w|cfs"]:-}" ] || continue
  printf '| %-10s | %14s | %14s | %14s | %14s |\n' "$w" "$(cpu_per_gib "$w" cfs)" "$(cpu_per_gib "$w" cfsm)" "$(cpu_per_gib "$w" cfsp)" "$(cpu_per_gib "$w" cfsu)"
done
if [ -n "$URING_OLD" ]; then
  echo
  echo "FUSE over io_uring (chargefs -o io_uring=on: per-CPU queues; the default mount serves over /dev/fuse"
  echo "on this host, whose enable_uring is $URING_OLD), same run:"
  printf '| %-10s | %-9s | %12s | %14s | %12s | %15s | %14s |\n' workload unit tmpfs "chargefs /dev" "io_uring" io_uring/tmpfs "io_uring/dev"
  printf '|%s|%s|%s|%s|%s|%s|%s|\n' ------------ ----------- -------------- ---------------- -------------- ----------------- ----------------
  for w in "${WLS[@]}"; do
    t=$(median <<<"${R["$w|tmpfs"]:-}"); c=$(median <<<"${R["$w|cfs"]:-}"); u=$(median <<<"${R["$w|cfsu"]:-}")
    [ "$u" != - ] || continue
    printf '| %-10s | %-9s | %12s | %14s | %12s | %15s | %14s |\n' "$w" "${UNIT[$w]}" "$t" "$c" "$u" "$(ratio "$u" "$t")" "$(ratio "$u" "$c")"
  done
fi
fi
if [ ${#REAL_FS[@]} -gt 0 ]; then
  echo
  echo "Real workloads, unpinned, ms (lower is better; x tmpfs = tmpfs time / this time, 1.00 = tmpfs speed):"
  echo "untar: $TAR_SRC ($TAR_ENTRIES entries); git clone --no-local of this repository, git fsck --full of it; make -j2 of two C programs against the untarred headers; SQLite: $SQL_ROWS rows in $SQL_TX transactions, WAL; rm -rf of all of it"
  peer_col=0; [[ " ${REAL_FS[*]} " != *" rpeer "* ]] || peer_col=1
  [ "$peer_col" = 0 ] || echo "memfs_ll: libfuse's example ($PEER_FROM)${PEER_OPTS[memfsc]:+ -o ${PEER_OPTS[memfsc]}}, unpinned; no permission checks"
  printf '| %-10s | %8s | %14s | %8s | %10s | %8s |' workload tmpfs "chargefs /dev" "x tmpfs" "io_uring" "x tmpfs"
  [ "$peer_col" = 0 ] || printf ' %9s | %8s |' memfs_ll "x tmpfs"
  printf '\n|%s|%s|%s|%s|%s|%s|' ------------ ---------- ---------------- ---------- ------------ ----------
  [ "$peer_col" = 0 ] || printf '%s|%s|' ----------- ----------
  echo
  for w in "${REAL_WL[@]}"; do
    t=$(median <<<"${RT["$w|rtmpfs"]:-}"); c=$(median <<<"${RT["$w|rcfs"]:-}"); u=$(median <<<"${RT["$w|rcfsu"]:-}")
    printf '| %-10s | %8s | %14s | %8s | %10s | %8s |' "$w" "$t" "$c" "$(ratio "$t" "$c")" "$u" "$(ratio "$t" "$u")"
    if [ "$peer_col" = 1 ]; then
      p=$(median <<<"${RT["$w|rpeer"]:-}"); [ -z "${PEER_FAILED[$w]:-}" ] || p=fails
      printf ' %9s | %8s |' "$p" "$(ratio "$t" "$p")"
    fi
    echo
  done
  echo
  echo "Requests chargefs received (/dev/fuse mount, last repetition, its user.chargefs.requests attribute); per entry: of the $TAR_ENTRIES untarred or removed:"
  printf '| %-10s | %9s | %9s | %s |\n' workload requests "per entry" "by kind"
  printf '|%s|%s|%s|%s|\n' ------------ ----------- ----------- -----------
  for w in "${REAL_WL[@]}"; do
    read -r total kinds <<<"${REQ[$w]:-0}"
    per=-; [ "$w" != untar ] && [ "$w" != "rm -rf" ] || per=$(awk -v a="$total" -v b="$TAR_ENTRIES" 'BEGIN {printf "%.2f", a / b}')
    printf '| %-10s | %9s | %9s | %s |\n' "$w" "$total" "$per" "${kinds:-}"
  done
fi
if [ ${#PEERS[@]} -gt 0 ]; then
  echo
  echo "Peer: libfuse's memfs_ll ($PEER_FROM), pinned like chargefs, same run; higher is better."
  echo "memfs_ll: its defaults (entry and attribute timeouts 0)${PEER_OPTS[memfsc]+; memfs_ll -o ${PEER_OPTS[memfsc]}: entries and attributes cached, as chargefs does}:"
  printf '| %-10s | %-9s | %12s | %12s | %17s |' workload unit chargefs memfs_ll chargefs/memfs_ll
  [ -z "${PEER_OPTS[memfsc]+x}" ] || printf ' %18s | %17s |' "memfs_ll cached" "chargefs/cached"
  printf '\n|%s|%s|%s|%s|%s|' ------------ ----------- -------------- -------------- -------------------
  [ -z "${PEER_OPTS[memfsc]+x}" ] || printf '%s|%s|' -------------------- -------------------
  echo
  for w in create stat unlink; do
    c=$(median <<<"${R["$w|cfs"]:-}"); p=$(median <<<"${R["$w|memfs"]:-}")
    printf '| %-10s | %-9s | %12s | %12s | %17s |' "$w" "${UNIT[$w]}" "$c" "$p" "$(ratio "$c" "$p")"
    if [ -n "${PEER_OPTS[memfsc]+x}" ]; then
      p=$(median <<<"${R["$w|memfsc"]:-}")
      printf ' %18s | %17s |' "$p" "$(ratio "$c" "$p")"
    fi
    echo
  done
fi
if [ -n "$baseline" ] && [ "$only" != writes ] && [ "$only" != retarget ]; then
  echo
  if [ -n "$cfs_opts" ]; then echo "This build with -o $cfs_opts against the baseline build ($baseline) with the default options, same run:"
  else echo "This build against the baseline build ($baseline), both with the default options, same run:"; fi
  if [ "$ab" = 1 ]; then echo "(paired: the median of each repetition's chargefs/baseline; the two ran side by side)"
  else echo "(paired: the median of each repetition's chargefs/baseline; not side by side without --ab)"; fi
  printf '| %-10s | %-9s | %12s | %12s | %17s | %6s |\n' workload unit baseline chargefs chargefs/baseline paired
  printf '|%s|%s|%s|%s|%s|%s|\n' ------------ ----------- -------------- -------------- ------------------- --------
  for w in "${WLS[@]}"; do
    b=$(median <<<"${R["$w|base"]:-}"); c=$(median <<<"${R["$w|cfs"]:-}")
    printf '| %-10s | %-9s | %12s | %12s | %17s | %6s |\n' "$w" "${UNIT[$w]}" "$b" "$c" "$(ratio "$c" "$b")" \
      "$(paired_ratio "${R["$w|cfs"]:-}" "${R["$w|base"]:-}")"
  done
fi
if [ -z "$only" ]; then
  echo
  echo "Memory, after writing $SEQ and $NDIR empty files (MiB per GiB stored; charge deltas per cgroup):"
  printf '| %-14s | %16s | %22s | %16s | %16s | %16s | %16s | %18s |\n' fs "daemon RSS/GiB*" "daemon RSS/100k files*" "target cg/GiB" "daemon cg/GiB" "writer cg/GiB" "reader cg/GiB" "target, reading"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------- ------------------ ------------------------ ------------------ ------------------ ------------------ ------------------ --------------------
  for f in "${FS[@]}"; do
    printf '| %-14s | %16s | %22s | %16s | %16s | %16s | %16s | %18s |\n' "$f" "${MEM["$f|rssgib"]}" "${MEM["$f|rssfiles"]}" "${MEM["$f|t"]}" "${MEM["$f|d"]}" "${MEM["$f|w"]}" "${MEM["$f|r"]}" "${MEM["$f|tr"]}"
  done
  echo "(tmpfs = kernel tmpfs, cfs = chargefs without memcg=, cfsm = chargefs memcg=$CGT, cfsp = chargefs cache=page,"
  echo " cfsu = chargefs io_uring=on,"
  echo " base = the --baseline build;"
  echo " writer cg = fio's cgroup, which pays for any FUSE page cache; reader cg = a cgroup of its own that"
  echo " then reads it all (cat), target, reading = what the target gained meanwhile;"
  echo " * daemon RSS = RssAnon + RssFile, not counting RssShmem, the mapped data itself)"
fi
# --- scale: per-op cost at 1k/100k/1M files, 16 GiB stored ---------------------------------------
declare -A SC
if [ "$scale" = 1 ]; then
  echo
  echo "scale runs (1k/100k/1M files, 16 GiB stored)..." >&2
  SCALE_FS=(tmpfs cfs cfsm)
  for n in 1000 100000 1000000; do
    for f in "${SCALE_FS[@]}"; do
      m=${MNT[$f]}; mkdir "$m/scale"
      for op in create stat unlink; do
        SC["$n|$f|$op"]=$(run "$MB" "$op" "$m/scale" "$n" | awk '{print $5}')
      done
      rmdir "$m/scale"
    done
    echo "  [scale $n files] done" >&2
  done
  SEQ_B=$((16 * 1024 * MiB))
  for f in "${SCALE_FS[@]}"; do mem_probe "$f"; SC["16g|$f"]="${MEM["$f|rssgib"]} ${MEM["$f|t"]} ${MEM["$f|d"]} ${MEM["$f|w"]}"; done
fi

if [ "$scale" = 1 ]; then
  echo
  echo "Per-op cost (µs) by directory size:"
  printf '| %-8s | %-7s | %10s | %10s | %10s |\n' files op tmpfs chargefs chargefs+memcg
  for n in 1000 100000 1000000; do
    for op in create stat unlink; do
      printf '| %-8s | %-7s | %10s | %10s | %10s |\n' "$n" "$op" "${SC["$n|tmpfs|$op"]}" "${SC["$n|cfs|$op"]}" "${SC["$n|cfsm|$op"]}"
    done
  done
  echo
  echo "16 GiB stored (MiB per GiB: daemon RSS, target cg, daemon cg, writer cg):"
  for f in "${SCALE_FS[@]}"; do echo "  $f: ${SC["16g|$f"]}"; done
fi
