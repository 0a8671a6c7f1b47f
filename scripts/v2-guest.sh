#!/usr/bin/env bash
# Run a command as root in a pure cgroup v2 guest, in this worktree, and exit with its status.
#
#   scripts/v2-guest.sh [--timeout SECONDS] [--] COMMAND [ARGS...]
#
# This machine mounts cgroup v1 hierarchies for every controller, so cowfs's v2 limit path only
# meets real cgroupfs in a guest: qemu with a Debian kernel, the host's root filesystem shared
# read-only over 9p (the guest runs the host's Python, .venv and busybox), tmpfs for /tmp, /run,
# /var/tmp and /dev/shm, and cgroup2 alone at /sys/fs/cgroup (`cgroup_no_v1=all`) with memory,
# cpu and pids enabled in the root's subtree_control, as systemd does. The command's output
# comes out on the serial console (this script's stdout); its status comes back through a
# second, writable 9p share. As root, the script installs qemu-system-x86 if it is missing and
# keeps the kernel package (downloaded, never installed) in $COWFS_V2_GUEST_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
worktree=$PWD

say() { printf 'v2-guest: %s\n' "$*" >&2; }
die() { say "$*"; exit 125; }

timeout_s=900
while (($#)); do
    case $1 in
        --timeout) timeout_s=$2; shift 2 ;;
        --) shift; break ;;
        -*) die "unknown option $1" ;;
        *) break ;;
    esac
done
(($#)) || die "usage: $0 [--timeout SECONDS] [--] COMMAND [ARGS...]"
cache=${COWFS_V2_GUEST_CACHE:-/var/cache/cowfs-v2-guest}
# Loaded in this order by the guest's init; their dependencies come from modules.dep.
modules=(virtio_pci 9pnet_virtio 9p fuse overlay)

install_qemu() {
    command -v qemu-system-x86_64 >/dev/null && return
    [[ $(id -u) == 0 ]] || die "qemu-system-x86_64 is missing (run as root to install it)"
    say "installing qemu-system-x86"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 >/dev/null
}

# The newest Debian kernel of this release, unpacked (not installed) under $cache; prints its
# directory. The package is the one linux-image-amd64 depends on, so it matches the release.
fetch_kernel() {
    local package
    package=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -z $package ]]; then
        apt-get update -qq
        package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {
            print $2; exit}')
    fi
    [[ -n $package ]] || die "no linux-image package for this release"
    local directory=$cache/$package
    if [[ ! -e $directory/.unpacked ]]; then
        say "downloading $package"
        mkdir -p "$cache"
        rm -rf "$directory" "$cache"/*.deb
        (cd "$cache" && apt-get download -qq "$package" 2>/dev/null)
        dpkg-deb -x "$cache/$package"_*.deb "$directory"
        rm -f "$cache"/*.deb
        # The package leaves modules.dep to depmod at install time; busybox has one too.
        busybox depmod -b "$directory" "$(ls "$directory/lib/modules")"
        touch "$directory/.unpacked"
    fi
    echo "$directory"
}

# Module names to load, dependencies first, as paths relative to the kernel's modules dir.
resolve_modules() {
    local modules_dir=$1; shift
    awk -v wanted="$*" '
        function base(path) { sub(/.*\//, "", path); sub(/\.ko(\.[a-z]+)?$/, "", path)
                              gsub(/-/, "_", path); return path }
        function visit(path,    i, n, deps) {
            if (path in done) return
            done[path] = 1
            n = split(depends[path], deps, " ")
            for (i = n; i >= 1; i--) visit(deps[i])
            print path
        }
        FILENAME ~ /modules.builtin$/ { builtin[base($1)] = 1; next }
        { sub(/:$/, "", $1); path = $1; $1 = ""; depends[path] = $0; by_name[base(path)] = path }
        END {
            n = split(wanted, names, " ")
            for (i = 1; i <= n; i++) {
                name = names[i]; gsub(/-/, "_", name)
                if (name in by_name) visit(by_name[name])
                else if (!(name in builtin)) { print "missing module " name > "/dev/stderr"; exit 1 }
            }
        }' "$modules_dir/modules.builtin" "$modules_dir/modules.dep"
}

build_initramfs() {
    local kernel_dir=$1 out=$2 staging=$3 version modules_dir path
    version=$(ls "$kernel_dir/lib/modules")
    modules_dir=$kernel_dir/lib/modules/$version
    mkdir -p "$staging"/{bin,proc,sys,dev,newroot,modules}
    cp /bin/busybox "$staging/bin/busybox"
    resolve_modules "$modules_dir" "${modules[@]}" | while read -r path; do
        local target=$staging/modules/$(basename "${path%%.ko*}").ko
        case $path in
            *.ko.xz) xz -dc "$modules_dir/$path" >"$target" ;;
            *.ko.zst) zstd -qdc "$modules_dir/$path" >"$target" ;;
            *) cp "$modules_dir/$path" "$target" ;;
        esac
        basename "$target" >>"$staging/modules/order"
    done
    guest_init >"$staging/init"
    guest_stage2 >"$staging/stage2"
    chmod +x "$staging/init"
    (cd "$staging" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$out"
}

# PID 1 in the initramfs: modules, the host's root, the pure v2 hierarchy, then switch_root.
guest_init() {
    cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules/order); do insmod /modules/$module || echo "insmod $module failed"; done
root_options=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o ro,cache=loose,$root_options hostroot /newroot || exec poweroff -f
for dir in tmp run var/tmp; do mount -t tmpfs -o mode=1777 tmpfs /newroot/$dir; done
mkdir -p /newroot/run/cowfs-v2-guest
mount -t 9p -o $root_options,cache=none results /newroot/run/cowfs-v2-guest
for dir in proc sys dev; do mount --move /$dir /newroot/$dir; done
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts 2>/dev/null
mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup
echo "+memory +cpu +pids" >/newroot/sys/fs/cgroup/cgroup.subtree_control
cp /stage2 /newroot/run/stage2
exec switch_root /newroot /bin/busybox sh /run/stage2
EOF
}

# PID 1 on the host's root: run the job, hand its status back, power off.
guest_stage2() {
    cat <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
results=/run/cowfs-v2-guest
echo "v2-guest: kernel $(uname -r), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)," \
     "enabled: $(cat /sys/fs/cgroup/cgroup.subtree_control)" >/dev/console
/bin/bash $results/job </dev/null >/dev/console 2>&1
echo $? >$results/status.tmp && mv $results/status.tmp $results/status
sync
/bin/busybox poweroff -f
echo o >/proc/sysrq-trigger
EOF
}

# KVM when a guest kernel really boots under it (on some nested hosts /dev/kvm opens but a
# guest hangs), else TCG. The probe, a kernel that panics at once for want of a root, is
# remembered per host kernel and qemu; COWFS_V2_GUEST_ACCEL=kvm or tcg skips it.
accelerator() {
    local kernel=$1 answer=${COWFS_V2_GUEST_ACCEL:-}
    local remembered
    remembered=$cache/accel-$(uname -r)-$(qemu-system-x86_64 --version | awk '{print $4; exit}')
    if [[ -z $answer && -e $remembered ]]; then answer=$(cat "$remembered"); fi
    if [[ -z $answer ]]; then
        answer=tcg
        if [[ -w /dev/kvm ]] && timeout --kill-after=5 20 qemu-system-x86_64 -enable-kvm \
                -cpu host -m 256 -display none -serial none -monitor none -no-reboot \
                -nic none -kernel "$kernel" -append "panic=-1" </dev/null >/dev/null 2>&1
        then
            answer=kvm
        fi
        echo "$answer" >"$remembered"
    fi
    echo "$answer"
}

main() {
    install_qemu
    local kernel_dir work
    kernel_dir=$(fetch_kernel)
    work=$(mktemp -d /tmp/cowfs-v2-guest.XXXXXX)
    # shellcheck disable=SC2064  # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/results"
    build_initramfs "$kernel_dir" "$work/initramfs.gz" "$work/staging"
    {
        printf 'cd %q\n' "$worktree"
        printf 'export COWFS_IN_V2_GUEST=1 PYTHONDONTWRITEBYTECODE=1\n'
        printf 'exec'
        printf ' %q' "$@"
        printf '\n'
    } >"$work/results/job"
    local kernel accel cpu=(-cpu max) started status=0
    kernel=$(echo "$kernel_dir"/boot/vmlinuz-*)
    accel=$(accelerator "$kernel")
    [[ $accel == tcg ]] || cpu=(-cpu host)
    say "booting $(basename "$kernel") with $accel"
    started=$SECONDS
    timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 -accel "$accel" "${cpu[@]}" \
        -m 2048 -smp 2 -nographic -monitor none -serial stdio -no-reboot -nic none \
        -kernel "$kernel" -initrd "$work/initramfs.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=3 cgroup_no_v1=all" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
        -virtfs "local,path=$work/results,mount_tag=results,security_model=passthrough" \
        </dev/null || status=$?
    ((status != 124 && status != 137)) || die "the guest timed out after ${timeout_s}s"
    ((status == 0)) || die "qemu failed with status $status"
    [[ -e $work/results/status ]] || die "the guest ended without the command's status"
    say "guest ran for $((SECONDS - started))s"
    return "$(cat "$work/results/status")"
}

main "$@"
