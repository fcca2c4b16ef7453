"""requirements-image.lock, the image's pinned dependencies (make lock), against pyproject.toml.

The image installs the lock with `pip install --require-hashes --no-deps` and then checks it
with `pip check` (tests/test_container.py builds it): a dependency missing from the lock fails
that build. These checks fail sooner, without a build: a dependency added to pyproject.toml
that nobody locked, or a pin outside its range.
"""

import re
import tomllib

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = ROOT / "requirements-image.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The extras the image installs (the Dockerfile, scripts/lock-image-deps.py).
IMAGE_EXTRAS = ("postgres",)


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes), from the lock's `name==version --hash=...` entries."""
    text = LOCK.read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"not a pinned, hashed line: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} locked twice"
        pins[name] = (match[2], re.findall(r"sha256:([0-9a-f]{64})", match[3]))
    return pins


def image_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    reqs += PYPROJECT["build-system"]["requires"]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("req", image_requirements(), ids=str)
def test_lock_pins_each_dependency_within_its_range(req):
    pins = locked()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req} is not in {LOCK.name}: run `make lock`"
    version, hashes = pins[name]
    assert req.specifier.contains(version, prereleases=True), f"{name}=={version} is outside {req}"
    assert hashes
    for extra in req.extras:
        # psycopg[binary] -> psycopg-binary: an extra's own distribution must be locked too.
        assert canonicalize_name(f"{req.name}-{extra}") in pins, f"{req}: the extra {extra!r} is not locked"


def test_lock_has_a_wheel_hash_for_both_architectures_of_compiled_packages():
    # A compiled package (oracledb, psycopg-binary, cryptography ...) has one wheel per
    # architecture; a pure one has one for all. Two hashes or more for the compiled ones
    # means an aarch64 build verifies as well as an x86_64 one.
    pins = locked()
    for name in ("oracledb", "psycopg-binary", "cryptography", "cffi"):
        assert len(pins[name][1]) >= 2, name


def test_the_image_installs_from_the_lock_with_hashes_required():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile
    assert f"-r /tmp/{LOCK.name}" in dockerfile
    assert f"!{LOCK.name}" in (ROOT / ".dockerignore").read_text()
