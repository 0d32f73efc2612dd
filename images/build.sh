#!/usr/bin/env bash
# Builds a guest image from Debian packages: images/build.sh [x86_64|s390x]
#   kernel     the kernel (x86_64: linux-image-cloud-amd64, a bzImage; s390x: linux-image-s390x)
#   initrd     a busybox initramfs that mounts the read-only root with a tmpfs overlay
#   root.img   a squashfs root. x86_64: qemu-system-x86 (and qemu-system-s390x, for s390x
#              levels below), libvirt daemon + QEMU driver + clients, openssh-server, kmod, iproute2, busybox, and the kernel and initrd
#              in /usr/lib/matryoshka/image (a level boots the next from them). s390x:
#              openssh-server, kmod, iproute2, busybox and nothing to boot levels with (an
#              s390x level under TCG has no KVM: it is always the last level).
#              No matryoshka runtime: it arrives by self-replication.
# Both use the same init scripts (images/guest/). Outputs go to target/images/<arch> and
# are rebuilt only when this recipe changes. Needs root (debootstrap; chroot for x86_64).
# The s390x image is built on any machine: its packages are only unpacked (debootstrap
# --foreign resolves and downloads them, dpkg-deb unpacks them), never run.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

ARCH=${1:-x86_64}
OUT=${OUT:-target/images/$ARCH}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
case $ARCH in
x86_64)
    PACKAGES=linux-image-cloud-amd64,busybox-static,kmod,iproute2,openssh-server,qemu-system-x86,qemu-system-misc,libvirt-daemon,libvirt-daemon-driver-qemu,libvirt-clients,procps
    # Modules the initramfs loads, in order, before it can mount the root (and
    # qemu_fw_cfg, through which the parent hands in the level's SSH host key).
    INITRD_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console virtio_blk squashfs overlay failover net_failover virtio_net qemu_fw_cfg"
    ;;
s390x)
    PACKAGES=linux-image-s390x,busybox-static,kmod,iproute2,openssh-server,procps
    # virtio and virtio_ccw are built into Debian's s390x kernel; s390-ccw-virtio
    # has no fw_cfg (the level makes its own host key).
    INITRD_MODULES="virtio_console virtio_blk squashfs overlay failover net_failover virtio_net"
    ;;
*)
    echo "images/build.sh: no image recipe for \`$ARCH\`: known are x86_64 and s390x" >&2
    exit 2
    ;;
esac

stamp=$(cat images/build.sh images/guest/* | sha256sum | cut -c1-16)
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ]; then
    echo "image $OUT is up to date ($stamp)"
    exit 0
fi
step() { printf '\033[1m[%s] %s: %s\033[0m\n' "$(date +%T)" "$ARCH image" "$*" >&2; }

need=()
for p in debootstrap squashfs-tools cpio busybox-static kmod; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    step "installing build tools: ${need[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/image-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# The x86_64 root: a full debootstrap (this machine runs its package scripts).
root_x86_64() {
    step "debootstrap $SUITE ($PACKAGES)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log"; exit 1; }
    step "configuring the root"
    kver=$(ls "$root/lib/modules" | head -1)
    chroot "$root" depmod "$kver"
    # libvirt, whose daemon the runtime starts on first use: QEMU runs as root (as
    # the qemu backend's does), its output goes to files; the package scripts that
    # would make its user and folders do not run under debootstrap.
    chroot "$root" sh -c 'getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
        getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu'
    printf 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n' >"$root/etc/libvirt/qemu.conf"
    # libvirtd probes every QEMU binary it finds when it starts; probing the i386 one
    # with KVM (nested in TCG here) once locked up a level's CPU for 45 s. Levels boot
    # x86_64 guests only.
    rm -f "$root/usr/bin/qemu-system-i386"
    # qemu-system-misc brings a dozen emulators: a level keeps the s390x one, for
    # s390x levels below it, off $PATH so that libvirtd does not probe it either
    # (the runtime looks for it in /usr/lib/matryoshka/bin).
    mkdir -p "$root/usr/lib/matryoshka/bin" "$root/usr/lib/matryoshka/share"
    mv "$root/usr/bin/qemu-system-s390x" "$root/usr/lib/matryoshka/bin/"
    # QEMU finds its firmware (s390-ccw.img) relative to its binary: ../share/qemu.
    ln -s /usr/share/qemu "$root/usr/lib/matryoshka/share/qemu"
    find "$root/usr/bin" -name 'qemu-system-*' ! -name qemu-system-x86_64 -delete
    mkdir -p "$root"/var/lib/libvirt/qemu "$root"/var/log/libvirt/qemu "$root"/var/cache/libvirt/qemu "$root"/run/libvirt
    busybox=/bin/busybox
}

# The s390x root: debootstrap's first stage resolves and downloads the packages;
# each is unpacked (no package script runs: they would need an s390x machine), and
# what their scripts would have made is written here.
root_s390x() {
    step "downloading $SUITE s390x packages ($PACKAGES)"
    local fetch=$work/fetch
    debootstrap --foreign --arch=s390x --variant=minbase --include="$PACKAGES" "$SUITE" "$fetch" "$MIRROR" \
        >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
    local debs=("$fetch"/var/cache/apt/archives/*.deb)
    step "unpacking ${#debs[@]} packages"
    mkdir -p "$root"
    for d in "${debs[@]}"; do dpkg-deb -x "$d" "$root"; done
    rm -rf "$fetch"
    step "configuring the root"
    kver=$(ls "$root/lib/modules" | head -1)
    depmod -b "$root" "$kver"
    cp "$root/usr/share/base-passwd/passwd.master" "$root/etc/passwd"
    cp "$root/usr/share/base-passwd/group.master" "$root/etc/group"
    echo "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin" >>"$root/etc/passwd"
    sed 's/:.*//; s/$/:*:19000:0:99999:7:::/' "$root/etc/passwd" >"$root/etc/shadow"
    chmod 0640 "$root/etc/shadow"
    # sshd's privilege separation and the runtime look up users and hosts.
    printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' >"$root/etc/nsswitch.conf"
    busybox=$root/bin/busybox
}

"root_$ARCH"
install -m 0755 images/guest/level-init "$root/sbin/matryoshka-level-init"
mkdir -p "$root/etc/ssh/sshd_config.d"
# Debian's postinst (which an unpacked root never runs) puts sshd_config in place.
[ -e "$root/etc/ssh/sshd_config" ] || cp "$root/usr/share/openssh/sshd_config" "$root/etc/ssh/sshd_config"
# Key logins only, checked by sshd itself: an unpacked root has no PAM configuration
# (pam-auth-update runs in a postinst), and PAM without one refuses every account.
# (This file comes first: sshd keeps the first value it reads of each setting.)
printf '%s\n' 'PermitRootLogin prohibit-password' 'PasswordAuthentication no' \
    'KbdInteractiveAuthentication no' 'UsePAM no' >"$root/etc/ssh/sshd_config.d/matryoshka.conf"
rm -f "$root"/etc/ssh/ssh_host_*        # every level makes its own at boot
sed -i 's/^root:[^:]*:/root:*:/' "$root/etc/shadow"   # no password; key login only
# No DNS server is reachable from a level (its network is restricted): without
# one configured a lookup fails at once instead of after a 10 s timeout (libvirt
# resolves the host name at every domain start). /etc/hosts is written at boot.
: >"$root/etc/resolv.conf"
rm -rf "$root"/usr/share/{doc,man,info,locale} "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*

step "initramfs (kernel $kver)"
init=$work/initramfs
mkdir -p "$init"/{bin,dev,proc,sys,newroot,ro,rw,lib/modules}
cp "$busybox" "$init/bin/busybox"
for m in $INITRD_MODULES; do
    f=$(find "$root/lib/modules/$kver" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "module $m not found in $kver" >&2; exit 1; }
    cp "$f" "$init/lib/modules/"
done
install -m 0755 images/guest/initramfs-init "$init/init"
echo "$INITRD_MODULES" >"$init/modules"
(cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd"

step "squashfs root"
mkdir -p "$OUT"
cp "$root/boot/vmlinuz-$kver" "$work/kernel"
if [ "$ARCH" = x86_64 ]; then
    # The same kernel and initramfs inside the root, and the root itself as /dev/vda:
    # a level boots the next one from these paths, so one image serves every depth.
    img=$root/usr/lib/matryoshka/image
    mkdir -p "$img"
    cp "$work/kernel" "$work/initrd" "$img/"
    ln -s /dev/vda "$img/root.img"
fi
mksquashfs "$root" "$work/root.img" -comp zstd -noappend -quiet -no-progress -e boot
rm -f "$OUT/vmlinuz"
mv "$work/kernel" "$work/initrd" "$work/root.img" "$OUT/"
echo "$stamp" >"$OUT/stamp"
step "done: $(du -h "$OUT/root.img" | cut -f1) root, $(du -h "$OUT/initrd" | cut -f1) initrd, kernel $kver"
