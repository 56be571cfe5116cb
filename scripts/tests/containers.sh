#!/usr/bin/env bash
# chargefs-csi in a real container runtime (podman with runc), root only:
#   image    deploy/build-image.sh builds the image offline (debootstrap base, this build's
#            binaries); chargefs-csi and the daemon bundle run inside it; its size
#   pods     the plugin run as deploy/kubernetes/daemonset.yaml runs it (podman arguments made
#            from the manifest: privileged, host PID, /dev/fuse, /sys/fs/cgroup, the kubelet dir
#            rshared, the plugin dir, the nsenter entrypoint); pods of real containers in the
#            kubelet's cgroupfs layout (kubepods/burstable/pod<uid>/<container>): two containers
#            of uids 65534 and 1000 share the published volume through a bind mount of the
#            target path; 16 MiB charges the pod, not the containers; a fill ends in ENOSPC with
#            0 OOM kills; podman restart keeps the data; a second pod is charged separately;
#            unpublish returns the charges; nothing left mounted or running
#   upgrade  with two pods' volumes published: podman stop, rm and run of the plugin, then an
#            upgrade to an image of the next build: the daemons live in none of the container's
#            cgroups (any hierarchy), its mount namespace or its root; every volume keeps
#            serving from the pods' containers with its data; each new plugin finds them; a
#            volume published by the new plugin runs the new daemon, the old ones the old; a
#            volume whose daemon went leaves a directory nothing can be written into; the last
#            plugin unpublishes everything; nothing left mounted or running
# Each test uses a private kubelet dir (bind-mounted on itself, rshared) and a private cgroup
# root (/sys/fs/cgroup/*/chargefs-ctest-PID) and removes its containers, mounts and cgroups even
# when it fails. The image is built once per run (tag localhost/chargefs-csi:ctest-RUN) and
# removed at the end; the debootstrap base (localhost/chargefs-base:bookworm and
# .build-image/base-bookworm) is a cache and stays.
#   sanity   (not in the default run: needs CSI_SANITY, a csi-sanity binary built outside the
#            repository, e.g. kubernetes-csi/csi-test v5.3.1 from its vendor/ with Debian's Go)
#            csi-sanity against the plugin in its container, the Controller specs skipped (a
#            node-only driver); volume parameters name an ephemeral volume of a pod whose cgroup
#            exists; the specs that call CreateVolume first cannot pass without a controller
# Usage: scripts/tests/containers.sh [TEST...] | --list
# Env: CHARGEFSD (its folder gives chargefs-csi, chargefs-charge-helper and chargefs-keeper for the image),
#      CFS_CONTAINERS_TIMEOUT (per test, default 420 s)
set -euo pipefail
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/tests/lib.sh
source "$(dirname "$SELF")/lib.sh"
PY=/usr/bin/python3
CSIPY=$(dirname "$SELF")/csi.py
export PYTHONPATH=$CFS_REPO/.build-csi-py${PYTHONPATH:+:$PYTHONPATH}
TESTS=(image pods upgrade)
RUN_ID=${CFS_CONTAINERS_RUN:-$$}
export CFS_CONTAINERS_RUN=$RUN_ID
IMG=localhost/chargefs-csi:ctest-$RUN_ID
IMG_NEXT=localhost/chargefs-csi:ctest-$RUN_ID-next
LABEL=chargefs-ctest=$RUN_ID
PODMAN=(podman --runtime runc)
# podman's default ulimits exceed this host's hard limits (runc refuses them)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
MiB=$((1024 * 1024))
uuid() { cat /proc/sys/kernel/random/uuid; }
sha() { printf '%s' "$1" | sha256sum | cut -c1-64; }

# Why this group cannot run here, or nothing.
missing() {
  command -v podman >/dev/null || { echo "podman is not installed (scripts/setup.sh installs it)"; return; }
  command -v runc >/dev/null || { echo "runc is not installed (scripts/setup.sh installs it)"; return; }
  [ "$(cg_version)" = 1 ] || { echo "the pod layout here is cgroup v1's (cgroupfs driver); memory is not on v1 here"; return; }
  "$PY" -c 'import grpc, yaml' 2>/dev/null || { echo "$PY cannot import grpc and yaml (scripts/setup.sh installs them)"; return; }
  local d; d=$(dirname "$(cfs_daemon_bin)")
  [ -x "$d/chargefs-csi" ] && [ -x "$d/chargefs-charge-helper" ] && [ -x "$d/chargefs-keeper" ] || { echo "$d has no chargefs-csi, chargefs-charge-helper and chargefs-keeper (scripts/build.sh)"; return; }
}

# --- the image ----------------------------------------------------------------------------------
# ensure_image TAG [MARK]: builds TAG from this build's binaries unless it exists; with MARK, the
# daemon carries a trailing note, so that it is another build's (another bundle on the host).
ensure_image() {
  local tag=$1 mark=${2:-} bin d t0=$SECONDS
  "${PODMAN[@]}" image exists "$tag" && return 0
  bin=$(dirname "$(cfs_daemon_bin)")
  d=$(cfs_tempdir ctest-bin); CFS_DIRS+=("$d")
  cp "$bin/chargefsd" "$bin/chargefs-charge-helper" "$bin/chargefs-keeper" "$bin/chargefs-csi" "$d/"
  if [ -n "$mark" ]; then  # a section of its own survives build-image.sh's strip
    printf '%s\n' "$mark" > "$d/mark"
    objcopy --add-section .chargefs_build="$d/mark" --set-section-flags .chargefs_build=noload,readonly "$d/chargefsd"
  fi
  bash "$CFS_REPO/deploy/build-image.sh" --bin-dir "$d" --tag "$tag" >"$d/build.log" 2>&1 \
    || { sed 's/^/    | /' "$d/build.log" >&2; return 1; }
  log "  $(tail -n1 "$d/build.log") in $((SECONDS - t0)) s"
}
remove_images() {
  "${PODMAN[@]}" rmi -f "$IMG" "$IMG_NEXT" >/dev/null 2>&1 || true
}

# --- per-test scaffolding: kubelet dir, cgroup root, containers ----------------------------------
SCR= KDIR= PDIR= CGNAME= CGROOT= SOCK=
setup() {
  SCR=$(cfs_tempdir ctest); CFS_DIRS+=("$SCR"); chmod 755 "$SCR"
  # podman's conmon writes an empty "oom" file into its working directory when a container's
  # memory cgroup reports an OOM event, which v1 sends when the pod reaches its limit even if
  # nothing is killed (the fill below): keep it out of the caller's folder
  cd "$SCR"
  # the kubelet's dir, private to the test: a shared mount, as /var/lib/kubelet is on a node
  KDIR=$SCR/kubelet; mkdir -p "$KDIR"
  mount --bind "$KDIR" "$KDIR"; mount --make-rshared "$KDIR"
  PDIR=$KDIR/plugins/csi.chargefs.io; mkdir -p "$PDIR"
  SOCK=$PDIR/csi.sock
  CGNAME=chargefs-ctest-$$
  CGROOT=/sys/fs/cgroup/memory/$CGNAME
  mkdir -p "$CGROOT"
  trap ctest_cleanup EXIT
}
# Containers of this run, the volumes' mounts and daemons, the kubelet dir, the cgroups.
ctest_cleanup() {
  local ids m p i
  ids=$("${PODMAN[@]}" ps -aq --filter "label=$LABEL" 2>/dev/null || true)
  # shellcheck disable=SC2086
  [ -z "$ids" ] || "${PODMAN[@]}" rm -f -t 0 $ids >/dev/null 2>&1 || true
  if [ -n "$KDIR" ]; then
    for m in $(awk -v d="$KDIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    for p in $(cfs_daemons_below "$KDIR"); do
      for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$p" 2>/dev/null || true
    done
    # guarded target dirs (immutable) must lose the flag before they can go
    find "$KDIR" -xdev -type d -exec chattr -i {} + 2>/dev/null || true
    umount "$KDIR" 2>/dev/null || umount -l "$KDIR" 2>/dev/null || true
  fi
  if [ -n "$CGNAME" ]; then
    local h
    for h in /sys/fs/cgroup/*/; do
      [ -d "$h$CGNAME" ] || continue
      find "$h$CGNAME" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
  fi
  cfs_cleanup
}

# The plugin's podman arguments, made from deploy/kubernetes/daemonset.yaml: its security
# context, host PID, volumes (hostPath, mountPropagation), command and args, with the kubelet
# dir and the cgroup root replaced by the test's. PID 1's namespaces are closed to containers on
# this machine (its PID 1 is a VM agent outside the sandbox the session runs in), so the
# entrypoint's `nsenter --target 1 --cgroup` targets the container's runtime monitor (conmon,
# its parent, in the host's namespaces) instead. One argument per line.
plugin_args() {
  "$PY" - "$CFS_REPO/deploy/kubernetes/daemonset.yaml" "$KDIR" "$CGNAME" <<'PYEOF'
import json, sys, yaml
f, kdir, cgname = sys.argv[1:]
ds = [d for d in yaml.safe_load_all(open(f)) if d and d["kind"] == "DaemonSet"][0]
spec = ds["spec"]["template"]["spec"]
c = [x for x in spec["containers"] if x["name"] == "chargefs-csi"][0]
vols = {v["name"]: v for v in spec["volumes"]}
sub = lambda s: s.replace("/var/lib/kubelet", kdir)
out = []
if spec.get("hostPID"): out.append("--pid=host")
if c.get("securityContext", {}).get("privileged"): out.append("--privileged")
for m in c["volumeMounts"]:
    prop = {"Bidirectional": "rshared", "HostToContainer": "rslave"}.get(m.get("mountPropagation"), "rprivate")
    out += ["-v", "%s:%s:%s" % (sub(vols[m["name"]]["hostPath"]["path"]), sub(m["mountPath"]), prop)]
cmd = c["command"]
if cmd[:4] == ["nsenter", "--target", "1", "--cgroup"]:
    cmd = ["/bin/sh", "-c", 'exec nsenter --target "$PPID" --cgroup -- "$@"', "nsenter"]
out.append("--entrypoint=" + json.dumps(cmd))
args = []
for a in c["args"]:
    a = sub(a).replace("$(NODE_NAME)", "ctest-node")
    if a == "--cgroup-root=/sys/fs/cgroup": a = "--cgroup-root=/sys/fs/cgroup/memory/" + cgname
    args.append(a)
print("\n".join(out + ["IMAGE"] + args))
PYEOF
}
# plugin_up: a test's scratch world (setup), this run's image and the plugin running from it as
# PLUGIN; fails saying why where podman, runc or the test's Python modules are missing.
plugin_up() {
  [ -z "$(missing)" ] || { log "  cannot run: $(missing)"; return 1; }
  setup
  ensure_image "$IMG"
  PLUGIN=ctest-$$-plugin
  run_plugin "$PLUGIN" "$IMG"
}
# run_plugin NAME IMAGE: starts the plugin container and waits for its socket.
run_plugin() {
  local name=$1 image=$2 a args=()
  while IFS= read -r a; do [ "$a" = IMAGE ] && a=$image; args+=("$a"); done < <(plugin_args)
  printf '%s\n' "${args[@]}" > "$SCR/plugin-args"
  rm -f "$SOCK"
  "${PODMAN[@]}" run -d --name "$name" --label "$LABEL" "${LIMITS[@]}" --network=none "${args[@]}" >/dev/null
  local i
  for ((i = 0; i < 300; i++)); do
    [ -S "$SOCK" ] && "${PODMAN[@]}" logs "$name" 2>&1 | grep -q "listening on" && return 0
    [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || break
    sleep 0.1
  done
  log "  the plugin container did not start; its log:"; "${PODMAN[@]}" logs "$name" 2>&1 | sed 's/^/    | /' >&2
  return 1
}
plugin_log() { "${PODMAN[@]}" logs "$1" 2>&1; }
csi() { "$PY" "$CSIPY" "unix://$SOCK" "$@"; }

# new_pod UID LIMIT: the pod's cgroup in the cgroupfs layout, with its memory limit. Prints it.
new_pod() {
  local d=$CGROOT/kubepods/burstable/pod$1
  mkdir -p "$d"; echo "$2" > "$d/memory.limit_in_bytes"
  echo "$d"
}
# pod_container NAME POD_UID UID TARGET: a container of the pod, running as UID, the volume's
# target path bind-mounted at /data (rprivate: as the kubelet mounts volumes into containers).
pod_container() {
  "${PODMAN[@]}" run -d --name "$1" --label "$LABEL" "${LIMITS[@]}" --network=none --user "$3:$3" \
    --cgroup-parent "/$CGNAME/kubepods/burstable/pod$2" -v "$4:/data" \
    localhost/chargefs-base:bookworm sleep infinity >/dev/null
}
# What podman's own processes hold in a pod: conmon (and the runc of each exec) sit in a
# "conmon" cgroup under the cgroup parent. The kubelet's runtimes keep their monitors outside.
runtime_usage() { if [ -d "$1/conmon" ]; then cg_usage "$1/conmon"; else echo 0; fi; }
# What the pod is charged outside its containers' and podman's cgroups: the pod's own pages
# (memory.stat's non-total cache and rss) and its charge leaves (chargefs-*: the volume's pages
# and the charge helper). Read from the cgroups that hold it rather than as the pod's usage
# less its children's, which adds up every child's per-CPU charge stock (up to 0.5 MiB each).
volume_usage() {
  local u d
  u=$(awk '$1 == "cache" || $1 == "rss" {s += $2} END {print s + 0}' "$1/memory.stat")
  for d in "$1"/chargefs-*/; do [ -d "$d" ] && u=$((u + $(cg_usage "$d"))); done
  echo "$u"
}
# The container's memory cgroup.
ctr_cgroup() { echo "/sys/fs/cgroup/memory$(awk -F: '$2 == "memory" {print $3}' "/proc/$("${PODMAN[@]}" inspect -f '{{.State.Pid}}' "$1")/cgroup")"; }
in_ctr() { local c=$1; shift; "${PODMAN[@]}" exec "$c" "$@"; }
md5_in() { in_ctr "$1" sh -c 'md5sum < "$1"' _ "$2" | cut -d' ' -f1; }
# target T of pod UID for volume NAME, as the kubelet lays it out
target_of() { echo "$KDIR/pods/$1/volumes/kubernetes.io~csi/$2/mount"; }
vol_id() { echo "csi-$(sha "$1$2")"; }
mounted() { awk -v m="$1" '$5 == m {f=1} END {exit !f}' /proc/self/mountinfo; }

# ------------------------------------------------------------------------------------------------
t_image() {
  setup
  local t0=$SECONDS
  ensure_image "$IMG"
  local size; size=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMG")
  log "  $IMG: $((size / 1000000)) MB, built (or found) in $((SECONDS - t0)) s"
  check "the image exists" [ "$size" -gt 0 ]
  local out
  out=$("${PODMAN[@]}" run --rm --label "$LABEL" "${LIMITS[@]}" "$IMG" --version 2>&1) || true
  check "chargefs-csi runs in it: $out" grep -q "^chargefs-csi .*csi.chargefs.io" <<<"$out"
  out=$("${PODMAN[@]}" run --rm --label "$LABEL" "${LIMITS[@]}" --entrypoint /usr/local/lib/chargefs/daemon/chargefsd "$IMG" \
    --library-path /usr/local/lib/chargefs/daemon/lib /usr/local/lib/chargefs/daemon/lib/chargefsd --version 2>&1) || true
  check "the daemon bundle runs through its own loader: $out" grep -q "^chargefsd " <<<"$out"
  out=$("${PODMAN[@]}" run --rm --label "$LABEL" "${LIMITS[@]}" --entrypoint /bin/sh "$IMG" -c \
    'for c in nsenter fusermount3 getfattr; do command -v $c; done; ls /usr/local/lib/chargefs/daemon/lib' 2>&1) || true
  log "    $(tr '\n' ' ' <<<"$out")"
  check "nsenter, fusermount3, getfattr in it, libfuse3 in the bundle" \
    bash -c 'grep -q /nsenter <<<"$1" && grep -q /fusermount3 <<<"$1" && grep -q /getfattr <<<"$1" && grep -q libfuse3.so <<<"$1"' _ "$out"
}

# open_volume UID LIMIT SIZE: the pod's cgroup and its published volume; sets CG, T and V.
CG= T= V=
open_volume() {
  CG=$(new_pod "$1" "$2"); T=$(target_of "$1" scratch); V=$(vol_id "$1" scratch)
  mkdir -p "$(dirname "$T")"
  local out; out=$(csi publish "$V" "$T" "$1" size="$3") || true
  check "publish the volume of pod $1 ($3): $out" [ "$out" = OK ]
}
# Common to both scenarios: pod 1 (two containers) and pod 2 (one), their volumes published.
P1= P2= UID1= UID2= T1= T2= V1= V2= C1= C2= C3=
start_pod1() {
  UID1=$(uuid); open_volume "$UID1" $((64 * MiB)) 1Gi; P1=$CG T1=$T V1=$V
  C1=ctest-$$-p1c1; C2=ctest-$$-p1c2
  pod_container "$C1" "$UID1" 65534 "$T1"
  pod_container "$C2" "$UID1" 1000 "$T1"
  check "pod 1's containers sit in its cgroup (cgroupfs layout)" \
    bash -c '[ "$(dirname "$1")/$(dirname "$2")" = "$3/$3" ]' _ "$(ctr_cgroup "$C1")" "$(ctr_cgroup "$C2")" "$P1"
}
start_pod2() {
  UID2=$(uuid); open_volume "$UID2" $((32 * MiB)) 16Mi; P2=$CG T2=$T V2=$V
  C3=ctest-$$-p2c1
  pod_container "$C3" "$UID2" 65534 "$T2"
}

t_pods() {
  plugin_up
  local PL=$PLUGIN
  log "  plugin: podman run $(tr '\n' ' ' < "$SCR/plugin-args" | sed "s#$KDIR#KDIR#g")"
  check "the plugin runs privileged with host PID, from the manifest" \
    bash -c 'grep -qx -- --privileged "$1" && grep -qx -- --pid=host "$1"' _ "$SCR/plugin-args"
  check "the kubelet dir is rshared, /dev/fuse and /sys/fs/cgroup are there" \
    bash -c 'grep -q "^$2:$2:rshared$" "$1" && grep -q "^/dev/fuse:/dev/fuse:" "$1" && grep -q "^/sys/fs/cgroup:/sys/fs/cgroup:" "$1"' _ "$SCR/plugin-args" "$KDIR"
  # (and mounts with -o takeover from its bundle: no "volumes are mounted without" WARNING)
  check "the plugin sees the host's cgroup tree, and can keep its volumes (no WARNING)" bash -c '! grep -q WARNING <<<"$1"' _ "$(plugin_log "$PL")"
  check "it starts daemons in the host's mount namespace" grep -q "in the mount namespace of pid" <<<"$(plugin_log "$PL")"

  start_pod1
  local base1 shm1; base1=$(volume_usage "$P1"); shm1=$(cg_shmem "$P1")
  in_ctr "$C1" sh -c 'head -c 8388608 /dev/urandom > /data/from-c1'
  in_ctr "$C2" sh -c 'head -c 8388608 /dev/urandom > /data/from-c2'
  local sum1 sum2; sum1=$(md5sum < "$T1/from-c1" | cut -d' ' -f1); sum2=$(md5sum < "$T1/from-c2" | cut -d' ' -f1)
  check "container 2 (uid 1000) reads what container 1 (uid 65534) wrote" [ "$(md5_in "$C2" /data/from-c1)" = "$sum1" ]
  check "files owned by their writers" [ "$(stat -c %u "$T1/from-c1")/$(stat -c %u "$T1/from-c2")" = 65534/1000 ]
  local rise c1u c2u mon shr; rise=$(( $(volume_usage "$P1") - base1 )); c1u=$(cg_usage "$(ctr_cgroup "$C1")"); c2u=$(cg_usage "$(ctr_cgroup "$C2")")
  mon=$(runtime_usage "$P1"); shr=$(( $(cg_shmem "$P1") - shm1 ))
  log "  pod 1 rose $(fmt_mib "$rise") for 16 MiB written (shmem $(fmt_mib "$shr")), its containers' and podman's cgroups aside; those hold $(fmt_mib "$c1u"), $(fmt_mib "$c2u") and $(fmt_mib "$mon")"
  log "    pod 1's own memory.stat: $(awk '$1 ~ /^(cache|rss|shmem|mapped_file|inactive_file|active_file)$/ {printf "%s=%.2fMiB ", $1, $2 / 1048576}' "$P1/memory.stat")"
  local leaf; for leaf in "$P1"/chargefs-*/; do log "    its charge leaf $(basename "$leaf"): $(fmt_mib "$(cg_usage "$leaf")"), $(awk '$1 ~ /^total_(cache|rss|shmem)$/ {printf "%s=%.2fMiB ", $1, $2 / 1048576}' "$leaf/memory.stat")"; done
  check "pod 1 charged the 16 MiB, outside its containers' cgroups (within 1.5 MiB)" near "$rise" $((16 * MiB)) $((3 * MiB / 2))
  check "as shmem in the pod's memory.stat (16 MiB within 1.5 MiB)" near "$shr" $((16 * MiB)) $((3 * MiB / 2))
  check "each container holds < 2 MiB (their processes, not the data)" bash -c '[ "$1" -lt 2097152 ] && [ "$2" -lt 2097152 ]' _ "$c1u" "$c2u"

  local rc=0 ddout
  ddout=$(in_ctr "$C1" dd if=/dev/zero of=/data/fill bs=1M 2>&1) || rc=$?
  log "  fill: exit $rc, $(grep -o 'No space left on device' <<<"$ddout" | head -n1), pod 1 at $(fmt_mib "$(cg_usage "$P1")") of 64 MiB"
  check "the fill ends in ENOSPC, the writer not killed (exit $rc)" bash -c '[ "$1" = 1 ] && grep -q "No space left on device" <<<"$2"' _ "$rc" "$ddout"
  check "0 OOM kills in pod 1" [ "$(cg_oom_kills "$P1")" = 0 ]
  # from the node: a full pod has no room left for runc to start an exec in it
  rm "$T1/fill"

  "${PODMAN[@]}" restart -t 0 "$C1" >/dev/null
  check "podman restart of container 1: the data is still there" [ "$(md5_in "$C1" /data/from-c2)" = "$sum2" ]
  check "  and it writes again" in_ctr "$C1" sh -c 'echo again > /data/again'
  # The daemon on the host runs from the bundle, through its loader; its keeper restarts it by
  # the same command line (docs/takeover.md).
  local status1 server1 status2
  status1=$(getfattr --only-values -n user.chargefs.status "$T1" 2>/dev/null || true)
  server1=$(sed -n 's/.*\bpid=\([0-9]*\).*/\1/p' <<<"$status1")
  log "  pod 1's volume: $status1"
  check "pod 1's volume is kept (status names its server and keeper)" bash -c '[ -n "$1" ] && grep -q "keeper=[0-9]" <<<"$2"' _ "$server1" "$status1"
  [ -n "$server1" ] && kill -9 "$server1"
  check "kill -9 of its server: container 2 still reads container 1's file" [ "$(md5_in "$C2" /data/from-c1)" = "$sum1" ]
  status2=$(getfattr --only-values -n user.chargefs.status "$T1" 2>/dev/null || true)
  log "  after the kill: $status2"
  check "  a successor serves it, from the bundle (takeovers=1)" bash -c 'grep -q "takeovers=1" <<<"$1" && ! grep -q "pid=$2 " <<<"$1 "' _ "$status2" "$server1"

  start_pod2
  local base2 before1; base2=$(volume_usage "$P2"); before1=$(volume_usage "$P1")
  in_ctr "$C3" sh -c 'head -c 4194304 /dev/urandom > /data/p2'
  local rise2 c3u d1; rise2=$(( $(volume_usage "$P2") - base2 )); c3u=$(cg_usage "$(ctr_cgroup "$C3")"); d1=$(( $(volume_usage "$P1") - before1 ))
  log "  pod 2 rose $(fmt_mib "$rise2") for 4 MiB outside its container's cgroup (which holds $(fmt_mib "$c3u")); pod 1 moved $(fmt_mib "$d1")"
  check "pod 2 charged its 4 MiB (within 1.5 MiB)" near "$rise2" $((4 * MiB)) $((3 * MiB / 2))
  check "pod 1 not charged for it (< 0.5 MiB)" le "$d1" $((MiB / 2))

  # the kubelet stops the pods' containers before it unpublishes
  "${PODMAN[@]}" rm -f -t 0 "$C1" "$C2" "$C3" >/dev/null
  local out
  out=$(csi unpublish "$V1" "$T1") || true; check "unpublish pod 1's volume: $out" [ "$out" = OK ]
  out=$(csi unpublish "$V2" "$T2") || true; check "unpublish pod 2's volume: $out" [ "$out" = OK ]
  local i e1 e2
  for ((i = 0; i < 30; i++)); do
    e1=$(cg_usage "$P1"); e2=$(cg_usage "$P2")
    le "$e1" $((1 * MiB)) && le "$e2" $((1 * MiB)) && break; sleep 0.1
  done
  log "  after unpublish: pod 1 $(fmt_mib "$e1"), pod 2 $(fmt_mib "$e2") (no container left in them)"
  check "the pods' charges went back (< 1 MiB each)" bash -c '[ "$1" -le 1048576 ] && [ "$2" -le 1048576 ]' _ "$e1" "$e2"
  check "no OOM kill in either pod" [ "$(cg_oom_kills "$P1")/$(cg_oom_kills "$P2")" = 0/0 ]
  check "nothing mounted below the kubelet dir" bash -c '! awk -v d="$1/" "index(\$5, d) == 1" /proc/self/mountinfo | grep -q .' _ "$KDIR"
  check "target dirs removed" bash -c '[ ! -e "$1" ] && [ ! -e "$2" ]' _ "$T1" "$T2"
  for ((i = 0; i < 50; i++)); do [ -z "$(cfs_daemons_below "$KDIR")$(keepers_below "$KDIR")" ] && break; sleep 0.1; done
  check "no chargefsd or keeper left running" [ -z "$(cfs_daemons_below "$KDIR")$(keepers_below "$KDIR")" ]
  "${PODMAN[@]}" stop -t 5 "$PL" >/dev/null
  log "  plugin log:"; plugin_log "$PL" | grep -E "publish|chargefsd=" | sed 's/^/    | /' >&2
}

# in_cgroups_of PID CONTAINER_PID: the v1/v2 hierarchies on which PID shares a cgroup with the
# container's process (none for a daemon that left them all).
shared_cgroups() {
  join -t: -j1 <(awk -F: '$3 != "/" {print $2 ":" $3}' "/proc/$1/cgroup" | sort) \
               <(awk -F: '$3 != "/" {print $2 ":" $3}' "/proc/$2/cgroup" | sort) 2>/dev/null \
    | awk -F: '$2 == $3 {print ($1 == "" ? "v2" : $1)}' | tr '\n' ' '
}

t_upgrade() {
  plugin_up
  local PL=$PLUGIN
  start_pod1
  start_pod2
  in_ctr "$C1" sh -c 'head -c 8388608 /dev/urandom > /data/a'
  in_ctr "$C3" sh -c 'head -c 4194304 /dev/urandom > /data/b'
  local sa sb; sa=$(md5sum < "$T1/a" | cut -d' ' -f1); sb=$(md5sum < "$T2/b" | cut -d' ' -f1)
  local d1 d2 ppid; d1=$(cfs_daemons_below "$(dirname "$T1")"); d2=$(cfs_daemons_below "$(dirname "$T2")")
  ppid=$("${PODMAN[@]}" inspect -f '{{.State.Pid}}' "$PL")
  log "  daemons $d1 and $d2; plugin pid $ppid; daemon 1: $(tr '\n' ' ' < "/proc/$d1/cgroup")"
  check "one daemon per volume" bash -c '[ -n "$1" ] && [ -n "$2" ] && [ "$1" != "$2" ] && [ "$(wc -w <<<"$1 $2")" = 2 ]' _ "$d1" "$d2"
  check "daemon shares no cgroup with the plugin's container, on any hierarchy (shared: '$(shared_cgroups "$d1" "$ppid")')" \
    [ -z "$(shared_cgroups "$d1" "$ppid")" ]
  check "daemon runs in the host's mount namespace, not the container's" \
    bash -c '[ "$(readlink /proc/$1/ns/mnt)" = "$(readlink /proc/self/ns/mnt)" ] && [ "$(readlink /proc/$1/ns/mnt)" != "$(readlink /proc/$2/ns/mnt)" ]' _ "$d1" "$ppid"
  check "daemon's root is the host's, its program on the host's disk ($(readlink "/proc/$d1/exe"))" \
    bash -c '[ "$(readlink /proc/$1/root)" = / ] && [[ "$(readlink /proc/$1/exe)" == "$2"/daemon/*/chargefsd ]]' _ "$d1" "$PDIR"

  # what a DaemonSet rollout does: stop, remove, start the same image
  local t0=$SECONDS
  "${PODMAN[@]}" stop -t 10 "$PL" >/dev/null; "${PODMAN[@]}" rm "$PL" >/dev/null
  log "  podman stop + rm of the plugin: $((SECONDS - t0)) s"
  check "after stop and rm: both daemons alive" bash -c 'kill -0 "$1" && kill -0 "$2"' _ "$d1" "$d2"
  check "both volumes still mounted on the host" bash -c 'grep -q "fuse.chargefsd" <<<"$(awk -v a="$1" -v b="$2" "\$5 == a || \$5 == b" /proc/self/mountinfo)" && [ "$(awk -v a="$1" -v b="$2" "\$5 == a || \$5 == b" /proc/self/mountinfo | wc -l)" = 2 ]' _ "$T1" "$T2"
  check "pod 1's containers read their data" bash -c '[ "$1" = "$3" ] && [ "$2" = "$3" ]' _ "$(md5_in "$C1" /data/a)" "$(md5_in "$C2" /data/a)" "$sa"
  check "pod 2's container reads its data" [ "$(md5_in "$C3" /data/b)" = "$sb" ]
  check "and writes" in_ctr "$C2" sh -c 'echo x > /data/while-no-plugin'
  run_plugin "$PL" "$IMG"
  check "the new plugin found both volumes mounted" [ "$(plugin_log "$PL" | grep -c "^chargefs-csi: state: volume=.* still mounted")" = 2 ]
  local out; out=$(csi stats "$V1" "$T1") || true
  check "  and serves their stats" grep -q '"bytes"' <<<"$out"

  # an upgrade: the next build's image
  t0=$SECONDS
  ensure_image "$IMG_NEXT" "chargefs next build $RUN_ID"
  "${PODMAN[@]}" stop -t 10 "$PL" >/dev/null; "${PODMAN[@]}" rm "$PL" >/dev/null
  run_plugin "$PL" "$IMG_NEXT"
  log "  upgrade (build, stop, rm, run): $((SECONDS - t0)) s"
  check "after the upgrade: the old daemons still serve, data intact" \
    bash -c 'kill -0 "$1" && kill -0 "$2" && [ "$3" = "$5" ] && [ "$4" = "$6" ]' _ "$d1" "$d2" "$(md5_in "$C2" /data/a)" "$(md5_in "$C3" /data/b)" "$sa" "$sb"
  check "the upgraded plugin found both volumes" [ "$(plugin_log "$PL" | grep -c "^chargefs-csi: state: volume=.* still mounted")" = 2 ]
  # a pod started after the upgrade gets the new build's daemon, from its own copy on the host
  local T3 V3 d3
  open_volume "$(uuid)" $((32 * MiB)) 8Mi; T3=$T V3=$V
  d3=$(cfs_daemons_below "$(dirname "$T3")")
  log "  old daemon runs $(readlink "/proc/$d1/exe"), new $(readlink "/proc/$d3/exe")"
  check "the new volume runs the new build's daemon, the old ones keep theirs" \
    bash -c '[ -n "$2" ] && [ "$(readlink /proc/$1/exe)" != "$(readlink /proc/$2/exe)" ]' _ "$d1" "$d3"

  # a daemon that goes (here: SIGTERM, which makes it unmount itself as libfuse does) leaves a
  # directory nothing can be written into, not a plain directory on the node's disk
  kill -TERM "$d2"
  local i; for ((i = 0; i < 50; i++)); do mounted "$T2" || break; sleep 0.1; done
  check "daemon 2 gone, its mount with it" bash -c '! mounted() { awk -v m="$1" "\$5 == m {f=1} END {exit !f}" /proc/self/mountinfo; }; ! mounted "$1"' _ "$T2"
  "${PODMAN[@]}" restart -t 0 "$C3" >/dev/null
  out=$(in_ctr "$C3" sh -c 'echo lost > /data/new; echo rc=$?' 2>&1) || true
  log "  pod 2's restarted container (uid 65534) writes to the bare target: $(tr '\n' ' ' <<<"$out")"
  local out0; out0=$("${PODMAN[@]}" exec --user 0 "$C3" sh -c 'echo lost > /data/new; echo rc=$?' 2>&1) || true
  log "  as root: $(tr '\n' ' ' <<<"$out0")"
  check "the writes fail (root too: EPERM, the directory is immutable), nothing lands on the node's disk" \
    bash -c 'grep -q "rc=2" <<<"$1" && grep -q "Operation not permitted" <<<"$2" && [ -z "$(ls -A "$3")" ]' _ "$out" "$out0" "$T2"

  "${PODMAN[@]}" rm -f -t 0 "$C1" "$C2" "$C3" >/dev/null
  for v in "$V1:$T1" "$V2:$T2" "$V3:$T3"; do
    out=$(csi unpublish "${v%%:*}" "${v#*:}") || true
    check "the upgraded plugin unpublishes ${v%%:*}: $out" [ "$out" = OK ]
  done
  check "nothing mounted below the kubelet dir" bash -c '! awk -v d="$1/pods/" "index(\$5, d) == 1" /proc/self/mountinfo | grep -q .' _ "$KDIR"
  check "target dirs removed" bash -c '[ ! -e "$1" ] && [ ! -e "$2" ] && [ ! -e "$3" ]' _ "$T1" "$T2" "$T3"
  for ((i = 0; i < 50; i++)); do [ -z "$(cfs_daemons_below "$KDIR")$(keepers_below "$KDIR")" ] && break; sleep 0.1; done
  check "no chargefsd or keeper left running" [ -z "$(cfs_daemons_below "$KDIR")$(keepers_below "$KDIR")" ]
  check "no OOM kill in any pod" [ "$(cg_oom_kills "$P1")/$(cg_oom_kills "$P2")" = 0/0 ]
  "${PODMAN[@]}" stop -t 5 "$PL" >/dev/null
  log "  plugin log:"; plugin_log "$PL" | grep -E "publish|state:|chargefsd=" | sed 's/^/    | /' >&2
}

# The group: one image build per run, removed at the end.
t_sanity() {
  if [ -z "${CSI_SANITY:-}" ] || [ ! -x "$CSI_SANITY" ]; then
    log "  cannot run: CSI_SANITY names no csi-sanity binary (build it outside the repository)"; return 1
  fi
  plugin_up
  local uid; uid=$(uuid); new_pod "$uid" $((64 * MiB)) >/dev/null
  printf 'csi.storage.k8s.io/ephemeral: "true"\ncsi.storage.k8s.io/pod.uid: "%s"\nsize: 16Mi\n' "$uid" >"$SCR/params.yaml"
  mkdir -p "$KDIR/sanity"
  local out rc=0
  out=$(timeout 300 "$CSI_SANITY" --csi.endpoint "unix://$SOCK" --csi.mountdir "$KDIR/sanity/mount" \
        --csi.stagingdir "$KDIR/sanity/staging" --csi.testvolumeparameters "$SCR/params.yaml" \
        --ginkgo.skip 'Controller Server' --ginkgo.no-color 2>&1) || rc=$?
  { grep -E "rpc error" <<<"$out" || true; } | sort | uniq -c | sed 's/^/    rpc: /' >&2
  { grep -E '^(Ran |FAIL|PASS|SUCCESS)|\[FAIL\]|\[Fail\]' <<<"$out" || true; } | sed 's/^/    | /' >&2
  local ran failed
  ran=$(sed -n 's/^Ran \([0-9]*\) of.*/\1/p' <<<"$out" | tail -n1)
  failed=$(sed -n 's/.* \([0-9]*\) Failed.*/\1/p' <<<"$out" | tail -n1)
  log "  csi-sanity exit $rc: ran ${ran:-?}, failed ${failed:-?}"
  check "csi-sanity ran specs against the containerized plugin" [ "${ran:-0}" -gt 0 ]
  # the plugin serves every Node RPC: a spec can fail here only on a controller RPC it calls first
  # (CreateVolume: the two node specs that make their own volume)
  check "every failing spec failed on an RPC this node-only driver does not serve (Unimplemented)" \
    [ "$(grep -c 'rpc error: code = Unimplemented' <<<"$out")" = "${failed:-0}" ]
}

if [ "${1:-}" = --one ] || [ "${1:-}" = --list ]; then test_main "container tests" 420 "$@"; fi
if [ "$(id -u)" != 0 ]; then echo "container tests need root"; echo "0 passed, 1 failed"; exit 1; fi
why=$(missing)
if [ -n "$why" ]; then echo "cannot run: $why"; echo "0 passed, 1 failed"; exit 1; fi
log "chargefs container tests: podman $(podman --version | awk '{print $3}'), runc $(runc --version | awk 'NR == 1 {print $3}'), binaries from $(dirname "$(cfs_daemon_bin)")"
sel=("${TESTS[@]}"); [ $# = 0 ] || sel=("$@")
rc=0
run_tests "$SELF" "${CFS_CONTAINERS_TIMEOUT:-420}" "${sel[@]}" || rc=$?
remove_images
exit "$rc"
