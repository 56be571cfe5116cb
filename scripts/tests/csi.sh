#!/usr/bin/env bash
# Tests of chargefs-csi, the Kubernetes CSI node plugin, through real gRPC (scripts/tests/csi.py,
# Python grpcio) on its unix socket, root only:
#   cli          bad command lines: one line on stderr, non-zero exit; --help and --version
#   rpcs         every RPC and every status code: Identity, NodeGetInfo/Capabilities, publish
#                refusals (missing id/target/capability, block, non-ephemeral, pod uid, each
#                attribute malformed, unknown attribute, pod cgroup never appearing), quantities
#                reaching chargefsd as bytes, idempotency and ALREADY_EXISTS, stats against
#                statvfs, NOT_FOUND, read-only, unpublish idempotent, target removed
#   layouts      the pod cgroup found for every kubelet layout: systemd and cgroupfs drivers x
#                guaranteed, burstable, besteffort; and a pod cgroup created 1 s after the call
#   no_host_view the plugin in a private cgroup namespace says so at start and refuses to publish
#   pod          a kubelet-style pod: the pod's cgroup and two container cgroups (cgroupfs layout
#                on cgroup v1, systemd layout on v2), publish, a uid-65534 process in one container
#                and a uid-1000 process in the other write and read each other's data, the pod
#                is charged what they wrote and the containers nothing, fill until ENOSPC with 0
#                OOM kills, a second pod's volume charged to that pod only, kill -9 of the plugin
#                (the volume keeps serving, data intact), restart (it reloads its state and
#                unpublishes), charges back to baseline, nothing left mounted or running
#   takeover     a volume (-o takeover, the default) whose serving chargefsd is killed -9: stats
#                stay normal counting 1 takeover, a file written before reads back; its server
#                stopped: stats answer within the probe's bound, abnormal; keeper and server
#                both killed: stats abnormal naming ENOTCONN, unpublish cleans up
#   vm_pod       the pod test inside the v2 guest (scripts/vm-run.sh: cgroup v2, systemd layout)
#   manifests    deploy/kubernetes/*.yaml parse and carry what the kubelet needs (no cluster here)
# Usage: scripts/tests/csi.sh [TEST...] | --list
# Env: CHARGEFSD, CHARGEFS_CSI (default: chargefs-csi next to chargefsd), CFS_TEST_TIMEOUT (180 s
#      per test; vm_pod gives the guest 15 s less)
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
PY=/usr/bin/python3   # Debian's: the one that exists inside the guest too
CSIPY=$(dirname "$SELF")/csi.py
# grpcio from PyPI, installed by scripts/setup.sh outside /root and /tmp (fresh tmpfs in the guest)
export PYTHONPATH=$CFS_REPO/.build-csi-py${PYTHONPATH:+:$PYTHONPATH}
TESTS=(cli rpcs layouts no_host_view pod takeover vm_pod manifests)

csi_bin() {
  if [ -n "${CHARGEFS_CSI:-}" ]; then echo "$CHARGEFS_CSI"; return; fi
  echo "$(dirname "$(cfs_daemon_bin)")/chargefs-csi"
}
as() { local u=$1; shift; setpriv --reuid="$u" --regid="$u" --clear-groups -- "$@"; }
sha() { printf '%s' "$1" | sha256sum | cut -c1-64; }
uuid() { cat /proc/sys/kernel/random/uuid; }

# The scratch folder, the test's cgroup root, cleanup of everything below them.
SCR= ROOT= PLUGIN_PID= SOCK=
setup() {
  SCR=$(cfs_tempdir csi); CFS_DIRS+=("$SCR"); chmod 755 "$SCR"; CFS_LOGDIR=$SCR
  ROOT=$(cg_parent)/csi-test-$$
  cg_create "$ROOT"
  SOCK=$SCR/csi.sock
  trap csi_cleanup EXIT
}
# Mounts below $SCR first (the daemons exit with them), then any daemon serving a path below
# $SCR (ours: started by the plugin we started), then the lib's cleanup.
csi_cleanup() {
  local m p i
  if [ -n "$SCR" ]; then
    for m in $(awk -v d="$SCR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    for p in $(cfs_daemons_below "$SCR") $(keepers_below "$SCR"); do
      for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$p" 2>/dev/null || true
    done
  fi
  cfs_cleanup
}

# status_field MOUNT KEY: a value of the mount's user.chargefs.status (pid, keeper, takeovers).
status_field() { getfattr --absolute-names --only-values -n user.chargefs.status "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1; }
# gone PID: true once PID has exited (a zombie counts: its reaper may be slow).
gone() { ! kill -0 "$1" 2>/dev/null || grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }

# start_plugin [EXTRA_ARGS...]: starts chargefs-csi (recorded for cleanup) and waits for its socket.
start_plugin() {
  local bin; bin=$(csi_bin)
  local before; before=$(grep -c "listening on" "$SCR/plugin.log" 2>/dev/null || true)
  "$bin" --endpoint "unix://$SOCK" --node-id test-node --cgroup-root "$ROOT" --state-dir "$SCR/state" \
    --chargefsd "$(cfs_daemon_bin)" --daemon-cgroup "$ROOT/daemons" --pod-cgroup-wait 1 "$@" \
    >>"$SCR/plugin.log" 2>&1 &
  PLUGIN_PID=$!
  CFS_PIDS+=("$PLUGIN_PID")
  local i
  for ((i = 0; i < 300; i++)); do
    [ "$(grep -c "listening on" "$SCR/plugin.log" || true)" -gt "${before:-0}" ] && [ -S "$SOCK" ] && return 0
    kill -0 "$PLUGIN_PID" 2>/dev/null || break
    sleep 0.1
  done
  log "chargefs-csi did not start; its log:"; sed 's/^/  | /' "$SCR/plugin.log" >&2
  return 1
}
stop_plugin() {  # SIGTERM, as a DaemonSet rollout sends it
  kill "$PLUGIN_PID" 2>/dev/null || true
  wait "$PLUGIN_PID" 2>/dev/null || true
}
csi() { "$PY" "$CSIPY" "unix://$SOCK" "$@"; }
# read_as CGROUP UID FILE: md5 of FILE as read by a process of UID in CGROUP (it opens the file).
read_as() { cg_run_in "$1" setpriv --reuid="$2" --regid="$2" --clear-groups -- sh -c 'md5sum < "$1"' _ "$3"; }

# pod_cgroup UID QOS: creates the pod's cgroup as the kubelet names it (cgroupfs driver on v1,
# systemd driver on v2; both are tried by the plugin) and prints its path.
pod_cgroup() {
  local uid=$1 qos=$2 u=${1//-/_} d
  if [ "$(cg_version)" = 1 ]; then
    d=$ROOT/kubepods;   [ -d "$d" ] || cg_create "$d"
    if [ "$qos" = guaranteed ]; then d=$d/pod$uid
    else d=$d/$qos; [ -d "$d" ] || cg_create "$d"; d=$d/pod$uid; fi
  else
    d=$ROOT/kubepods.slice; [ -d "$d" ] || cg_create "$d"
    if [ "$qos" = guaranteed ]; then d=$d/kubepods-pod$u.slice
    else d=$d/kubepods-$qos.slice; [ -d "$d" ] || cg_create "$d"; d=$d/kubepods-$qos-pod$u.slice; fi
  fi
  cg_create "$d"
  echo "$d"
}

python_ready() {
  local out
  if ! out=$("$PY" -c 'import grpc, grpc_tools' 2>&1); then
    log "  cannot run: $PY cannot import grpc/grpc_tools ($out); scripts/setup.sh installs them into .build-csi-py"
    return 1
  fi
}

# ------------------------------------------------------------------------------------------
t_cli() {
  local bin; bin=$(csi_bin)
  [ -x "$bin" ] || { log "  cannot run: $bin not built"; return 1; }
  local err rc
  one_line_error() {  # DESCRIPTION WANT_STATUS NEEDLE ARGS...
    local what=$1 want=$2 needle=$3; shift 3
    rc=0; err=$("$bin" "$@" 2>&1 >/dev/null) || rc=$?
    log "    [$rc] $err"
    check "$what: exit $want" [ "$rc" = "$want" ]
    check "$what: one line naming '$needle'" bash -c '[ "$(printf "%s\n" "$1" | wc -l)" = 1 ] && grep -qF -- "$2" <<<"$1"' _ "$err" "$needle"
  }
  one_line_error "no arguments" 2 "--endpoint"
  one_line_error "no --node-id" 2 "--node-id" --endpoint unix:///tmp/x.sock
  one_line_error "tcp endpoint" 2 "tcp://1.2.3.4:5" --endpoint tcp://1.2.3.4:5 --node-id n
  one_line_error "unknown flag" 2 "--bogus" --bogus
  one_line_error "flag without value" 2 "--node-id" --endpoint unix:///tmp/x.sock --node-id
  one_line_error "bad wait" 2 "--pod-cgroup-wait" --endpoint unix:///tmp/x.sock --node-id n --pod-cgroup-wait soon
  one_line_error "relative state dir" 2 "--state-dir" --endpoint unix:///tmp/x.sock --node-id n --state-dir rel
  one_line_error "missing chargefsd" 2 "/nonexistent/chargefsd" --endpoint unix:///tmp/x.sock --node-id n --chargefsd /nonexistent/chargefsd
  one_line_error "no memory cgroup" 1 "no memory cgroup" --endpoint unix:///tmp/x.sock --node-id n --chargefsd "$(cfs_daemon_bin)" --cgroup-root /proc
  check "--help exits 0 with usage" bash -c '"$1" --help | grep -q "usage: chargefs-csi"' _ "$bin"
  check "--version" bash -c '"$1" --version | grep -q "csi.chargefs.io"' _ "$bin"
  check "nothing created at /tmp/x.sock" [ ! -e /tmp/x.sock ]
}

t_rpcs() {
  python_ready
  setup
  local uid; uid=$(uuid)
  pod_cgroup "$uid" burstable >/dev/null
  start_plugin
  check "the RPC suite passes" csi suite "$SCR" "$uid" "$(uuid)"
  check "no mount left below the scratch dir" bash -c '! grep -qF "$1/" /proc/self/mountinfo' _ "$SCR"
  check "no daemon left" [ -z "$(cfs_daemons_below "$SCR")" ]
  check "one log line per publish and unpublish" bash -c '
    [ "$(grep -c "^chargefs-csi: publish volume=v1 pod=$2 cgroup=.* size=33554432 target=" "$1")" = 1 ] &&
    [ "$(grep -c "^chargefs-csi: unpublish volume=v1 pod=$2 cgroup=.* size=33554432 target=" "$1")" = 1 ]' _ "$SCR/plugin.log" "$uid"
  log "  plugin log:"; sed 's/^/    | /' "$SCR/plugin.log" | tail -n 12 >&2
  stop_plugin
  check "socket removed after SIGTERM" [ ! -e "$SOCK" ]
}

# The memcg= a volume was mounted with, from its mount source ("chargefs:memcg=PATH").
mounted_memcg() { awk -v m="$1" '$5 == m {for (i = 7; i <= NF; i++) if ($i == "-") {print $(i + 2); exit}}' /proc/self/mountinfo | sed -n 's/^chargefs:memcg=//p'; }

t_layouts() {
  python_ready
  setup
  start_plugin --pod-cgroup-wait 5
  local uid u d rel out n=0
  for rel in "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice" \
             "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod%s.slice" \
             "kubepods.slice/kubepods-pod%s.slice" \
             "kubepods/burstable/pod%s" "kubepods/besteffort/pod%s" "kubepods/pod%s"; do
    uid=$(uuid); u=$uid
    case $rel in *.slice) u=${uid//-/_} ;; esac
    # shellcheck disable=SC2059
    d=$ROOT/$(printf "$rel" "$u")
    mkdir -p "$d"; CFS_CGROUPS+=("$d")
    n=$((n + 1))
    out=$(csi publish "v$n" "$SCR/t$n" "$uid" size=1Mi) || true
    CFS_MOUNTS+=("$SCR/t$n")
    check "${rel%%%s*}...: publish $out, memcg= the pod's cgroup" [ "$out/$(mounted_memcg "$SCR/t$n")" = "OK/$d" ]
    out=$(csi unpublish "v$n" "$SCR/t$n") || true
    check "  unpublish $out" [ "$out" = OK ]
  done
  # the kubelet may mount before the pod's cgroup exists: the plugin waits for it (bounded)
  uid=$(uuid)
  d=$ROOT/kubepods/burstable/pod$uid
  ( sleep 1; mkdir -p "$d" ) &
  local maker=$! t0=$SECONDS
  CFS_CGROUPS+=("$d")
  out=$(csi publish late "$SCR/late" "$uid" size=1Mi) || true
  CFS_MOUNTS+=("$SCR/late")
  wait "$maker"
  check "a pod cgroup created 1 s after the call is waited for: $out ($((SECONDS - t0)) s)" [ "$out/$(mounted_memcg "$SCR/late")" = "OK/$d" ]
  out=$(csi unpublish late "$SCR/late") || true
  check "  unpublish $out" [ "$out" = OK ]
  stop_plugin
}

t_no_host_view() {
  python_ready
  setup
  local uid; uid=$(uuid)
  pod_cgroup "$uid" besteffort >/dev/null
  # a private cgroup namespace, as a container without hostCgroup gets
  local bin; bin=$(csi_bin)
  unshare --cgroup -- "$bin" --endpoint "unix://$SOCK" --node-id test-node --cgroup-root "$ROOT" \
    --state-dir "$SCR/state" --chargefsd "$(cfs_daemon_bin)" --daemon-cgroup "$ROOT/daemons" \
    >"$SCR/plugin.log" 2>&1 &
  PLUGIN_PID=$!; CFS_PIDS+=("$PLUGIN_PID")
  local i; for ((i = 0; i < 300; i++)); do grep -q "listening on" "$SCR/plugin.log" 2>/dev/null && break; sleep 0.1; done
  log "    $(grep WARNING "$SCR/plugin.log")"
  check "says so at start" grep -q "WARNING: cannot see the host's cgroup tree: .*publish will be refused\|WARNING: cannot see the host's cgroup tree: .*NodePublishVolume will be refused" "$SCR/plugin.log"
  local out; out=$(csi publish v1 "$SCR/vol" "$uid" size=1Mi || true)
  log "    publish: $out"
  check "publish refused with FAILED_PRECONDITION" grep -q "^FAILED_PRECONDITION publishing refused: .*cgroup" <<<"$out"
  check "nothing mounted" bash -c '! grep -qF "$1/" /proc/self/mountinfo' _ "$SCR"
  check "Probe still answers" bash -c '"$@" info | grep -q "\"probe_ready\": true"' _ "$PY" "$CSIPY" "unix://$SOCK"
  stop_plugin
}

# The kubelet-style scenario.
t_pod() {
  python_ready
  setup
  local bin; bin=$(cfs_daemon_bin)
  local uid1 uid2 P1 P2 C1 C2 C3
  uid1=$(uuid); uid2=$(uuid)
  P1=$(pod_cgroup "$uid1" burstable); cg_set_limit "$P1" $((64 * MiB))
  C1=$P1/c1; C2=$P1/c2; cg_create "$C1"; cg_create "$C2"
  P2=$(pod_cgroup "$uid2" besteffort); cg_set_limit "$P2" $((32 * MiB))
  C3=$P2/c1; cg_create "$C3"
  log "  layout: $(cg_version | sed 's/1/cgroup v1, cgroupfs driver/; s/2/cgroup v2, systemd driver/'): ${P1#"$ROOT"/}"
  start_plugin
  # where the kubelet puts an inline volume, and the id it gives it
  local T1=$SCR/kubelet/pods/$uid1/volumes/kubernetes.io~csi/scratch/mount
  local T2=$SCR/kubelet/pods/$uid2/volumes/kubernetes.io~csi/scratch/mount
  local V1=csi-$(sha "$uid1"scratch) V2=csi-$(sha "$uid2"scratch)
  mkdir -p "$(dirname "$T1")" "$(dirname "$T2")"
  chmod -R 755 "$SCR/kubelet"
  local base1 base2 shm1 shm2; base1=$(cg_usage "$P1"); base2=$(cg_usage "$P2"); shm1=$(cg_shmem "$P1"); shm2=$(cg_shmem "$P2")

  local out; out=$(csi publish "$V1" "$T1" "$uid1" size=1Gi) || true
  check "publish pod 1's volume: $out" [ "$out" = OK ]
  CFS_MOUNTS+=("$T1")
  check "fuse.chargefsd mount with allow_other" bash -c 'awk -v m="$1" "\$5 == m" /proc/self/mountinfo | grep -q "fuse.chargefsd .*allow_other"' _ "$T1"
  local dpid; dpid=$(cfs_daemons_below "$SCR" | head -n1)
  check "its daemon runs in the node-level cgroup, not the plugin's nor the pod's" [ "$(cg_of_pid "$dpid")" = "$ROOT/daemons" ]
  check "its daemon is in its own session" [ "$(ps -o sid= -p "$dpid" | tr -d ' ')" != "$(ps -o sid= -p "$PLUGIN_PID" | tr -d ' ')" ]

  # two containers of other uids share it
  cg_run_in "$C1" setpriv --reuid=65534 --regid=65534 --clear-groups -- sh -c 'head -c 8388608 /dev/urandom > "$1/from-c1"' _ "$T1"
  cg_run_in "$C2" setpriv --reuid=1000 --regid=1000 --clear-groups -- sh -c 'head -c 8388608 /dev/urandom > "$1/from-c2"' _ "$T1"
  local sum1 sum2; sum1=$(md5sum < "$T1/from-c1"); sum2=$(md5sum < "$T1/from-c2")
  check "uid 1000 in container 2 reads what uid 65534 in container 1 wrote" [ "$(read_as "$C2" 1000 "$T1/from-c1")" = "$sum1" ]
  check "files owned by their writers" [ "$(stat -c %u "$T1/from-c1")/$(stat -c %u "$T1/from-c2")" = 65534/1000 ]
  check "uid 1000 cannot delete uid 65534's file (sticky 1777, as a memory emptyDir)" \
    bash -c '! setpriv --reuid=1000 --regid=1000 --clear-groups -- rm -f "$1/from-c1" 2>/dev/null' _ "$T1"
  # fsGroup as the kubelet applies it (fsGroupPolicy: File): the volume root's group becomes
  # the fsGroup with setgid; containers of other uids in that group then share files with
  # umask 002, as on an emptyDir
  chgrp 3000 "$T1" && chmod g+s "$T1"
  check "kubelet's fsGroup change applies: root $(stat -c '%a %g' "$T1")" [ "$(stat -c '%a %g' "$T1")" = "3777 3000" ]
  cg_run_in "$C1" setpriv --reuid=65534 --regid=65534 --groups=3000 -- sh -c 'umask 002; echo one > "$1/shared"' _ "$T1"
  check "a file made by uid 65534 gets group 3000 (setgid root)" [ "$(stat -c %g "$T1/shared")" = 3000 ]
  check "uid 1000 in group 3000 (other container) can write it" \
    cg_run_in "$C2" setpriv --reuid=1000 --regid=1000 --groups=3000 -- sh -c 'echo two >> "$1/shared"' _ "$T1"
  check "both lines there" [ "$(cat "$T1/shared" | tr '\n' ' ')" = "one two " ]
  rm -f "$T1/shared"
  local rise1 c1u c2u; rise1=$(( $(cg_usage "$P1") - base1 )); c1u=$(cg_usage "$C1"); c2u=$(cg_usage "$C2")
  log "  pod 1 charge rose $(fmt_mib "$rise1") for 16 MiB written; containers: $(fmt_mib "$c1u"), $(fmt_mib "$c2u")"
  # The containers' own processes (dd, setpriv, sh) are charged to the pod too: the volume's
  # charge is the pod's rise less theirs (0.9 MiB of 17.8 in one run of the fresh-clone CI).
  check "pod 1 charged the 16 MiB, its containers' own memory aside (within 1.5 MiB)" \
    near "$((rise1 - c1u - c2u))" $((16 * MiB)) $((3 * MiB / 2))
  local shrise; shrise=$(( $(cg_shmem "$P1") - shm1 ))
  log "  pod 1 memory.stat shmem rose $(fmt_mib "$shrise")"
  check "as shmem in the pod's memory.stat (16 MiB within 1.5 MiB)" near "$shrise" $((16 * MiB)) $((3 * MiB / 2))
  check "containers charged < 1 MiB each" bash -c '[ "$1" -lt 1048576 ] && [ "$2" -lt 1048576 ]' _ "$c1u" "$c2u"
  local st; st=$(csi stats "$V1" "$T1") || true
  log "    stats: $st"
  check "stats: used >= 16 MiB and total = pod headroom, not 1Gi" "$PY" -c '
import json, sys; s = json.loads(sys.argv[1])["bytes"]
sys.exit(0 if s["used"] >= 16 << 20 and s["total"] <= 64 << 20 else 1)' "$st"

  # fill until ENOSPC
  local rc=0 ddout
  ddout=$(cg_run_in "$C1" setpriv --reuid=65534 --regid=65534 --clear-groups -- dd if=/dev/zero of="$T1/fill" bs=1M 2>&1) || rc=$?
  local filled; filled=$(stat -c %s "$T1/fill")
  log "  fill: exit $rc after $(fmt_mib "$filled"); $(grep -o 'No space left on device' <<<"$ddout" | head -n1); pod 1 $(cg_describe "$P1")"
  check "the fill ends in ENOSPC" grep -q "No space left on device" <<<"$ddout"
  check "the writer was not killed (exit $rc)" [ "$rc" = 1 ]
  check "0 OOM kills in pod 1" [ "$(cg_oom_kills "$P1")" = 0 ]
  check "pod 1 under its 64 MiB limit" le "$(cg_usage "$P1")" $((64 * MiB))

  # a second pod alongside, charged to itself only
  local before1; before1=$(cg_usage "$P1")
  out=$(csi publish "$V2" "$T2" "$uid2" size=16Mi) || true
  check "publish pod 2's volume: $out" [ "$out" = OK ]
  CFS_MOUNTS+=("$T2")
  cg_run_in "$C3" setpriv --reuid=65534 --regid=65534 --clear-groups -- sh -c 'head -c 4194304 /dev/urandom > "$1/p2"' _ "$T2"
  local rise2 d1 c3u shrise2; rise2=$(( $(cg_usage "$P2") - base2 )); d1=$(( $(cg_usage "$P1") - before1 ))
  c3u=$(cg_usage "$C3"); shrise2=$(( $(cg_shmem "$P2") - shm2 ))
  log "  pod 2 charge rose $(fmt_mib "$rise2") for 4 MiB (its container $(fmt_mib "$c3u"), shmem $(fmt_mib "$shrise2")); pod 1 moved $(fmt_mib "$d1") meanwhile"
  # As for pod 1: the container's own processes aside; besides the data, the pod now holds its
  # volume's charge helper (about 0.5 MiB), the page store's reserve (up to 256 KiB) and the
  # kernel's per-CPU charge stock.
  check "pod 2 charged its 4 MiB, its container's own memory aside (within 1.5 MiB)" \
    near "$((rise2 - c3u))" $((4 * MiB)) $((3 * MiB / 2))
  check "as shmem in pod 2's memory.stat (4 MiB within 1 MiB)" near "$shrise2" $((4 * MiB)) "$MiB"
  check "pod 1 not charged for pod 2 (rose < 0.5 MiB)" le "$d1" $((MiB / 2))

  # the plugin dies (SIGKILL), the volumes keep serving
  kill -9 "$PLUGIN_PID"; wait "$PLUGIN_PID" 2>/dev/null || true
  check "volume 1 still mounted after kill -9 of the plugin" is_mounted "$T1"
  check "daemon still running" kill -0 "$dpid"
  check "data intact (read by container 2)" [ "$(read_as "$C2" 1000 "$T1/from-c1")" = "$sum1" ]
  check "still writable (container 1 frees its fill, container 2 writes)" bash -c '
    cg_run_in() { local cg=$1; shift; ( echo "$BASHPID" > "$cg/cgroup.procs" && exec "$@" ); }
    cg_run_in "$1" setpriv --reuid=65534 --regid=65534 --clear-groups -- rm "$3/fill" &&
    cg_run_in "$2" setpriv --reuid=1000 --regid=1000 --clear-groups -- sh -c "echo after > \"\$1/after-kill\"" _ "$3" &&
    [ "$(cat "$3/after-kill")" = after ]' _ "$C1" "$C2" "$T1"
  start_plugin
  check "the new plugin found both volumes" [ "$(grep -c "^chargefs-csi: state: volume=.* still mounted" "$SCR/plugin.log")" = 2 ]
  st=$(csi stats "$V1" "$T1") || true
  check "the new plugin serves stats: $st" grep -q '"bytes"' <<<"$st"
  out=$(csi publish "$V1" "$T1" "$uid1" size=1Gi) || true
  check "republish after restart is idempotent: $out" [ "$out" = OK ]
  check "data still intact" [ "$(md5sum < "$T1/from-c2")" = "$sum2" ]

  out=$(csi unpublish "$V1" "$T1") || true
  check "the new plugin unpublishes volume 1: $out" [ "$out" = OK ]
  out=$(csi unpublish "$V2" "$T2") || true
  check "and volume 2: $out" [ "$out" = OK ]
  check "nothing mounted" bash -c '! grep -qF "$1/" /proc/self/mountinfo' _ "$SCR"
  check "target dirs removed" bash -c '[ ! -e "$1" ] && [ ! -e "$2" ]' _ "$T1" "$T2"
  local i; for ((i = 0; i < 50; i++)); do [ -z "$(cfs_daemons_below "$SCR")" ] && break; sleep 0.1; done
  check "no chargefsd left running" [ -z "$(cfs_daemons_below "$SCR")" ]
  local end1 end2
  for ((i = 0; i < 30; i++)); do
    end1=$(cg_usage "$P1"); end2=$(cg_usage "$P2")
    le "$end1" $((base1 + MiB / 2)) && le "$end2" $((base2 + MiB / 2)) && break
    sleep 0.1
  done
  log "  after unpublish: pod 1 $(fmt_mib "$end1") (baseline $(fmt_mib "$base1")), pod 2 $(fmt_mib "$end2") (baseline $(fmt_mib "$base2"))"
  # (the baseline itself holds up to 64 pages per CPU of charge stock: it may end below it)
  check "pod 1 back at (or below) its baseline + 0.5 MiB" le "$end1" $((base1 + MiB / 2))
  check "pod 2 back at (or below) its baseline + 0.5 MiB" le "$end2" $((base2 + MiB / 2))
  check "no charge leaf left in the pods" [ -z "$(find "$P1" "$P2" -mindepth 1 -maxdepth 1 -type d -name 'chargefs-*')" ]
  check "no OOM kill in either pod" [ "$(cg_oom_kills "$P1")/$(cg_oom_kills "$P2")" = 0/0 ]
  check "state dir empty" [ -z "$(find "$SCR/state" -name '*.json')" ]
  stop_plugin
  check "plugin gone" bash -c '! kill -0 "$1" 2>/dev/null' _ "$PLUGIN_PID"
  log "  plugin log:"; grep -E "publish|state:" "$SCR/plugin.log" | sed 's/^/    | /' >&2
}

# QEMU emulates the guest's CPUs (no KVM here): the pod test takes about three times as long there.
tmo_vm_pod() { if [ "$(bash "$CFS_REPO/scripts/vm-run.sh" --which 2>/dev/null)" = qemu ]; then echo $(($1 * 3)); else echo "$1"; fi; }
t_vm_pod() {
  if [ -n "${CHARGEFS_IN_VM:-}" ]; then log "  already inside the guest"; return 1; fi
  local vm=$CFS_REPO/scripts/vm-run.sh kind
  [ -f "$vm" ] || { log "  cannot run: scripts/vm-run.sh is missing"; return 1; }
  kind=$(bash "$vm" --which) || { log "  cannot run: no guest kernel (scripts/vm-run.sh --which)"; return 1; }
  # within this test's own time limit: the guest, and the test inside it, a little less
  local out rc=0 tmo=${CFS_THIS_TEST_TIMEOUT:-${CFS_TEST_TIMEOUT:-180}}
  out=$(bash "$vm" --timeout $((tmo - 15)) -- \
    env CHARGEFS_IN_VM=1 CHARGEFS_CGROUP_VERSION=2 CHARGEFSD="$(cfs_daemon_bin)" CHARGEFS_CSI="$(csi_bin)" \
    TMPDIR=/tmp CFS_TEST_TIMEOUT=$((tmo - 30)) PATH="$PATH" \
    bash "$SELF" pod 2>&1) || rc=$?
  sed "s/^/  [$kind] /" <<<"$out" >&2
  check "inside the $kind guest (cgroup v2, systemd layout): pod test passed (exit $rc)" [ "$rc" = 0 ]
  check "it ran on cgroup v2 with the systemd layout" grep -q "cgroup v2, systemd driver" <<<"$out"
  check "inside the $kind guest: 1 passed, 0 failed" grep -q "^1 passed, 0 failed" <<<"$out"
}

# No cluster and no container engine here: check what can be checked, the manifests' content.
# A volume that survives kill -9 of its server (the keeper restarts it) and one that does not
# (keeper and server both killed), as NodeGetVolumeStats reports them.
t_takeover() {
  python_ready
  setup
  local uid; uid=$(uuid)
  pod_cgroup "$uid" burstable >/dev/null
  start_plugin
  local T=$SCR/kubelet/pods/$uid/volumes/kubernetes.io~csi/scratch/mount V; V=csi-$(sha "$uid"scratch)
  mkdir -p "$(dirname "$T")"
  local out; out=$(csi publish "$V" "$T" "$uid" size=64Mi) || true
  check "publish (no takeover attribute: on by default): $out" [ "$out" = OK ]
  CFS_MOUNTS+=("$T")
  local server keeper; server=$(status_field "$T" pid); keeper=$(status_field "$T" keeper)
  log "    status: $(getfattr --absolute-names --only-values -n user.chargefs.status "$T" 2>&1 | tr '\n' ' ')"
  [ -n "$server" ] && [ -n "$keeper" ] || { log "  FAIL: no pid= or keeper= in the status attribute"; return 1; }
  check "status shows a server and its keeper, 0 takeovers" [ "${server:+s}${keeper:+k}/$(status_field "$T" takeovers)" = sk/0 ]
  # only processes of this mount: both name its target in their arguments
  check "server $server and keeper $keeper are this volume's" bash -c 'tr "\0" "\n" < /proc/$1/cmdline | grep -qxF "$3" && tr "\0" "\n" < /proc/$2/cmdline | grep -qxF "$3"' _ "$server" "$keeper" "$T"
  head -c 1048576 /dev/urandom > "$T/before"
  local sum; sum=$(md5sum < "$T/before")

  kill -9 "$server"
  local i; for ((i = 0; i < 100; i++)); do gone "$server" && break; sleep 0.05; done
  out=$(csi stats "$V" "$T") || true
  log "    stats after kill -9 of the server: $out"
  check "stats after kill -9 of the server: normal, 1 takeover" \
    bash -c 'grep -q "\"abnormal\": false, \"message\": \"serving, 1 takeover" <<<"$1" && grep -q "\"bytes\"" <<<"$1"' _ "$out"
  check "the file written before reads back" [ "$(md5sum < "$T/before")" = "$sum" ]
  server=$(status_field "$T" pid); keeper=$(status_field "$T" keeper)
  check "a new server ($server) serves, takeovers=1" [ "$(status_field "$T" takeovers)" = 1 ]

  # a stopped server: the stats call ends within the probe's bound (3 s) and says so
  kill -STOP "$server"
  local t0=$SECONDS
  out=$(csi stats "$V" "$T") || true
  log "    stats with the server stopped ($((SECONDS - t0)) s): $out"
  check "stats with the server stopped: abnormal within 5 s" \
    bash -c '[ "$2" -le 5 ] && grep -q "\"abnormal\": true, \"message\": \"chargefsd did not answer within" <<<"$1"' _ "$out" "$((SECONDS - t0))"
  kill -CONT "$server"
  check "it answers again once continued" [ "$(status_field "$T" pid)" = "$server" ]

  # keeper first, then the server: stopped meanwhile, so that it cannot start a new keeper
  kill -STOP "$server"; kill -9 "$keeper"; kill -9 "$server"
  for ((i = 0; i < 100; i++)); do gone "$server" && gone "$keeper" && break; sleep 0.05; done
  check "keeper $keeper and server $server are gone" bash -c '! kill -0 "$1" 2>/dev/null || grep -q " Z " "/proc/$1/stat"' _ "$server"
  out=$(csi stats "$V" "$T") || true
  log "    stats with keeper and server killed: $out"
  check "stats: abnormal, naming ENOTCONN, no usage" \
    bash -c 'grep -q "\"abnormal\": true, \"message\": \"chargefsd is gone (server and keeper): the mount answers ENOTCONN" <<<"$1" && ! grep -q "\"bytes\"" <<<"$1"' _ "$out"
  out=$(csi unpublish "$V" "$T") || true
  check "unpublish: $out" [ "$out" = OK ]
  check "nothing left mounted below the scratch dir" bash -c '! grep -qF "$1/" /proc/self/mountinfo' _ "$SCR"
  check "no daemon or keeper left" [ -z "$(cfs_daemons_below "$SCR")$(keepers_below "$SCR")" ]
  stop_plugin
}

t_manifests() {
  "$PY" -c 'import yaml' 2>/dev/null || { log "  cannot run: python3-yaml missing (scripts/setup.sh installs it)"; return 1; }
  local out
  out=$("$PY" - "$CFS_REPO/deploy" <<'PYEOF' 2>&1
import glob, os, sys, yaml
d = sys.argv[1]
docs = {}
for f in sorted(glob.glob(os.path.join(d, "kubernetes", "*.yaml"))):
    for doc in yaml.safe_load_all(open(f)):
        if doc:
            docs.setdefault(doc["kind"], []).append(doc)
            print("parsed %s %s/%s from %s" % (doc["apiVersion"], doc["kind"], doc["metadata"]["name"], os.path.basename(f)))
fails = []
def want(what, cond):
    print(("ok: " if cond else "FAIL: ") + what)
    if not cond: fails.append(what)
drv = docs["CSIDriver"][0]["spec"]
want("CSIDriver csi.chargefs.io", docs["CSIDriver"][0]["metadata"]["name"] == "csi.chargefs.io")
want("attachRequired: false", drv["attachRequired"] is False)
want("podInfoOnMount: true", drv["podInfoOnMount"] is True)
want("volumeLifecycleModes: [Ephemeral]", drv["volumeLifecycleModes"] == ["Ephemeral"])
want("fsGroupPolicy: File (fsGroup applied as on an emptyDir)", drv.get("fsGroupPolicy") == "File")
ds = docs["DaemonSet"][0]["spec"]["template"]["spec"]
cs = {c["name"]: c for c in ds["containers"]}
plugin = cs["chargefs-csi"]
vols = {v["name"]: v for v in ds["volumes"]}
mounts = {m["mountPath"]: m for m in plugin["volumeMounts"]}
want("hostPID (daemons outlive the plugin's PID namespace)", ds.get("hostPID") is True)
want("plugin privileged", plugin["securityContext"]["privileged"] is True)
want("plugin joins the host cgroup namespace", plugin["command"][:4] == ["nsenter", "--target", "1", "--cgroup"])
args = " ".join(plugin["args"])
want("plugin args: endpoint, node-id, state-dir", all(a in args for a in ("--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)", "--state-dir=/csi/state")))
want("/dev/fuse mounted", vols[mounts["/dev/fuse"]["name"]]["hostPath"]["path"] == "/dev/fuse")
want("/sys/fs/cgroup mounted", vols[mounts["/sys/fs/cgroup"]["name"]]["hostPath"]["path"] == "/sys/fs/cgroup")
kub = mounts["/var/lib/kubelet"]
want("kubelet dir with Bidirectional propagation", kub.get("mountPropagation") == "Bidirectional" and vols[kub["name"]]["hostPath"]["path"] == "/var/lib/kubelet")
want("socket dir = kubelet plugins dir", vols[mounts["/csi"]["name"]]["hostPath"]["path"] == "/var/lib/kubelet/plugins/csi.chargefs.io")
reg = cs["node-driver-registrar"]
want("node-driver-registrar sidecar with registration path", "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.chargefs.io/csi.sock" in reg["args"])
want("registration dir mounted", any(vols[m["name"]]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry" for m in reg["volumeMounts"]))
want("livenessprobe sidecar", "--csi-address=/csi/csi.sock" in cs["liveness-probe"]["args"] and plugin["livenessProbe"]["httpGet"]["path"] == "/healthz")
pod = docs["Pod"][0]["spec"]
csivols = [v for v in pod["volumes"] if "csi" in v]
want("example pod: a csi.chargefs.io inline volume", len(csivols) == 1 and csivols[0]["csi"]["driver"] == "csi.chargefs.io")
users = [c for c in pod["containers"] if any(m["name"] == csivols[0]["name"] for m in c["volumeMounts"])]
want("example pod: two containers of different uids share it", len(users) == 2 and len({c["securityContext"]["runAsUser"] for c in users}) == 2)
cf = open(os.path.join(d, "Containerfile")).read()
want("Containerfile builds chargefsd and chargefs-csi", "--product chargefsd" in cf and "--product chargefs-csi" in cf)
sys.exit(1 if fails else 0)
PYEOF
) || true
  sed 's/^/    /' <<<"$out" >&2
  check "every manifest parses and carries the required fields" bash -c '! grep -q "^FAIL\|Traceback\|Error" <<<"$1" && grep -q "ok: Containerfile" <<<"$1"' _ "$out"
}

test_main "CSI plugin tests" 180 "$@"
