#!/bin/bash
# An official-style variant of qinst's test guest image, for the boot benchmarks (bench/boot.py, issue 26).
#
# The test image (tests/images/build.sh) skips two slow first-boot steps that Debian's genericcloud images do:
# its cloud.cfg.d sets `locale: C.UTF-8` (built into glibc: no locale generation) and `ssh_genkeytypes: [ed25519,
# ecdsa]` (no RSA host key).  Debian's official images generate en_US.UTF-8 at first boot (cloud-init's default
# locale; it runs locale-gen, which builds every locale enabled in /etc/locale.gen) and make every default host-key
# type (rsa, ecdsa, ed25519).  This script derives that variant from the test image itself, so both differ in those
# two things only: the same packages, kernel, disk layout and boot loaders.  In the copy it
#   - drops the `locale:` and `ssh_genkeytypes:` settings from /etc/cloud/cloud.cfg.d/99-qinst-test.cfg;
#   - enables `en_US.UTF-8 UTF-8` in /etc/locale.gen, as Debian's cloud images ship it;
#   - restores /usr/share/locale/locale.alias (from the guest's own version of the locales package), which the test
#     image's build leaves out with the translations and locale-gen reads.
# (It is a separate script, not a variant of build.sh: an edit of build.sh changes the cache key of every test image,
# amd64 and arm64, and rebuilds them for everyone.)
#
# Usage: bench/official-image.sh [SOURCE_DIR]
#   SOURCE_DIR: a result directory of tests/images/build.sh (default: run it, amd64 only).  The result goes to
#   ${QINST_TEST_IMAGE_DIR:-~/.cache/qinst-test-image}/official-<key>/ (key: this script and the source image's
#   digest) with a mirror tree, SHA512SUMS, a catalog (entry qinst-test-official) and images.json; its path is the
#   last line on stdout.  A complete cached result is reused.  Building needs root (loop device, mount), qemu-img
#   and apt-get (to fetch the locales package of the guest's version from the host's Debian archive).
set -euo pipefail

readonly IMAGE_DIR_REL=mirror/images/cloud/bookworm/qinst-test
readonly SOURCE_NAME=debian-12-qinst-test-amd64.qcow2
readonly NAME=debian-12-qinst-test-official-amd64.qcow2
readonly UPSTREAM_DIR=https://cloud.debian.org/images/cloud/bookworm/qinst-test
readonly PART_START=198656 # sectors: the root partition of build.sh's disk (after its 1 MiB gap and 96 MiB ESP)

log() { printf '[official-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'official-image.sh: error: %s\n' "$*" >&2; exit 1; }
exec 3>&1 1>&2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
if [[ $# -ge 1 ]]; then
	source_dir=$(cd "$1" && pwd -P)
else
	source_dir=$(QINST_TEST_ARCHES=amd64 bash "$here/../tests/images/build.sh" | tail -n1)
fi
source_image="$source_dir/$IMAGE_DIR_REL/$SOURCE_NAME"
[[ -s $source_image ]] || die "no $SOURCE_NAME in $source_dir (a result directory of tests/images/build.sh)"
source_sha=$(awk -v f="$SOURCE_NAME" '$2 == f { print $1 }' "$source_dir/$IMAGE_DIR_REL/SHA512SUMS")
[[ -n $source_sha ]] || die "$source_dir/$IMAGE_DIR_REL/SHA512SUMS lists no $SOURCE_NAME"
key=$( (sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1; echo "$source_sha") | sha256sum | cut -d' ' -f1)
out=${QINST_TEST_IMAGE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qinst-test-image}
mkdir -p "$out"
final="$out/official-$key"
if [[ -s "$final/catalog.toml" && -s "$final/$IMAGE_DIR_REL/SHA512SUMS" ]]; then
	log "cached: $final"
	echo "$final" >&3
	exit 0
fi
[[ $EUID -eq 0 ]] || die "deriving the image needs root (loop device, mount); no cached result at $final"

tmp=$(mktemp -d "$out/.official-$key.XXXXXX")
mnt="$tmp/mnt"
loop=
cleanup() {
	local rc=$?
	set +e
	mountpoint -q "$mnt" 2>/dev/null && umount "$mnt"
	[[ -n $loop ]] && losetup -d "$loop"
	rm -rf "$tmp"
	((rc == 0)) || log "FAILED (exit $rc); nothing was cached"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "deriving from $source_image"
qemu-img convert -O raw "$source_image" "$tmp/disk.raw"
loop=$(losetup --find --show --offset $((PART_START * 512)) "$tmp/disk.raw")
mkdir "$mnt"
mount "$loop" "$mnt"
cfg="$mnt/etc/cloud/cloud.cfg.d/99-qinst-test.cfg"
grep -q '^locale: C.UTF-8$' "$cfg" || die "$cfg sets no 'locale: C.UTF-8': is $source_dir a test image?"
# The settings and the comment lines just above each go; the rest (NoCloud only, /etc/hosts, no GRUB) stays.
awk '
	/^#/ { held = held $0 "\n"; next }
	/^(locale|ssh_genkeytypes):/ { held = ""; next }
	{ printf "%s%s\n", held, $0; held = "" }
	END { printf "%s", held }' "$cfg" >"$tmp/cfg"
cat "$tmp/cfg" >"$cfg"
sed -i -e 's/^# *\(en_US.UTF-8 UTF-8\)$/\1/' "$mnt/etc/locale.gen"
grep -qx 'en_US.UTF-8 UTF-8' "$mnt/etc/locale.gen" || die "no en_US.UTF-8 line in the guest's /etc/locale.gen"
version=$(dpkg-query --admindir="$mnt/var/lib/dpkg" -W -f '${Version}' locales)
(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "locales=$version" >&2)
dpkg-deb --fsys-tarfile "$tmp"/locales_*.deb | tar -x -C "$tmp" ./usr/share/locale/locale.alias
install -m 0644 "$tmp/usr/share/locale/locale.alias" "$mnt/usr/share/locale/locale.alias"
umount "$mnt"
losetup -d "$loop"
loop=

mkdir -p "$tmp/result/$IMAGE_DIR_REL"
qemu-img convert -c -O qcow2 "$tmp/disk.raw" "$tmp/result/$IMAGE_DIR_REL/$NAME"
sha=$(sha512sum "$tmp/result/$IMAGE_DIR_REL/$NAME" | cut -d' ' -f1)
echo "$sha  $NAME" >"$tmp/result/$IMAGE_DIR_REL/SHA512SUMS"
cat >"$tmp/result/catalog.toml" <<EOF
# qinst catalog for the official-style test image, written by qinst's bench/official-image.sh (key $key).
# Serve the mirror/ folder beside this file over HTTP and pass --mirror http://127.0.0.1:PORT.

[images.qinst-test-official]
title = "qinst test image, official-style first boot: en_US.UTF-8 generated, every host-key type (Debian 12)"
aliases = []
os = "debian"
release = "12"
arch = "x86_64"
format = "qcow2"
url = "$UPSTREAM_DIR/$NAME"
digest = "sha512:$sha"
latest_url = "$UPSTREAM_DIR/$NAME"
checksums_url = "$UPSTREAM_DIR/SHA512SUMS"
default_user = "debian"
EOF
cat >"$tmp/result/images.json" <<EOF
{
  "key": "$key",
  "source": "$source_dir",
  "source_sha512": "$source_sha",
  "images": [
    {"name": "qinst-test-official", "arch": "x86_64", "file": "$NAME", "path": "$IMAGE_DIR_REL/$NAME", "sha512": "$sha", "firmware": ["bios", "uefi"]}
  ]
}
EOF
rm -rf "$final"
mv "$tmp/result" "$final"
log "done: $final"
echo "$final" >&3
