#!/usr/bin/env bash
# Build a local Debian bookworm base image (python3, venv, CA certificates)
# with debootstrap, bring it up to date from bookworm-updates and
# bookworm-security, and import it into podman, for hosts that cannot pull
# python:3.11-slim-bookworm from a registry.
#
#   scripts/base-image.sh [IMAGE]      (default: localhost/bulkjob-base:bookworm)
#
# The image carries the hash of this script (which holds the package list)
# in the label io.bulkjob.base.recipe. It is rebuilt when that hash differs
# from this script's, when it is older than BASE_MAX_AGE_DAYS (default 7: the
# security updates it holds age too), or when REBUILD=1; otherwise nothing is
# done. DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR override the mirrors, which
# otherwise are the Debian archives this host's apt uses.
set -euo pipefail

image=${1:-localhost/bulkjob-base:bookworm}
suite=bookworm
#: What the image needs beyond minbase: the interpreter, venv (with pip's
#: wheel, for building the virtualenv) and the CAs pip and boto3 trust.
packages=python3,python3-venv,ca-certificates
max_age_days=${BASE_MAX_AGE_DAYS:-7}
recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)

if [ "${REBUILD:-0}" != 1 ] && podman image exists "$image"; then
    built_recipe=$(podman image inspect "$image" --format '{{index .Labels "io.bulkjob.base.recipe"}}' 2>/dev/null || true)
    created=$(podman image inspect "$image" --format '{{.Created.Unix}}' 2>/dev/null || echo 0)
    age_days=$(( ($(date +%s) - created) / 86400 ))
    if [ "$built_recipe" = "$recipe" ] && [ "$age_days" -lt "$max_age_days" ]; then
        echo "base-image: $image is up to date (recipe $recipe, $age_days day(s) old)"
        exit 0
    fi
    echo "base-image: rebuilding $image (recipe ${built_recipe:-none} -> $recipe, $age_days day(s) old)"
fi

# The first archive of this host's apt sources whose URI matches $1 (a grep -E
# pattern) and not $2: deb822 files ("URIs: ...") first, then one-line entries.
host_archive() {
    local want=$1 skip=$2 uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' \
        | grep -E -- "$want" | grep -v -E -- "$skip" | head -n 1 || true)
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
            | grep -E -- "$want" | grep -v -E -- "$skip" | head -n 1 || true)
    fi
    echo "$uri"
}
mirror=${DEBIAN_MIRROR:-$(host_archive 'debian' '-security')}
mirror=${mirror:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-$(host_archive 'debian-security' '^$')}
security_mirror=${security_mirror:-http://deb.debian.org/debian-security}

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/bulkjob-rootfs.XXXXXX")
log="$rootfs.log"
cleanup() {
    for fs in proc dev; do umount "$rootfs/$fs" 2>/dev/null || true; done
    rm -rf "$rootfs" "$log"
}
trap cleanup EXIT
fail() {
    tail -n 30 "$log" >&2
    echo "base-image: $1 failed" >&2
    exit 1
}

echo "base-image: debootstrap $suite from $mirror (about a minute)"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$log" 2>&1 \
    || fail debootstrap

# The same sources as the official Debian images, on the chosen mirrors.
# debootstrap installs from the release alone: the point releases in
# bookworm-updates and the fixes in bookworm-security (libssl3, python3.11 ...)
# come from an upgrade inside the new root.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
SOURCES
echo "base-image: upgrading from $suite-updates and $suite-security"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"
mount --bind /dev "$rootfs/dev"
{
    chroot "$rootfs" apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get -y -q \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold dist-upgrade \
        && chroot "$rootfs" apt-get clean
} >>"$log" 2>&1 || fail "apt-get upgrade"
umount "$rootfs/proc" "$rootfs/dev"
: >"$rootfs/etc/resolv.conf"

# Keep the image small: no package cache, lists, docs or locales. apt still
# works in a derived build after an `apt-get update`.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/*.log \
    "$rootfs"/var/log/apt/* \
    "$rootfs"/var/cache/debconf/*-old

tar -C "$rootfs" --numeric-owner -c . \
    | podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL io.bulkjob.base.recipe=$recipe" \
        --change "LABEL io.bulkjob.stage=base" \
        --change 'CMD ["/bin/bash"]' \
        - "$image" >/dev/null
echo "base-image: built $image (recipe $recipe)"
