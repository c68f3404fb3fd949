#!/usr/bin/env bash
# mkimage.sh OUTDIR: a Debian 12 host like the ones the agent runs on in
# production (systemd as PID 1, the unified cgroup v2 hierarchy), as
# OUTDIR/rootfs.img (ext4, made with mkfs.ext4 -d: no loop mount), with
# its own kernel and initrd beside it (OUTDIR/vmlinuz, OUTDIR/initrd.img)
# for qemu's -kernel/-initrd. Debian's packages only: debootstrap, then
# linux-image-amd64, systemd, redis-server. About two minutes; the test
# (test/vm) runs it once and keeps the result until this script changes.
#
# The image has nothing of the agent's: the test copies it in, as an
# operator installs it. What it adds to a stock Debian: a static address
# on the (restricted, user-mode) network for qemu's forwarded ports, a
# serial console, and vm-guestd.service, which runs the test's helper
# (/usr/local/sbin/vm-guestd, written into each run's copy of the image).
set -euo pipefail
out=${1:?usage: mkimage.sh OUTDIR}
suite=${SUITE:-bookworm}
mkdir -p "$out"
out=$(cd "$out" && pwd)
root=$out/rootfs
rm -rf "$root" "$out/rootfs.img" "$out/vmlinuz" "$out/initrd.img"

# DEBOOTSTRAP_MIRROR may name a mirror; debootstrap's default otherwise.
debootstrap --variant=minbase \
	--include=systemd,systemd-sysv,udev,linux-image-amd64,redis-server,procps,iproute2,kmod \
	"$suite" "$root" ${DEBOOTSTRAP_MIRROR:-} >"$out/debootstrap.log" 2>&1 || {
	tail -30 "$out/debootstrap.log" >&2
	exit 1
}

echo vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vm\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"
# qemu's user-mode network: the guest is 10.0.2.15, the forwarded ports
# arrive there.
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-qemu.network" <<'NET'
[Match]
Name=e*
[Network]
Address=10.0.2.15/24
LinkLocalAddressing=no
IPv6AcceptRA=no
NET
cat >"$root/etc/systemd/system/vm-guestd.service" <<'UNIT'
[Unit]
Description=the VM test's helper: runs the host's commands
After=systemd-networkd.service
[Service]
ExecStart=/usr/local/sbin/vm-guestd -listen :7071
Restart=always
RestartSec=200ms
[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable systemd-networkd.service vm-guestd.service >/dev/null 2>&1
# The wait for network-online (which the agent's unit wants) is for the
# one link there is.
mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
printf '[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20\n' \
	>"$root/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf"
# Debian's redis-server package starts a system Redis on 6379; the agent
# runs its own redis-servers and does not need it (nor does the test's
# figure of a bare start).
chroot "$root" systemctl disable redis-server.service >/dev/null 2>&1 || true
chroot "$root" systemctl mask getty@tty1.service >/dev/null 2>&1 || true
# Root logs in on the serial console without a password (a test VM with
# no network but qemu's forwarded loopback ports).
chroot "$root" passwd -d root >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale

cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
cp "$root"/boot/initrd.img-* "$out/initrd.img"
chmod 644 "$out/vmlinuz" "$out/initrd.img"
# Room for the instances' data and a hundred AOFs.
mkfs.ext4 -q -F -L root -d "$root" "$out/rootfs.img" 3G
rm -rf "$root"
echo "image: $out/rootfs.img"
