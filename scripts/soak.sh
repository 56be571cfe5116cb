#!/usr/bin/env bash
# Soak test (not in CI): mounts chargefsd (charged to a test memcg when one is available) and, for
# DURATION, runs back to back
#   - the stress test (scripts/tests/stress.py, STRESS_ROUND seconds a round, full model check at
#     the end of every round), and
#   - the exerciser: fio rounds of random writes with crc32c verification (2 jobs x 32 MiB),
# sampling every INTERVAL seconds: elapsed time, daemon RSS (VmRSS and RssAnon), stress rounds/ops/
# errors, fio rounds/errors, df used, target usage. Ends with a summary and whether RSS grew.
# Usage: scripts/soak.sh [DURATION_SECONDS (600)]      root; Env: CHARGEFSD, INTERVAL (10),
#        STRESS_ROUND (60), STRESS_WORKERS (4), SOAK_LOG (soak.log in a temp dir)
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/tests/lib.sh"
DURATION=${1:-600}
INTERVAL=${INTERVAL:-10}
ROUND=${STRESS_ROUND:-60}
[ "$(id -u)" = 0 ] || die "soak needs root (mount, cgroups)"
command -v fio >/dev/null || die "fio is needed for the exerciser"

BG=()
finish() { local p; for p in "${BG[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; cfs_cleanup; }
trap finish EXIT
trap 'exit 143' TERM INT

SCR=$(cfs_tempdir cfssoak); CFS_DIRS+=("$SCR"); CFS_LOGDIR=$SCR  # (recorded here: cfs_tempdir ran in a subshell)
MNT=$SCR/mnt
T=""
opts="size=2g"
if cg_available "$(cg_version)"; then
  T=$(cg_parent)/cfssoak-$$-target
  cg_create "$T" $((1536 * MiB))
  opts="$opts,memcg=$T"
fi
cfs_mount "$MNT" "$opts"
DPID=$CFS_PID
mkdir -p "$MNT/fio"
LOG=${SOAK_LOG:-$SCR/soak.log}
log "soak: $DURATION s, daemon $DPID ($(cfs_daemon_bin)), mount $MNT ($opts); details in $LOG"
END=$((SECONDS + DURATION))

# stress rounds: one line per round in $SCR/stress.rounds: "ops errors inconsistencies rc"
( while [ $SECONDS -lt $END ]; do
    left=$((END - SECONDS)); [ $left -gt 5 ] || break
    secs=$(( left < ROUND ? left : ROUND ))
    rc=0; out=$("$CFS_PYTHON" "$(dirname "$SELF")/tests/stress.py" "$MNT" --workers "${STRESS_WORKERS:-4}" \
      --seconds "$secs" --seed $RANDOM 2>&1) || rc=$?
    echo "$out" >> "$LOG"
    sed -nE 's/^ops ([0-9]+) errors ([0-9]+) .* ([0-9]+) inconsistencies$/\1 \2 \3/p' <<<"$out" | sed "s/\$/ $rc/" >> "$SCR/stress.rounds"
  done ) &
BG+=($!)
# fio rounds: "rc" per line in $SCR/fio.rounds
( while [ $SECONDS -lt $((END - 5)) ]; do
    rc=0
    fio --name=soak --directory="$MNT/fio" --numjobs=2 --size=32m --bs=4k --rw=randwrite --ioengine=psync \
      --verify=crc32c --verify_state_save=0 --do_verify=1 --verify_fatal=1 --group_reporting --minimal >> "$LOG" 2>&1 || rc=$?
    rm -f "$MNT"/fio/soak.*
    echo "$rc" >> "$SCR/fio.rounds"
  done ) &
BG+=($!)

rss() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$DPID/status" 2>/dev/null || echo 0; }
printf '%7s %10s %10s %8s %10s %8s %8s %8s %10s %10s\n' time_s rss_kib anon_kib s_rounds s_ops s_errs f_rounds f_errs df_used_m memcg_m
first_rss=""; last_rss=0; max_rss=0
while [ $SECONDS -lt $END ] && kill -0 "$DPID" 2>/dev/null; do
  sleep "$INTERVAL"
  r=$(rss VmRSS); a=$(rss RssAnon)
  [ -n "$first_rss" ] || first_rss=$r
  last_rss=$r; [ "$r" -gt "$max_rss" ] && max_rss=$r
  sr=0 sops=0 serr=0 fr=0 ferr=0
  [ -f "$SCR/stress.rounds" ] && read -r sr sops serr < <(awk '{n++; o+=$1; e+=$2+$3+($4!=0)} END {print n+0, o+0, e+0}' "$SCR/stress.rounds")
  [ -f "$SCR/fio.rounds" ] && read -r fr ferr < <(awk '{n++; e+=($1!=0)} END {print n+0, e+0}' "$SCR/fio.rounds")
  used=$(( $(df -B1 --output=used "$MNT" | tail -1 | tr -d ' ') / MiB ))
  cgm=-; [ -z "$T" ] || cgm=$(( $(cg_usage "$T") / MiB ))
  printf '%7d %10d %10d %8d %10d %8d %8d %8d %10d %10s\n' $((DURATION - (END - SECONDS))) "$r" "$a" "$sr" "$sops" "$serr" "$fr" "$ferr" "$used" "$cgm"
done
alive=yes; kill -0 "$DPID" 2>/dev/null || alive=no
for p in "${BG[@]}"; do wait "$p" 2>/dev/null || true; done
BG=()
sr=0 sops=0 serr=0 fr=0 ferr=0
[ -f "$SCR/stress.rounds" ] && read -r sr sops serr < <(awk '{n++; o+=$1; e+=$2+$3+($4!=0)} END {print n+0, o+0, e+0}' "$SCR/stress.rounds")
[ -f "$SCR/fio.rounds" ] && read -r fr ferr < <(awk '{n++; e+=($1!=0)} END {print n+0, e+0}' "$SCR/fio.rounds")
echo "summary: $DURATION s; stress $sr rounds, $sops ops, $serr errors/inconsistencies; fio $fr rounds, $ferr failed;" \
     "daemon alive: $alive; RSS first ${first_rss:-0} KiB, last $last_rss KiB, max $max_rss KiB"
ok=1
[ "$alive" = yes ] || ok=0
[ "$serr" = 0 ] && [ "$ferr" = 0 ] || ok=0
cfs_umount "$MNT" "$DPID" || ok=0
[ "$ok" = 1 ] && echo "soak: PASS" || { echo "soak: FAIL (log: $LOG)"; cp "$LOG" "${TMPDIR:-/tmp}/chargefs-soak-$$.log" 2>/dev/null || true; }
[ "$ok" = 1 ]
