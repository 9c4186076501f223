#!/bin/bash
# Build qinst's test guest image: a Debian 12 (bookworm) cloud-style qcow2 made from Debian packages
# only, plus a broken variant (cloud-init disabled), a mirror tree that keeps an upstream-like path and a
# catalog file pointing at it.  See README.md beside this file.
#
# Usage: tests/images/build.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to $QINST_TEST_IMAGE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/qinst-test-image.
#   The result goes to OUTPUT_DIR/<sha256 of this script>/ and that absolute path is the last line printed
#   on stdout (everything else goes to stderr).  A complete cached result is reused at once, without root.
#
# Building needs root (loop devices, mount) and these Debian packages:
#   apt-get install mmdebstrap qemu-utils e2fsprogs fdisk extlinux syslinux-common util-linux mount dosfstools mtools
# (debian-archive-keyring, which mmdebstrap pulls in, verifies the archive.)  Booting the result for tests
# also needs qemu-system-x86, cloud-image-utils and openssh-client, but this script does not.
#
# Environment:
#   QINST_TEST_IMAGE_DIR        output directory when no argument is given
#   QINST_TEST_DEBIAN_MIRROR    Debian archive URL (default: the host's apt sources, else deb.debian.org)
#   QINST_TEST_SECURITY_MIRROR  Debian security archive URL (same defaults)
set -euo pipefail

readonly SUITE=bookworm
readonly RAW_SIZE=2G                  # sparse; the guest grows its root fs to the overlay's size
readonly ESP_START=2048               # sectors of 512 bytes: the EFI system partition starts at 1 MiB
readonly ESP_SECTORS=196608           # 96 MiB of FAT: systemd-boot, the kernel and the initrd for UEFI boots
readonly PART_START=$((ESP_START + ESP_SECTORS)) # the root partition follows it (last, so growpart can grow it)
readonly FS_LABEL=qinst-root
readonly IMAGE_DIR_REL=mirror/images/cloud/bookworm/qinst-test
readonly GOOD_NAME=debian-12-qinst-test-amd64.qcow2
readonly BROKEN_NAME=debian-12-qinst-test-broken-amd64.qcow2
readonly UPSTREAM_DIR=https://cloud.debian.org/images/cloud/bookworm/qinst-test
# Serial console last: cloud-init writes its "finished" line and the SSH host keys to /dev/console,
# which is the last console= given.  The launcher reads the boot from the serial log.
readonly KERNEL_CONSOLE="console=tty0 console=ttyS0,115200n8"

# What goes into the guest, and why:
#  - linux-image-cloud-amd64: the kernel Debian's genericcloud images use (virtio, no AHCI);
#  - cloud-init (NoCloud only, see 99-qinst-test.cfg below), cloud-guest-utils (growpart), fdisk (sfdisk, which
#    growpart uses on MBR), e2fsprogs (resize2fs): the root fs grows to the disk at first boot;
#  - ifupdown + isc-dhcp-client: what bookworm's genericcloud uses; cloud-init renders ENI for it;
#  - locales: cloud-init's locale module runs update-locale, and fails without it;
#  - systemd-sysv, udev, dbus (hostnamectl), openssh-server, sudo, procps;
#  - systemd-boot-efi: the UEFI boot path (its BOOTX64.EFI is copied to the ESP; nothing runs bootctl);
#  - no qemu-guest-agent: Ubuntu's cloud images have none, so readiness must not need it.
readonly PACKAGES=(
	linux-image-cloud-amd64
	systemd-sysv udev dbus
	cloud-init cloud-guest-utils fdisk e2fsprogs
	ifupdown isc-dhcp-client iproute2 netbase
	openssh-server sudo locales procps
	systemd-boot-efi
)

log() { printf '[build-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

# All chatter goes to stderr; fd 3 keeps the real stdout for the final path.
exec 3>&1 1>&2

script_path=$(readlink -f "${BASH_SOURCE[0]}")
key=$(sha256sum "$script_path" | cut -d' ' -f1)
out_arg=${1:-${QINST_TEST_IMAGE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qinst-test-image}}
mkdir -p "$out_arg"
out=$(cd "$out_arg" && pwd -P)
final="$out/$key"

is_complete() {
	local d=$1
	[[ -s "$d/catalog.toml" && -s "$d/$IMAGE_DIR_REL/SHA512SUMS" && -s "$d/$IMAGE_DIR_REL/$GOOD_NAME" \
		&& -s "$d/$IMAGE_DIR_REL/$BROKEN_NAME" ]]
}

if is_complete "$final"; then
	log "cached: $final"
	echo "$final" >&3
	exit 0
fi

# ---- preflight: fail early, naming what is missing ----
[[ $EUID -eq 0 ]] || die "building the image needs root (loop devices, mount); no cached build at $final"
missing=()
for tool in mmdebstrap:mmdebstrap qemu-img:qemu-utils sfdisk:fdisk mkfs.ext4:e2fsprogs mklost+found:e2fsprogs \
	extlinux:extlinux mkfs.vfat:dosfstools mcopy:mtools mmd:mtools losetup:util-linux fstrim:util-linux flock:util-linux blkid:util-linux \
	mount:mount umount:mount sha512sum:coreutils; do
	command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool%%:*} (package ${tool#*:})")
done
mbr_bin=
for f in /usr/lib/syslinux/mbr/mbr.bin /usr/lib/EXTLINUX/mbr.bin; do
	[[ -r $f ]] && { mbr_bin=$f; break; }
done
[[ -n $mbr_bin ]] || missing+=("mbr.bin (package syslinux-common)")
if ((${#missing[@]})); then
	die "missing tools: ${missing[*]}. Install: apt-get install mmdebstrap qemu-utils e2fsprogs fdisk extlinux syslinux-common util-linux mount dosfstools mtools"
fi
[[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
[[ -e /dev/loop-control ]] || die "no loop device support (/dev/loop-control missing; try: modprobe loop)"

# ---- one builder per key; a second caller waits, then finds the cache ----
exec 9>"$out/.lock-$key"
if ! flock -n 9; then
	log "another build of $key is running; waiting for it"
	flock 9
fi
if is_complete "$final"; then
	log "cached (built by another process): $final"
	echo "$final" >&3
	exit 0
fi
rm -rf "$out/.build-$key".* # leftovers of a killed build of this key (we hold its lock)

tmp=$(mktemp -d "$out/.build-$key.XXXXXX")
mnt="$tmp/mnt"
loop=
cleanup() {
	local rc=$?
	set +e
	if mountpoint -q "$mnt" 2>/dev/null; then
		umount -R "$mnt" 2>/dev/null || umount -R -l "$mnt"
	fi
	[[ -n $loop ]] && losetup -d "$loop"
	rm -rf "$tmp"
	((rc == 0)) || log "FAILED (exit $rc); nothing was cached"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t_start=$SECONDS
step() { log "[$((SECONDS - t_start))s] $*"; }

# Mirror: the host's own apt sources when they name a Debian archive (so builds use the same mirror or proxy
# as apt-get here), else deb.debian.org.
host_uris() {
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[[ -r $f ]] || continue
		sed -e 's/#.*//' "$f"
	done | awk '
		/^[[:space:]]*deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }
		/^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i }'
}
uris=$(host_uris || true)
debian_mirror=${QINST_TEST_DEBIAN_MIRROR:-$(grep -m1 -E '/debian/?$' <<<"$uris" || true)}
debian_mirror=${debian_mirror:-http://deb.debian.org/debian}
security_mirror=${QINST_TEST_SECURITY_MIRROR:-$(grep -m1 -E '/debian-security/?$' <<<"$uris" || true)}
security_mirror=${security_mirror:-http://deb.debian.org/debian-security}
step "mirrors: $debian_mirror, $security_mirror"

# ---- disk: MBR; an EFI system partition (type ef) at 1 MiB, then one bootable ext4 partition to the end ----
# SeaBIOS runs the MBR code, which boots the active (root) partition with extlinux; OVMF finds the FAT ESP
# (UEFI accepts an MBR partition of type 0xEF) and runs its removable-media path EFI/BOOT/BOOTX64.EFI.
raw="$tmp/disk.raw"
truncate -s "$RAW_SIZE" "$raw"
printf 'label: dos\nstart=%d, size=%d, type=ef\nstart=%d, type=83, bootable\n' \
	"$ESP_START" "$ESP_SECTORS" "$PART_START" | sfdisk -q "$raw"
dd if="$mbr_bin" of="$raw" bs=440 count=1 conv=notrunc status=none
offset=$((PART_START * 512))
part_bytes=$(($(stat -c %s "$raw") - offset))

attach() { # loop device for the partition of disk file $1: no partition nodes without udev, hence -o
	loop=$(losetup --find --show --offset "$offset" --sizelimit "$part_bytes" "$1")
}
detach() {
	umount -R "$mnt"
	losetup -d "$loop"
	loop=
}

attach "$raw"
# No 64bit feature: extlinux reads the fs itself, and 32-bit block numbers are what it knows best (a 4 KiB-block
# fs without it still grows to 16 TiB).  Inode tables initialised now, not by a lazy kernel thread on first
# boot under TCG.
mkfs.ext4 -q -L "$FS_LABEL" -O ^64bit -E lazy_itable_init=0,lazy_journal_init=0 "$loop"
fs_uuid=$(blkid -o value -s UUID "$loop")
mkdir "$mnt"
mount "$loop" "$mnt"
rmdir "$mnt/lost+found" # mmdebstrap wants an empty target

# ---- root filesystem ----
step "mmdebstrap $SUITE into the partition"
mmdebstrap \
	--variant=minbase \
	--mode=root \
	--format=directory \
	--include="$(IFS=,; echo "${PACKAGES[*]}")" \
	--aptopt='Acquire::Check-Valid-Until "false"' \
	--aptopt='Acquire::Languages "none"' \
	--aptopt='APT::Sandbox::User "root"' \
	--dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/info/*' \
	--dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-include=/usr/share/doc/*/copyright' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	"$SUITE" "$mnt" \
	"deb $debian_mirror $SUITE main" \
	"deb $debian_mirror $SUITE-updates main" \
	"deb $security_mirror $SUITE-security main"
mklost+found "$mnt/lost+found" >/dev/null 2>&1 || mkdir -m 0700 "$mnt/lost+found"

step "configuring the guest"
# Build-time apt switches do not belong in the guest.
rm -f "$mnt/etc/apt/apt.conf.d/99mmdebstrap"

cat >"$mnt/etc/cloud/cloud.cfg.d/99-qinst-test.cfg" <<'EOF'
# qinst test image (written by qinst's tests/images/build.sh).
# The seed is always a NoCloud (cidata) disk: never probe cloud metadata services.
datasource_list: [NoCloud, None]
# The hostname from meta-data resolves (sudo complains otherwise), as on Debian's cloud images.
manage_etc_hosts: true
# C.UTF-8 is built into glibc: no locale-gen, and update-locale accepts it (Debian's default en_US.UTF-8
# is not generated here and fails the locale module).
locale: C.UTF-8
# No RSA (about 5 s under TCG) nor DSA host keys: ed25519 and ECDSA are what ssh picks anyway.
ssh_genkeytypes: [ed25519, ecdsa]
# There is no GRUB in this image.
grub_dpkg:
  enabled: false
EOF

cat >"$mnt/etc/fstab" <<EOF
UUID=$fs_uuid / ext4 rw,discard,errors=remount-ro 0 1
EOF

echo localhost >"$mnt/etc/hostname"
cat >"$mnt/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
rm -f "$mnt/etc/resolv.conf"

# ifupdown's own config only sources interfaces.d, where cloud-init writes 50-cloud-init.
cat >"$mnt/etc/network/interfaces" <<'EOF'
# The loopback network interface; cloud-init writes the rest to interfaces.d/50-cloud-init.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
EOF
mkdir -p "$mnt/etc/network/interfaces.d"

# A guest whose DHCP gets no answer gives up after 20 s instead of dhclient's 60 s (ifup -a blocks the boot).
sed -i -e '/^#\?timeout /d' "$mnt/etc/dhcp/dhclient.conf"
echo 'timeout 20;' >>"$mnt/etc/dhcp/dhclient.conf"

# No identity baked in: host keys are made by cloud-init at first boot (and printed to the console),
# machine-id is empty (systemd makes one at first boot), root has no password and there is no user.
rm -f "$mnt"/etc/ssh/ssh_host_*
: >"$mnt/etc/machine-id"
rm -f "$mnt/var/lib/dbus/machine-id"
if grep -q '^root:[^*!:]' "$mnt/etc/shadow"; then
	die "root has a password in the built image"
fi
rm -rf "$mnt"/var/lib/cloud/* "$mnt"/var/log/*.log "$mnt"/var/log/apt/* "$mnt"/tmp/* "$mnt"/var/tmp/*

# ---- boot loader: syslinux MBR + extlinux on the partition, booted by SeaBIOS like any disk ----
shopt -s nullglob
kernels=("$mnt"/boot/vmlinuz-*)
shopt -u nullglob
((${#kernels[@]} == 1)) || die "expected one kernel in /boot, found ${#kernels[@]}"
kver=${kernels[0]##*/vmlinuz-}
[[ -e "$mnt/boot/initrd.img-$kver" ]] || die "no initrd for kernel $kver"
mkdir -p "$mnt/boot/extlinux"
cat >"$mnt/boot/extlinux/extlinux.conf" <<EOF
# Written by qinst's tests/images/build.sh.  The serial console (ttyS0) comes last so that it is /dev/console.
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
	LINUX /boot/vmlinuz-$kver
	INITRD /boot/initrd.img-$kver
	APPEND root=UUID=$fs_uuid ro $KERNEL_CONSOLE
EOF
extlinux --install "$mnt/boot/extlinux" 2>&1 | sed 's/^/extlinux: /' >&2
# The UEFI path: systemd-boot on the ESP with one entry; it reads the kernel and initrd from the ESP (FAT), so
# they are copied there.  Written with mtools into a FAT image, then placed at the ESP's offset.
efi_stub="$mnt/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
[[ -r $efi_stub ]] || die "no $efi_stub in the image (package systemd-boot-efi)"
esp="$tmp/esp.img"
truncate -s $((ESP_SECTORS * 512)) "$esp"
mkfs.vfat -F 32 -n QINST-ESP "$esp" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/debian
mcopy -i "$esp" "$efi_stub" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$mnt/boot/vmlinuz-$kver" ::/debian/vmlinuz
mcopy -i "$esp" "$mnt/boot/initrd.img-$kver" ::/debian/initrd.img
printf 'default debian.conf\ntimeout 0\n' >"$tmp/loader.conf"
printf 'title Debian (qinst test image)\nlinux /debian/vmlinuz\ninitrd /debian/initrd.img\noptions root=UUID=%s ro %s\n' \
	"$fs_uuid" "$KERNEL_CONSOLE" >"$tmp/debian.conf"
mcopy -i "$esp" "$tmp/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$tmp/debian.conf" ::/loader/entries/debian.conf
# extlinux learns the partition's start sector ("hidden sectors", offset 0x1c of the boot sector) from the
# block device; a loop device with an offset says 0.  Write the real value, as an install on /dev/sda1 would.
printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((PART_START & 255)) $(((PART_START >> 8) & 255)) \
	$(((PART_START >> 16) & 255)) $(((PART_START >> 24) & 255)))" |
	dd of="$loop" bs=1 seek=28 count=4 conv=notrunc status=none
sync
fstrim "$mnt" >/dev/null 2>&1 || true # freed blocks (apt's downloads) become holes in the raw file
du_root=$(df -h --output=used "$mnt" | tail -1 | tr -d ' ')
detach
dd if="$esp" of="$raw" bs=512 seek="$ESP_START" conv=notrunc,sparse status=none
rm -f "$esp"
step "root filesystem: $du_root used, kernel $kver; ESP with systemd-boot"

# ---- images ----
img_dir="$tmp/result/$IMAGE_DIR_REL"
mkdir -p "$img_dir"
# Compressed qcow2, like Debian's own images: a third of the size (about 150 MB instead of 470 MB) to serve,
# hash and cache, for well under a second of host CPU to inflate what a boot reads.
step "broken variant: a copy of the disk with cloud-init disabled"
raw_broken="$tmp/disk-broken.raw"
cp --sparse=always "$raw" "$raw_broken"
attach "$raw_broken"
mount "$loop" "$mnt"
touch "$mnt/etc/cloud/cloud-init.disabled"
detach
step "qemu-img convert -c (both images at once)"
qemu-img convert -c -O qcow2 "$raw" "$img_dir/$GOOD_NAME" &
convert_good=$!
qemu-img convert -c -O qcow2 "$raw_broken" "$img_dir/$BROKEN_NAME" || { wait "$convert_good" || true; die "qemu-img convert failed"; }
wait "$convert_good" || die "qemu-img convert failed"
rm -f "$raw" "$raw_broken"

(cd "$img_dir" && sha512sum "$GOOD_NAME" "$BROKEN_NAME" >SHA512SUMS)
good_sum=$(awk -v f="$GOOD_NAME" '$2 == f { print $1 }' "$img_dir/SHA512SUMS")
broken_sum=$(awk -v f="$BROKEN_NAME" '$2 == f { print $1 }' "$img_dir/SHA512SUMS")

cat >"$tmp/result/catalog.toml" <<EOF
# qinst catalog for the project's test image, written by tests/images/build.sh (key $key).
# Serve the mirror/ folder beside this file over HTTP and pass --mirror http://127.0.0.1:PORT.

[images.qinst-test]
title = "qinst test image (Debian 12, cloud kernel)"
aliases = []
os = "debian"
release = "12"
arch = "x86_64"
format = "qcow2"
url = "$UPSTREAM_DIR/$GOOD_NAME"
digest = "sha512:$good_sum"
latest_url = "$UPSTREAM_DIR/$GOOD_NAME"
checksums_url = "$UPSTREAM_DIR/SHA512SUMS"
default_user = "debian"

[images.qinst-test-broken]
title = "qinst test image, broken: cloud-init disabled (Debian 12, cloud kernel)"
aliases = []
os = "debian"
release = "12"
arch = "x86_64"
format = "qcow2"
url = "$UPSTREAM_DIR/$BROKEN_NAME"
digest = "sha512:$broken_sum"
latest_url = "$UPSTREAM_DIR/$BROKEN_NAME"
checksums_url = "$UPSTREAM_DIR/SHA512SUMS"
default_user = "debian"
EOF

cat >"$tmp/result/build-info.txt" <<EOF
key=$key
suite=$SUITE
kernel=$kver
kernel_cmdline=root=UUID=$fs_uuid ro $KERNEL_CONSOLE
root_fs_uuid=$fs_uuid
debian_mirror=$debian_mirror
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$((SECONDS - t_start))
EOF

chmod -R a+rX "$tmp/result"
rm -rf "$final" # an incomplete leftover (we hold the lock)
mv -T "$tmp/result" "$final"
step "done: $(du -h --apparent-size "$final/$IMAGE_DIR_REL/$GOOD_NAME" | cut -f1) qcow2 in $final"
echo "$final" >&3
