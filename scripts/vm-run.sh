#!/usr/bin/env bash
# Runs a command inside a guest kernel with cgroup v2 and its memory controller, for the tests this
# hybrid-cgroup host cannot run (../shared/notes/vm.md). Two guests, one interface:
#   uml   User-Mode Linux (Debian's linux.uml, 6.1): about 2 s a boot. Aborts on CPUs with AMX.
#   qemu  QEMU without KVM (TCG) booting Debian 12's own 6.1 kernel, with 9p shares: slower, but
#         boots on every CPU, and its kernel is a distribution kernel rather than UML's.
# Usage: scripts/vm-run.sh [--timeout SECS] [--vm uml|qemu] -- COMMAND...
#        scripts/vm-run.sh --which        prints the guest that would run (probing if needed)
#        scripts/vm-run.sh --prepare      installs/fetches what the chosen guest needs
# The guest is CHARGEFS_VM (uml|qemu) when set, else UML where a probe boot succeeds, else QEMU.
# The probe's answer is cached per host boot in .build-vm/ (a CPU cannot change under a boot;
# CHARGEFS_VM_CACHE=DIR keeps it elsewhere).
#
# The guest's root is this host's / (read-only), so binaries and paths stay valid. Inside: proc,
# sys, devtmpfs, fuse, tmpfs on /tmp /run /dev/shm, cgroup2 on /sys/fs/cgroup with +memory in the
# root's subtree_control; COMMAND runs as root with cwd = the repository and a minimal
# environment: PATH, HOME=/tmp, CHARGEFS_VM_KIND=uml|qemu, and this host's CHARGEFS*, CFS_* and
# SWIFT_SCRATCH variables (pass others with `env NAME=VALUE ...`). Its output goes to our stdout
# (the guest console); we exit with its status, 124 when the guest ran out of time, 125 when it
# died without reporting one (a guest that dies after reporting keeps the reported status).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=$repo/.build-vm                          # kernels, initramfs, run folders
probes=${CHARGEFS_VM_CACHE:-$cache}             # the probe's answers (tests point it elsewhere)
timeout=600 vm=${CHARGEFS_VM:-} action=run
usage() { echo "usage: $0 [--timeout SECS] [--vm uml|qemu] -- COMMAND... | --which | --prepare" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
    --vm) vm=${2:?--vm needs uml or qemu}; shift 2 ;;
    --which) action=which; shift ;;
    --prepare) action=prepare; shift ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ "$action" != run ] || [ $# -gt 0 ] || usage
case $vm in ''|uml|qemu) ;; *) echo "vm-run: CHARGEFS_VM/--vm must be uml or qemu, not '$vm'" >&2; exit 2 ;; esac
mkdir -p "$cache" "$probes"

die() { echo "vm-run: $*" >&2; exit 125; }
apt_install() {
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return 0
  echo "vm-run: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

# ---- the guest's init: the same for both guests but for how writable host folders are reached.
# write_init FILE MOUNT_CMD_PREFIX: MOUNT_CMD_PREFIX DIR mounts host folder DIR at DIR read-write.
work=
write_cmd() {
  {
    # Forward the test-suite knobs (the guest gets no environment of its own).
    while IFS= read -r name; do
      printf 'export %s=%q\n' "$name" "${!name}"
    done < <(compgen -e | grep -E '^(CHARGEFS|CFS_|SWIFT_SCRATCH$)' | grep -vx 'CHARGEFS_VM' || true)
    printf '%q ' "$@"
    echo
  } >"$work/cmd"
}
write_init() {
  local kind=$1 pre=$2 hostmount=$3
  cat >"$work/init" <<EOF
#!/bin/bash
# PID 1 of the guest. Whatever happens, write a status and power off (an init that exits panics).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8
export CHARGEFS_VM_KIND=$kind
work=$work
hostmount() { mkdir -p "\$1" && $hostmount; }
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
$pre
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
# A repository under one of those (a CI clone in /tmp) would now be hidden: bring it back.
case $repo/ in /tmp/*|/run/*|/dev/shm/*) hostmount $repo repo ;; esac
hostmount \$work work
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
echo +memory >/sys/fs/cgroup/cgroup.subtree_control
cd $repo && bash \$work/cmd </dev/null >/dev/console 2>&1
echo \$? >\$work/rc
sync
/usr/bin/busybox poweroff -f
EOF
  chmod +x "$work/init"
}

# ---- User-Mode Linux
uml_paths() {
  uml=$(command -v linux.uml || true)
  [ -n "$uml" ] || return 1
  command -v busybox >/dev/null || return 1
  local kver; kver=$("$uml" --version 2>/dev/null | head -n1)
  fuse_ko=${CHARGEFS_UML_MODULES:-/usr/lib/uml/modules}/$kver/kernel/fs/fuse/fuse.ko
  [ -f "$fuse_ko" ]
}
uml_boot() { # uml_boot SECS: boots $work/init, console to stdout
  # timeout signals its whole process group, so UML's host-side helper processes go as well.
  TMPDIR=/dev/shm timeout -k 5 "$1" "$uml" mem=1G root=/dev/root rootfstype=hostfs rootflags=/ ro \
    con=null con0=null,fd:1 loglevel=1 init="$work/init" </dev/null 2>"$work/vm.log"
}
uml_setup() {
  uml_paths || die "User-Mode Linux is not installed (scripts/setup.sh installs user-mode-linux, busybox-static)"
  # fuse.ko before anything is mounted over /tmp (notes/vm.md); /dev/fuse then appears in devtmpfs.
  write_init uml "/usr/bin/busybox insmod $fuse_ko || echo 'vm-run: insmod fuse.ko failed' >/dev/console" \
    'mount -t hostfs -o "$1" none "$1"'
}

# ---- QEMU (TCG) with Debian 12's kernel
# The kernel comes by `apt-get download` + `dpkg-deb -x` (installing linux-image-amd64 would pull
# in udev and upgrade systemd); its uncompressed vmlinux boots through the PVH entry in ~0.5 s where
# the compressed bzImage spends seconds decompressing under TCG. The initramfs is busybox plus the
# modules that reach the host's / over 9p and fuse.ko; it switches root to the host's / (9p, ro).
qemu_modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio
              netfs fscache 9p fuse)
qemu_prepare() {
  apt_install qemu-system-x86 busybox-static cpio xz-utils
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || die "cannot tell which Debian kernel linux-image-amd64 is (apt-cache depends)"
  kdir=$cache/$pkg
  [ -s "$kdir/vmlinux" ] && [ -s "$kdir/initramfs.cpio" ] && return 0
  echo "vm-run: preparing $pkg for QEMU in $kdir" >&2
  local tmp; tmp=$(mktemp -d "$cache/prep.XXXXXX")
  ( cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1 ) || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
  dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x"
  local kver=${pkg#linux-image-} vmlinuz off
  vmlinuz=$tmp/x/boot/vmlinuz-$kver
  # Debian compresses its kernel with xz: the payload starts at xz's magic.
  off=$(grep -abo $'\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1)
  [ -n "$off" ] || { rm -rf "$tmp"; die "no xz payload in $vmlinuz"; }
  tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream >"$tmp/vmlinux" 2>/dev/null || true
  [ "$(head -c 4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || { rm -rf "$tmp"; die "could not unpack $vmlinuz"; }
  local root=$tmp/initramfs m f
  mkdir -p "$root"/{bin,dev,proc,sys,newroot,modules}
  cp /usr/bin/busybox "$root/bin/busybox"
  for m in "${qemu_modules[@]}"; do
    f=$(find "$tmp/x/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)
    [ -n "$f" ] || { rm -rf "$tmp"; die "module $m missing from $pkg"; }
    case $f in *.xz) xz -dc "$f" >"$root/modules/$m.ko" ;; *) cp "$f" "$root/modules/$m.ko" ;; esac
  done
  cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t proc proc /proc
for m in ${qemu_modules[*]}; do /bin/busybox insmod /modules/\$m.ko || echo "initramfs: insmod \$m failed" >/dev/console; done
# the host's / over 9p, read-only; the page cache may keep it (nothing changes it during a run)
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /newroot ||
  { echo "initramfs: cannot mount the host's / over 9p" >/dev/console; /bin/busybox poweroff -f; }
init=\$(/bin/busybox sed -n 's/.*vm.init=\([^ ]*\).*/\1/p' /proc/cmdline)
/bin/busybox umount /proc /dev
exec /bin/busybox switch_root /newroot "\$init"
EOF
  chmod +x "$root/init"
  ( cd "$root" && find . | cpio -o -H newc --quiet ) >"$tmp/initramfs.cpio"
  mkdir -p "$kdir"
  mv "$tmp/vmlinux" "$tmp/initramfs.cpio" "$kdir/"
  rm -rf "$tmp"
}
qemu_boot() { # qemu_boot SECS
  local shares=(-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
                -virtfs "local,path=$work,mount_tag=work,security_model=none")
  case $repo/ in /tmp/*|/run/*|/dev/shm/*) shares+=(-virtfs "local,path=$repo,mount_tag=repo,security_model=none,readonly=on") ;; esac
  # 2 vCPUs on TCG's threads, 2 GiB (CHARGEFS_VM_MEM, MiB); a panic or a reboot ends QEMU
  # (-no-reboot, panic=-1).
  timeout -k 5 "$1" qemu-system-x86_64 -machine pc -cpu max -accel tcg,thread=multi -smp 2 -m "${CHARGEFS_VM_MEM:-2048}" \
    -nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot \
    -kernel "$kdir/vmlinux" -initrd "$kdir/initramfs.cpio" "${shares[@]}" \
    -append "console=ttyS0 loglevel=1 quiet panic=-1 vm.init=$work/init" </dev/null 2>"$work/vm.log"
}
qemu_setup() {
  qemu_prepare
  # 9p mount tags: the work folder is "work", a repository under /tmp is "repo".
  write_init qemu : 'mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none "$2" "$1"'
}

# ---- choosing the guest: a probe boot of UML, cached per host boot
probe_uml() {
  local boot; boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
  local answer=$probes/probe-$boot
  if [ -s "$answer" ]; then cat "$answer"; return; fi
  local kind=qemu
  if uml_paths; then
    work=$(mktemp -d "$cache/probe.XXXXXX")
    write_cmd true
    uml_setup
    if uml_boot 20 >/dev/null 2>&1 || true; [ "$(cat "$work/rc" 2>/dev/null)" = 0 ]; then kind=uml; fi
    rm -rf "$work"; work=
  fi
  echo "$kind" >"$answer"
  echo "$kind"
}
[ -n "$vm" ] || vm=$(probe_uml)

case $action in
  which) echo "$vm"; exit 0 ;;
  prepare) if [ "$vm" = qemu ]; then qemu_prepare; else uml_paths || die "User-Mode Linux is not installed"; fi; exit 0 ;;
esac

# A writable host folder the guest mounts to hand back the exit status. Its path goes on the
# kernel command line, so no spaces.
work=$(mktemp -d "$cache/run.XXXXXX")
case $work in *[[:space:]]*) rm -rf "$work"; die "scratch path has spaces: $work" ;; esac
trap 'rm -rf "$work"' EXIT
write_cmd "$@"
"${vm}_setup"
rc=0
"${vm}_boot" "$timeout" || rc=$?
if [ -s "$work/rc" ]; then
  exit "$(cat "$work/rc")"
fi
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "vm-run: the $vm guest did not finish within $timeout s" >&2
  exit 124
fi
echo "vm-run: the $vm guest ended (status $rc) without reporting the command's status; its log:" >&2
tail -n 20 "$work/vm.log" >&2
exit 125
