#!/usr/bin/env bash
# The chargefs demo: a mount whose pages are charged to a memory cgroup with a 64 MiB limit,
# filled until ENOSPC (not an OOM kill), then emptied and unmounted, with the counters shown.
# Usage: bash scripts/demo.sh [--no-setup]      (root; sets the machine up first unless told not to)
# Env: DEMO_LIMIT_MB (default 64), CHARGEFSD=path to a built daemon, SWIFT_SCRATCH (see setup.sh).
# Leaves nothing behind: no mount, no daemon, no cgroup, no temp dir, on any exit.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
setup=1
for a in "$@"; do
  case "$a" in
    --no-setup) setup=0 ;;
    -h|--help) sed -n '2,6s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) sed -n '4s/^# //p' "$0" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it creates a cgroup and mounts)" >&2; exit 1; }

unset CHARGEFS_CGROUP_VERSION   # the demo detects the version from /sys/fs/cgroup
# shellcheck source=scripts/tests/lib.sh
source "$here/tests/lib.sh"

if [ "$setup" = 1 ]; then
  echo "== setup (scripts/setup.sh)"
  bash "$here/setup.sh" --daemon
fi
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH=$PATH:/opt/swift/usr/bin
if [ -z "${CHARGEFSD:-}" ]; then
  scratch=(); [ -z "${SWIFT_SCRATCH:-}" ] || scratch=(--scratch-path "$SWIFT_SCRATCH")
  CHARGEFSD=$(cd "$repo" && swift build "${scratch[@]}" --show-bin-path)/chargefsd
fi
[ -x "$CHARGEFSD" ] || die "no daemon at $CHARGEFSD (build it: bash scripts/build.sh --daemon)"

limit=$(( ${DEMO_LIMIT_MB:-64} * MiB ))
ver=$(cg_version)
[ "$ver" != 0 ] || die "no memory cgroup controller found under /sys/fs/cgroup"
parent=$(cg_parent)
T=$parent/chargefs-demo-$$
D=$parent/chargefs-demo-$$-daemon
MNT=
SRC=

cleanup() {
  local rc=$? i p
  trap - EXIT INT TERM
  if [ -n "$MNT" ] && is_mounted "$MNT"; then
    fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
  fi
  # the daemon is whatever runs in the cgroup we made for it: end those pids only
  if [ -d "$D" ]; then
    for ((i = 0; i < 50; i++)); do [ -z "$(cg_procs "$D")" ] && break; sleep 0.1; done
    for p in $(cg_procs "$D"); do kill -9 "$p" 2>/dev/null || true; done
  fi
  cfs_cleanup
  [ -z "$MNT" ] || rmdir "$MNT" 2>/dev/null || true
  [ -z "$SRC" ] || rm -rf "$SRC"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

show() {  # one line of counters
  printf '  %-34s target: %s | daemon cgroup: %s\n' "$1" "$(cg_describe "$T")" "$(fmt_mib "$(cg_usage "$D")")"
}

echo "== cgroup v$ver memory controller; this shell's memory cgroup: $(cg_of_pid "$BASHPID")"
cg_create "$T" "$limit"
cg_create "$D"
echo "   target cgroup $T, limit $(fmt_mib "$limit")"
echo "   the daemon runs in its own cgroup $D (no limit)"
MNT=$(mktemp -d /tmp/chargefs-demo.XXXX)
SRC=$(mktemp -d /tmp/chargefs-demo-src.XXXX)
show "before mounting:"

echo "== chargefsd $MNT -o memcg=$T,size=1G"
( echo "$BASHPID" > "$D/cgroup.procs" && exec "$CHARGEFSD" "$MNT" -o "memcg=$T,size=1G" )
CFS_MOUNTS+=("$MNT")
is_mounted "$MNT" || die "chargefsd returned but $MNT is not mounted"
echo "   mounted: $(findmnt -n -o SOURCE,FSTYPE,OPTIONS "$MNT")"
echo "   daemon pid(s): $(cg_procs "$D" | tr '\n' ' ')"
base=$(cg_usage "$T")
show "after mounting:"

echo "== writing 8 MiB files with dd until the cgroup is full"
declare -a files sums
step=0 enospc=0
while [ $step -lt 128 ]; do
  f=$MNT/part-$step
  head -c $((8 * MiB)) /dev/urandom > "$SRC/chunk"
  if dd if="$SRC/chunk" of="$f" bs=1M conv=fsync status=none 2>"$SRC/err"; then
    files+=("$f"); sums+=("$(sha256sum < "$SRC/chunk" | cut -d' ' -f1)")
    show "wrote $(basename "$f") ($(( (step + 1) * 8 )) MiB):"
  else
    echo "   dd: $(tail -1 "$SRC/err")"
    if grep -q "No space left" "$SRC/err"; then enospc=1; fi
    sz=$(stat -c %s "$f" 2>/dev/null || echo 0)
    if [ "$sz" -gt 0 ] && cmp -s -n "$sz" "$SRC/chunk" "$f"; then partial_ok=1; else partial_ok=0; fi
    show "ENOSPC after $(fmt_mib "$sz") of $(basename "$f"):"
    break
  fi
  step=$((step + 1))
done
rm -f "$SRC/chunk"
[ "$enospc" = 1 ] || die "expected ENOSPC, did not get it"
stored=$(du -sb "$MNT" | cut -f1)
echo "   stored $(fmt_mib "$stored"); target charged $(fmt_mib $(( $(cg_usage "$T") - base ))) above its baseline; oom kills: $(cg_oom_kills "$T")"

echo "== df $MNT"
df -h "$MNT" | sed 's/^/   /'
echo "== getfattr -n user.chargefs.status $MNT"
getfattr --absolute-names --only-values -n user.chargefs.status "$MNT" 2>&1 | sed 's/^/   /' || true
echo

echo "== reading back (O_DIRECT, so the data comes from the daemon, not the page cache)"
bad=0
for i in "${!files[@]}"; do
  got=$( { dd if="${files[i]}" bs=1M iflag=direct status=none 2>/dev/null || cat "${files[i]}"; } | sha256sum | cut -d' ' -f1)
  [ "$got" = "${sums[i]}" ] || { echo "   MISMATCH in ${files[i]}"; bad=1; }
done
[ "${partial_ok:-1}" = 1 ] || { echo "   MISMATCH in the partial file"; bad=1; }
[ "$bad" = 0 ] || die "data read back differs"
echo "   ${#files[@]} full files (+1 partial) read back intact"

echo "== rm $MNT/*"
rm -f "$MNT"/part-*
for ((i = 0; i < 50; i++)); do [ "$(cg_usage "$T")" -le $((base + MiB)) ] && break; sleep 0.1; done
show "after rm:"

echo "== fusermount3 -u $MNT"
fusermount3 -u "$MNT"
for ((i = 0; i < 100; i++)); do [ -z "$(cg_procs "$D")" ] && break; sleep 0.1; done
[ -z "$(cg_procs "$D")" ] || die "daemon did not exit after unmount"
for ((i = 0; i < 50; i++)); do [ "$(cg_usage "$T")" -le "$MiB" ] && break; sleep 0.1; done
show "after unmount (baseline):"

echo "== removing the cgroups"
cfs_cleanup
rmdir "$MNT"; MNT=
rm -rf "$SRC"; SRC=
left=$(find "$parent" -maxdepth 1 -name "chargefs-demo-$$*" | wc -l)
echo "   mounts left: $(grep -c ' fuse.chargefsd ' /proc/mounts || true); cgroups left: $left"
echo "== done: ENOSPC at the cgroup limit, no OOM kill, every byte given back"
