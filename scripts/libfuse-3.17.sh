#!/usr/bin/env bash
# Build libfuse 3.17 (Debian 13's fuse3 3.17.2-3 source, Debian's patches applied) into a cache
# directory beside the machine's libfuse 3.14, and print its prefix.
#
# Why: FUSE passthrough with backing ids and FUSE_HANDLE_KILLPRIV_V2 need libfuse >= 3.17,
# which Debian 12 does not ship. This is the opt-in way to run (and test) cowfs on 3.17 here;
# nothing in the system is replaced and nothing is installed outside the cache.
#
# Environment:
#   COWFS_LIBFUSE_CACHE  the cache directory (default /var/cache/cowfs/libfuse-3.17). The
#                        source is downloaded into it once and the library built into
#                        $COWFS_LIBFUSE_CACHE/prefix; a second run only prints that prefix.
#                        Remove the directory to build anew.
# Needs: curl, gcc, ninja, pkg-config, python3 with venv. meson is not taken from the system:
# it is pip-installed from PyPI into a throwaway virtualenv in the cache, removed after the
# build (Debian 12's meson 1.0.1 would do too: `apt-get install meson`).
# Only the library and its headers are built (no examples, tests, utils, fusermount3).
#
# Using it with cowfs (tests/test_libfuse317.py does all of this, with
# COWFS_LIBFUSE_317=<prefix>):
#   prefix=$(scripts/libfuse-3.17.sh)
#   libdir=$prefix/lib/x86_64-linux-gnu
# 1. Build the kernel-cache extensions against the 3.17 headers into a scratch copy of the
#    package (library_path() looks beside cowfs/fuse_extensions.py, so the daemon must import
#    the copy; never rebuild the .so in the source tree):
#      mkdir -p /tmp/cowfs317 && cp -r cowfs /tmp/cowfs317/ && rm -f /tmp/cowfs317/cowfs/*.so
#      PKG_CONFIG_PATH=$libdir/pkgconfig gcc -shared -fPIC -O2 -fvisibility=hidden \
#          -Wall -Wextra $(PKG_CONFIG_PATH=$libdir/pkgconfig pkg-config --cflags fuse3) \
#          -o /tmp/cowfs317/cowfs/_fuse_extensions.cpython-311-x86_64-linux-gnu.so \
#          cowfs/_fuse_extensions.c -Wl,--no-as-needed \
#          $(PKG_CONFIG_PATH=$libdir/pkgconfig pkg-config --libs fuse3) -ldl
#    The extension then needs libfuse3.so.4 (3.17's soname; 3.14's is libfuse3.so.3).
# 2. Run the daemon with that library first on the search path, from outside the source tree
#    or with -P (python -m puts the current directory before PYTHONPATH, and the source tree's
#    cowfs/ would win):
#      PYTHONPATH=/tmp/cowfs317 LD_LIBRARY_PATH=$libdir \
#          .venv/bin/python -P -m cowfs mount LOWER UPPER MERGED
#    pyfuse3 was linked against libfuse3.so.3 (3.14), a soname 3.17 does not provide, so the
#    system's 3.14 is mapped too; but the extension (and with it libfuse3.so.4) is loaded
#    RTLD_GLOBAL before pyfuse3, and pyfuse3's fuse_*@FUSE_3.x references bind to the first
#    definition in the global scope: 3.17's. Without the extensions (-o kernel_caches=off, or
#    not built) pyfuse3 would use 3.14 even with LD_LIBRARY_PATH set.
# 3. Check: getfattr -n trusted.cowfs.stats --only-values MERGED (getfattr: `apt-get install
#    attr`) shows "kernel_features" with cache_listings true, and
#    grep libfuse3 /proc/$(pgrep -f 'cowfs daemon MERGED')/maps lists
#    $libdir/libfuse3.so.4 (and the 3.14 libfuse3.so.3 pyfuse3 pulled in).
# Two things 3.17 differs in, both handled by cowfs/_fuse_extensions.c: pyfuse3 passes a
# shorter operations table (3.14's headers: 352 bytes; 3.17's: 360, `tmpfile` added) and a
# shorter fuse_file_info (40 bytes; 3.17's is 64, backing_id at 36), so the library copies
# only as much of each as the caller passed.
set -euo pipefail

version=3.17.2
debian_revision=3
pool=http://deb.debian.org/debian/pool/main/f/fuse3
dsc=fuse3_${version}-${debian_revision}.dsc
# The .dsc as fetched when this script was written: its Checksums-Sha256 then vouch for the rest.
dsc_sha256=1339847e7e6512f31d61cf1fe4598341c4b8aa43ea6dc546914b21f96f29deb3

cache=${COWFS_LIBFUSE_CACHE:-/var/cache/cowfs/libfuse-3.17}
prefix=$cache/prefix
libdir=$prefix/lib/x86_64-linux-gnu
stamp=$prefix/.built-$version-$debian_revision

die() { printf 'libfuse-3.17: %s\n' "$*" >&2; exit 1; }
say() { printf 'libfuse-3.17: %s\n' "$*" >&2; }

if [[ -e $stamp && -e $libdir/libfuse3.so.4 && -e $libdir/pkgconfig/fuse3.pc ]]; then
    printf '%s\n' "$prefix"
    exit 0
fi

mkdir -p "$cache/downloads"
cd "$cache/downloads"

# fetch NAME: download into the cache once (an interrupted download is not kept).
fetch() {
    [[ -s $1 ]] && return 0
    curl -fsSL --retry 2 -o "$1.part" "$pool/$1" 2>/dev/null \
        || { rm -f "$1.part"; die "cannot download $pool/$1"; }
    mv "$1.part" "$1"
}
# check NAME SHA256: a mismatch removes the file, so the next run downloads it again.
check() {
    local actual
    actual=$(sha256sum "$1" | cut -d' ' -f1)
    [[ $actual == "$2" ]] || { rm -f "$1"; die "checksum mismatch for $1 (got $actual, want $2)"; }
}

fetch "$dsc"
check "$dsc" "$dsc_sha256"
# The files the .dsc names, with their sha256 (the Checksums-Sha256 section).
mapfile -t sources < <(awk '/^Checksums-Sha256:/ {on = 1; next} /^[^ ]/ {on = 0}
                             on && NF == 3 {print $1, $3}' "$dsc")
((${#sources[@]})) || die "$dsc lists no sha256 checksums"
orig='' debian=''
for line in "${sources[@]}"; do
    read -r sum name <<<"$line"
    fetch "$name"
    check "$name" "$sum"
    case $name in
        *.orig.tar.*.asc) ;;
        *.orig.tar.*) orig=$name ;;
        *.debian.tar.*) debian=$name ;;
    esac
done
[[ -n $orig && -n $debian ]] || die "$dsc names no .orig.tar.* or .debian.tar.*"

say "building libfuse $version into $prefix (a minute or two)"
start=$SECONDS
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xf "$orig" -C "$work"
tar -xf "$debian" -C "$work"
src=$work/fuse-$version
[[ -d $src ]] || die "$orig does not unpack to fuse-$version"
# Debian's patches, as Debian 13's libfuse3-4 has them (one makes a change to both conn->want
# and want_ext in init a warning, not an abort).
while read -r patch _; do
    [[ -z $patch || $patch == \#* ]] && continue
    patch -d "$src" -p1 -s --no-backup-if-mismatch <"$work/debian/patches/$patch" \
        || die "Debian patch $patch does not apply"
done <"$work/debian/patches/series"

python3 -m venv "$work/meson-venv"
{ PIP_DISABLE_PIP_VERSION_CHECK=1 "$work/meson-venv/bin/pip" install -q 'meson==1.5.2' 2>&1 \
    | { grep -v '^WARNING: Location' || true; } >&2; } || die "cannot install meson from PyPI"
meson=$work/meson-venv/bin/meson

rm -rf "$prefix"
"$meson" setup "$work/build" "$src" --prefix="$prefix" --libdir=lib/x86_64-linux-gnu \
    --buildtype=debugoptimized -Dutils=false -Dexamples=false -Dtests=false \
    -Dudevrulesdir="$prefix/lib/udev/rules.d" -Dinitscriptdir='' >"$work/setup.log" 2>&1 \
    || { cat "$work/setup.log" >&2; die "meson setup failed"; }
ninja -C "$work/build" >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; die "the build failed"; }
"$meson" install -C "$work/build" --no-rebuild >"$work/install.log" 2>&1 \
    || { tail -40 "$work/install.log" >&2; die "meson install failed"; }
[[ -e $libdir/libfuse3.so.4 && -e $libdir/pkgconfig/fuse3.pc ]] \
    || die "the install has no $libdir/libfuse3.so.4 or pkgconfig/fuse3.pc"
touch "$stamp"
say "built in $((SECONDS - start))s"
printf '%s\n' "$prefix"
