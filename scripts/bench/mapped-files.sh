#!/usr/bin/env bash
# What the mapped-file rule costs (FileSystemCore+Mapped): N files of 16 KiB that are ELF objects
# ("\x7fELF" first) and N that are not, on a memcg= mount (cgroup v1: the target's
# memory.kmem.usage_in_bytes); each set opened and read once with cat (the ELF files get their
# backing files then), then again. Prints kernel memory per file and microseconds per open+read.
# Usage: CHARGEFSD=BIN bash scripts/bench/mapped-files.sh [N]     (root; default N 400)
# Run it with this build's daemon and a previous one's for a before/after.
set -euo pipefail
N=${1:-400}
source "$(dirname "${BASH_SOURCE[0]}")/../tests/lib.sh"
[ "$(cg_version)" = 1 ] || die "needs cgroup v1's memory.kmem.usage_in_bytes"
BIN=$(cfs_daemon_bin)
trap cfs_cleanup EXIT
cfs_new_env cfsmapb
cg_create "$T" $((1024 * MiB)); cg_create "$D"
cfs_mount "$MNT" "memcg=$T,size=1g" "$D" 
sleep 0.3
kmem() { cat "$T/memory.kmem.usage_in_bytes"; }
mkdir "$MNT/elf" "$MNT/txt"
head -c 16384 /dev/urandom > "$SCR/body"
{ printf '\177ELF'; head -c 16380 "$SCR/body"; } > "$SCR/elf"
{ printf 'text'; head -c 16380 "$SCR/body"; } > "$SCR/txt"
for ((i = 0; i < N; i++)); do cp "$SCR/elf" "$MNT/elf/f$i"; cp "$SCR/txt" "$MNT/txt/f$i"; done
sync; sleep 1
k0=$(kmem)
t0=$(date +%s.%N); cat "$MNT"/txt/f* > /dev/null; t1=$(date +%s.%N)
k1=$(kmem)
t2=$(date +%s.%N); cat "$MNT"/elf/f* > /dev/null; t3=$(date +%s.%N)
k2=$(kmem)
t4=$(date +%s.%N); cat "$MNT"/elf/f* > /dev/null; t5=$(date +%s.%N)
t6=$(date +%s.%N); cat "$MNT"/txt/f* > /dev/null; t7=$(date +%s.%N)
echo "bin=$BIN N=$N"
echo "kmem: txt opens +$(( (k1 - k0) / N )) B/file, elf first opens +$(( (k2 - k1) / N )) B/file"
echo "status: $(getfattr --absolute-names --only-values -n user.chargefs.status "$MNT" | grep backing_files)"
awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v e="$t4" -v f="$t5" -v g="$t6" -v h="$t7" -v n="$N" 'BEGIN {
  printf "us per open+read of a 16 KiB file: txt %.0f, elf first %.0f, elf again %.0f, txt again %.0f\n", (b-a)*1e6/n, (d-c)*1e6/n, (f-e)*1e6/n, (h-g)*1e6/n }'
