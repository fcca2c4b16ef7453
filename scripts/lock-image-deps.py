"""Write requirements-image.lock: the image's Python dependencies, pinned, with their hashes.

    make lock        (python3 scripts/lock-image-deps.py)

Resolves the job's dependencies (pyproject's `dependencies`, the `postgres` extra and the build
backend, which the image uses without build isolation) for the image's interpreter, CPython 3.11
on glibc 2.36 (Debian bookworm), on x86_64 and aarch64, with pip in a throwaway virtualenv that
ignores this host's pip configuration, and writes one `name==version` line per distribution with
the sha256 of every wheel pip picked for either architecture. The image installs it with
`pip install --require-hashes`: a changed file on the index, or a dependency missing from the
lock, fails the build.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-image.lock"
#: The interpreter and C library of the image's base (python3 in Debian bookworm).
PYTHON_VERSION = "3.11"
ABI = "cp311"
#: The architectures the lock covers.
ARCHES = ("x86_64", "aarch64")
#: bookworm's glibc is 2.36: a wheel of any manylinux tag up to it runs there.
GLIBC_MINOR = 36
#: The legacy names of manylinux_2_5, 2_12 and 2_17.
LEGACY_MANYLINUX = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}
#: The extras of the project that the image installs.
EXTRAS = ("postgres",)


def requirements(pyproject: dict) -> list[str]:
    """What the image needs: the project's dependencies, its extras and its build backend."""
    project = pyproject["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return reqs + list(pyproject["build-system"]["requires"])


def platform_tags(arch: str) -> list[str]:
    """Every manylinux tag a glibc 2.36 system on `arch` runs: pip expands none of them itself."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 4, -1)]
    return tags + [f"{name}_{arch}" for minor, name in LEGACY_MANYLINUX.items()]


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name."""
    name, version = filename.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def main() -> int:
    reqs = requirements(tomllib.loads((ROOT / "pyproject.toml").read_text()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # This host's pip configuration (local indexes, constraints) must not decide the lock.
    env["PIP_CONFIG_FILE"] = os.devnull
    if os.environ.get("PIP_CERT"):
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    pins: dict[str, tuple[str, set[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="bulkjob-lock-") as tmp:
        venv.create(Path(tmp) / "venv", with_pip=True)
        pip = [str(Path(tmp) / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", "--upgrade", "pip"], env=env, check=True)
        for arch in ARCHES:
            dest = Path(tmp) / arch
            platforms = [f"--platform={tag}" for tag in platform_tags(arch)]
            subprocess.run([*pip, "download", "--dest", str(dest), "--only-binary=:all:",
                            "--implementation", "cp", "--python-version", PYTHON_VERSION, "--abi", ABI,
                            *platforms, *reqs], env=env, check=True)
            for wheel in sorted(dest.glob("*.whl")):
                name, version = wheel_name_version(wheel.name)
                pinned, hashes = pins.setdefault(name, (version, set()))
                if pinned != version:
                    sys.exit(f"{name}: {pinned} on one architecture, {version} on another")
                hashes.add(hashlib.sha256(wheel.read_bytes()).hexdigest())
    lines = [
        "# The image's Python dependencies, pinned with their hashes: written by `make lock`",
        f"# (scripts/lock-image-deps.py) for CPython {PYTHON_VERSION}, glibc 2.{GLIBC_MINOR}, {' and '.join(ARCHES)}.",
        "# Do not edit; rerun `make lock` after changing pyproject.toml's dependencies.",
    ]
    for name in sorted(pins):
        version, hashes = pins[name]
        lines.append(f"{name}=={version}" + "".join(f" \\\n    --hash=sha256:{h}" for h in sorted(hashes)))
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"{LOCK.name}: {len(pins)} distributions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
