#!/bin/sh
# Lays chargefsd out to run on the node itself, outside the image: the plugin copies this folder
# to the host's disk and starts every daemon there, in the host's mount namespace, so that a
# daemon outlives the plugin's container (its root filesystem, its mount namespace). It brings
# its own libraries: the host may have no libfuse3, or another glibc.
#   DIR/chargefsd               the image's dynamic loader, under the daemon's name (so that ps,
#                               pgrep and /proc/PID/comm say chargefsd), run as
#                               DIR/chargefsd --library-path DIR/lib DIR/lib/chargefsd ARGS...
#   DIR/lib/chargefsd           the daemon, and every library it links (as ldd lists them)
#   DIR/chargefs-charge-helper  static; chargefsd finds it next to /proc/self/exe
#   DIR/chargefs-keeper         static, the same (-o takeover); it restarts a server by the same
#                               loader command line
# Usage (in the image build): bundle-daemon.sh [CHARGEFSD [HELPER [DIR [KEEPER]]]]
set -eu
daemon=${1:-/usr/local/bin/chargefsd}
helper=${2:-/usr/local/bin/chargefs-charge-helper}
out=${3:-/usr/local/lib/chargefs/daemon}
keeper=${4:-$(dirname "$helper")/chargefs-keeper}
rm -rf "$out"
mkdir -p "$out/lib"
cp "$daemon" "$out/lib/chargefsd"
cp "$helper" "$out/chargefs-charge-helper"
cp "$keeper" "$out/chargefs-keeper"
# "libfuse3.so.3 => /lib/x86_64-linux-gnu/libfuse3.so.3 (0x...)": a library;
# "/lib64/ld-linux-x86-64.so.2 (0x...)": the loader.
libs=$(ldd "$daemon" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
loader=$(ldd "$daemon" | awk '$1 ~ /^\// && $2 ~ /^\(/ {print $1}')
[ -n "$loader" ] || { echo "bundle-daemon.sh: no dynamic loader in ldd $daemon" >&2; exit 1; }
for l in $libs; do cp -L "$l" "$out/lib/"; done
cp -L "$loader" "$out/chargefsd"
chmod 755 "$out/chargefsd" "$out/lib/chargefsd" "$out/chargefs-charge-helper" "$out/chargefs-keeper"
# it runs from the bundle alone
"$out/chargefsd" --library-path "$out/lib" "$out/lib/chargefsd" --version
