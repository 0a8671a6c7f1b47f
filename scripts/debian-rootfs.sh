#!/usr/bin/env bash
# Make a minimal Debian 12 root filesystem (debootstrap --variant=minbase) once, cache it, and
# print its path.
#
# Why: the opt-in tests in tests/test_debian_rootfs.py run apt-get, useradd and dpkg in a real
# Debian inside `cowfs run`, as a user would. The suite itself never needs this (its dpkg test
# uses a root copied from the host's own files, tests/dpkg_rootfs.py); this one needs Debian's
# package mirror, once to build and again for each apt-get test.
#
# Environment:
#   COWFS_DEBIAN_CACHE   the cache directory (default /var/cache/cowfs/debian-12-minbase). The
#                        root is built in $COWFS_DEBIAN_CACHE/rootfs.new and renamed to
#                        $COWFS_DEBIAN_CACHE/rootfs when debootstrap succeeded, so a failed or
#                        interrupted build is never taken for a good one; a second run only
#                        prints the path. Remove the directory to build anew.
#   COWFS_DEBIAN_MIRROR  the mirror (default http://deb.debian.org/debian).
# Needs: debootstrap (installed here with apt-get when missing) and Debian's archive keyring,
# which debootstrap checks the Release file against. About 80 MB, a minute or two.
set -euo pipefail

cache=${COWFS_DEBIAN_CACHE:-/var/cache/cowfs/debian-12-minbase}
mirror=${COWFS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$cache/rootfs

if [[ -d $rootfs ]]; then
    echo "$rootfs"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "debian-rootfs.sh: debootstrap needs root" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    apt-get install -y -qq debootstrap >&2
fi
mkdir -p "$cache"
rm -rf "$rootfs.new"
debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    bookworm "$rootfs.new" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
    echo "debian-rootfs.sh: debootstrap failed, see $cache/debootstrap.log" >&2
    tail -5 "$cache/debootstrap.log" >&2
    exit 1
}
# apt's own downloads are left out of the cache: the tests install on top of the image.
rm -rf "$rootfs.new"/var/cache/apt/archives/*.deb "$rootfs.new"/var/lib/apt/lists/*
mv "$rootfs.new" "$rootfs"
echo "$rootfs"
