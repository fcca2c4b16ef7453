#!/usr/bin/env bash
# Build a local Debian bookworm base image (python3, venv, CA certificates)
# with debootstrap and import it into podman, for hosts that cannot pull
# python:3.11-slim-bookworm from a registry.
#
#   scripts/base-image.sh [IMAGE]      (default: localhost/bulkjob-base:bookworm)
#
# The image is built once: if IMAGE exists, nothing is done. REBUILD=1 forces
# a new one. DEBIAN_MIRROR overrides the mirror, which otherwise is the first
# Debian archive that this host's apt uses.
set -euo pipefail

image=${1:-localhost/bulkjob-base:bookworm}
suite=bookworm

if [ "${REBUILD:-0}" != 1 ] && podman image exists "$image"; then
    echo "base-image: $image exists"
    exit 0
fi

host_mirror() {
    # deb822 files ("URIs: ...") first, then one-line "deb URL suite ..." entries;
    # the security archive has a different layout, so skip it.
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' \
        | grep -v -- '-security' | head -n 1 || true)
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" && $0 ~ /debian/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
            | grep -v -- '-security' | head -n 1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/bulkjob-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

echo "base-image: debootstrap $suite from $mirror (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    exit 1
}
rm -f "$rootfs.log"

# Keep the image small: no package cache, lists, docs or locales. apt still
# works in a derived build after an `apt-get update`.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/*.log \
    "$rootfs"/var/cache/debconf/*-old
# The same sources as the official Debian images, on the chosen mirror.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
SOURCES

tar -C "$rootfs" --numeric-owner -c . \
    | podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$image" >/dev/null
echo "base-image: built $image"
