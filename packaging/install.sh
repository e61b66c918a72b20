#!/bin/sh
# Installs Cairn from a cargo target directory, as root:
#
#   packaging/install.sh target/release
#
#   TARGET/cairn        -> /usr/bin/cairn
#   TARGET/cairn-mount  -> /sbin/mount.cairn   (+ symlink /sbin/mount.fuse.cairn for xfstests)
#   packaging/*.service -> /usr/lib/systemd/system/
#   /etc/cairn/            created if missing (configs are not written: see packaging/README.md)
#
# Running it again installs the same files again, so it is safe to repeat after every build.
# It enables and starts nothing. DESTDIR=DIR installs under DIR instead of / (no root needed).
set -eu

die() {
    echo "install.sh: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 TARGET_DIR   (e.g. target/release)"
target=$1
here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}

for bin in cairn cairn-mount; do
    [ -f "$target/$bin" ] && [ -x "$target/$bin" ] ||
        die "$target/$bin is missing: run 'cargo build --release' first"
done
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or set DESTDIR)"
fi

install -D -m755 "$target/cairn" "$root/usr/bin/cairn"
install -D -m755 "$target/cairn-mount" "$root/sbin/mount.cairn"
ln -sfn /sbin/mount.cairn "$root/sbin/mount.fuse.cairn"

for unit in cairn-meta.service cairn-chunk@.service; do
    install -D -m644 "$here/$unit" "$root/usr/lib/systemd/system/$unit"
done
install -d -m755 "$root/etc/cairn"

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

echo "installed: $root/usr/bin/cairn $root/sbin/mount.cairn $root/sbin/mount.fuse.cairn"
echo "units:     $root/usr/lib/systemd/system/{cairn-meta.service,cairn-chunk@.service}"
echo "next:      put meta.toml / chunk-N.toml / client.toml in /etc/cairn (packaging/README.md)"
