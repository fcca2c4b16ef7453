#!/usr/bin/env bash
# Install the Debian packages that the build and the test suites need:
#   podman, runc, debootstrap, uidmap -> `make image` and the container test
#                                  (runc: crun cannot set up cgroups on some CI hosts)
#   postgresql                    -> the PostgreSQL dialect tests
#   prometheus, prometheus-pushgateway -> the metrics tests
#   parallel                      -> the benchmark scripts
#   faketime                      -> the lease's clock-skew tests (libfaketime)
# Only what is missing is installed, and only as root; elsewhere it prints
# what to install and exits 0 so that a laptop run can still skip those tests.
#
#   scripts/install-system-deps.sh            all of the above
#   scripts/install-system-deps.sh PKG...     only these (e.g. what `make image` needs)
set -euo pipefail

if [ "$#" -gt 0 ]; then
    packages=("$@")
else
    packages=(podman runc debootstrap uidmap postgresql prometheus prometheus-pushgateway parallel faketime)
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing ${missing[*]} (run as root on Debian to install)" >&2
    exit 0
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Debian's packages start their services on install (postgresql, prometheus);
# the tests start their own instances on loopback, so keep the daemons off.
policy=/usr/sbin/policy-rc.d
created_policy=no
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    created_policy=yes
fi
trap '[ "$created_policy" = yes ] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
