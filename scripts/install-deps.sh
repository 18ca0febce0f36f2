#!/usr/bin/env bash
# Installs the Debian packages weft builds and tests with (Debian 12, as root).
# Used by `make demo`, `make test` (through .ci/run) and by operators setting up a host.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: run as root (apt-get install needs it)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
stamp=/var/lib/weft-build-deps.stamp
wanted="v6"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && command -v qemu-system-x86_64 >/dev/null; then
    exit 0
fi

apt-get update -qq

# QEMU: every QEMU package must come from the same source version. A newer
# qemu-utils (e.g. from backports) blocks qemu-system-x86 7.2, so pin the set
# to the candidate version of qemu-system-x86.
qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
if [ -z "$qv" ] || [ "$qv" = "(none)" ]; then
    echo "install-deps: no qemu-system-x86 candidate; check the apt sources" >&2
    exit 1
fi

apt-get install -y -qq --allow-downgrades --no-install-recommends \
    "qemu-system-x86=$qv" "qemu-utils=$qv" "qemu-block-extra=$qv" \
    busybox-static cpio e2fsprogs kmod \
    nftables iproute2 libnftnl-dev libmnl-dev \
    sqlite3 socat pkg-config gcc make ca-certificates curl \
    procps passwd util-linux python3 \
    systemd >/dev/null

echo "$wanted" > "$stamp"
