#!/usr/bin/env bash
# Runs an existing xfstests build against Cairn.
#
#   xfstests/run.sh <xfstests-dir> [check arguments]     (default arguments: -g quick)
#
# Starts two local Cairn clusters (a test and a scratch volume, each with its own metadata
# server and chunk server on 127.0.0.1), points mount(8)'s `fuse.cairn` helper at the built
# client, writes xfstests' local.config, runs ./check with the exclusion list next to this
# script, and stops everything afterwards, even on failure or Ctrl-C. Results stay in the work
# directory it prints. Needs root and `cargo build --release` (or CAIRN_BIN_DIR).
set -euo pipefail

if [ $# -lt 1 ] || [ ! -x "$1/check" ]; then
    echo "usage: $0 <xfstests-dir> [check arguments]  (the directory of a built xfstests, with ./check)" >&2
    exit 2
fi
XFSTESTS=$(cd "$1" && pwd)
shift
[ $# -gt 0 ] || set -- -g quick
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BIN=${CAIRN_BIN_DIR:-$ROOT/target/release}
for b in cairn cairn-mount; do
    [ -x "$BIN/$b" ] || { echo "$0: $BIN/$b missing: run cargo build --release (or set CAIRN_BIN_DIR)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "$0: xfstests must run as root" >&2; exit 2; }

WORK=${CAIRN_XFSTESTS_WORK:-$(mktemp -d /tmp/cairn-xfstests.XXXXXX)}
# Tests run commands as the fsgqa users, who must reach TEST_DIR (mktemp -d makes it 0700).
chmod 755 "$WORK"
mkdir -p "$WORK/test" "$WORK/scratch" "$WORK/results"
HELPERS=(/sbin/mount.cairn /sbin/mount.fuse.cairn)
declare -A SAVED=()

cleanup() {
    set +e
    for m in "$WORK/test" "$WORK/scratch"; do
        grep -q " $m fuse" /proc/mounts && umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
    for v in test scratch; do
        [ -d "$WORK/data-$v" ] && "$BIN/cairn" local down "$WORK/up-$v" --data "$WORK/data-$v" >/dev/null 2>&1
    done
    for h in "${HELPERS[@]}"; do
        rm -f "$h"
        [ -n "${SAVED[$h]:-}" ] && ln -s "${SAVED[$h]}" "$h"
    done
    echo "xfstests results: $WORK/results (check.log, *.out.bad, *.full)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mount(8) runs /sbin/mount.fuse.cairn for `mount -t fuse.cairn`, as xfstests does.
for h in "${HELPERS[@]}"; do
    SAVED[$h]=$(readlink "$h" 2>/dev/null || true)
    ln -sfn "$BIN/cairn-mount" "$h"
done

# Two independent volumes. Their first clients are unmounted again: xfstests mounts and
# unmounts TEST_DEV and SCRATCH_DEV itself, by the SOURCE shown in /proc/mounts.
declare -A SRC=()
for v in test scratch; do
    "$BIN/cairn" local up "$WORK/up-$v" --data "$WORK/data-$v" --chunk-servers 1 >/dev/null
    SRC[$v]=$(awk -v m="$WORK/up-$v" '$2 == m {print $1}' /proc/mounts)
    umount "$WORK/up-$v"
done

# xfstests compares the type `df -T` and `findmnt -t` show with FSTYP ("fuse"); Cairn mounts
# as "fuse.cairn" so that `mount -o remount` finds its helper again. Two small wrappers, first on
# PATH, show the type as "fuse" (xfstests does the same for fuse.glusterfs and fuse.ceph-fuse).
mkdir -p "$WORK/shim"
cat >"$WORK/shim/df" <<'SHIM'
#!/bin/sh
/usr/bin/df "$@" | sed 's/ fuse\.cairn / fuse       /'
SHIM
cat >"$WORK/shim/findmnt" <<'SHIM'
#!/bin/bash
args=()
prev=
for a in "$@"; do
    if [ "$prev" = -t ] && [ "$a" = fuse ]; then a=fuse,fuse.cairn; fi
    args+=("$a")
    prev=$a
done
exec /usr/bin/findmnt "${args[@]}"
SHIM
chmod +x "$WORK/shim/df" "$WORK/shim/findmnt"
export PATH="$WORK/shim:$PATH"

cat >"$WORK/local.config" <<EOF
export FSTYP=fuse
export FUSE_SUBTYP=.cairn
export TEST_DEV=${SRC[test]}
export TEST_DIR=$WORK/test
export SCRATCH_DEV=${SRC[scratch]}
export SCRATCH_MNT=$WORK/scratch
export MOUNT_OPTIONS="-o dev,suid,acl"
export TEST_FS_MOUNT_OPTS="-o dev,suid,acl"
export RESULT_BASE=$WORK/results
EOF

cd "$XFSTESTS"
status=0
HOST_OPTIONS="$WORK/local.config" ./check -fuse -E "$HERE/exclude" "$@" || status=$?
exit "$status"
