# syntax=docker/dockerfile:1
#
# bulkjob container image.
#
#   podman build --build-arg BASE_IMAGE=localhost/bulkjob-base:bookworm -t bulkjob:dev .
#   docker build -t bulkjob:dev .
#
# BASE_IMAGE is any Debian bookworm image with python3 (3.11+), its venv
# module and apt: the official python image, or the one that
# scripts/base-image.sh makes with debootstrap where no registry can be
# reached. Nothing below depends on where python3 lives in the base.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build

# Every image of this stage carries the label, so that `make image` can remove
# them once the final image is built: nothing runs them, and untagged they
# would be left dangling.
LABEL io.bulkjob.stage=build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# tini from Debian, copied into the final stage so that it needs no apt run
# (and no package lists) of its own.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini >/dev/null \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv

# The dependencies first, from the checked-in lock (make lock): every
# distribution pinned and hash-checked, so the image gets exactly the files
# the lock names or the build fails. This layer stays cached until the lock
# changes. setuptools in the lock is the build backend: the job itself is
# built without build isolation, so nothing unpinned is fetched.
# oracledb runs in thin mode: no Oracle Client libraries in the image.
# Behind a TLS-intercepting proxy, pass the CA bundle that trusts it as the
# build secret "ca-bundle" (--secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt);
# a secret never lands in a layer. Without it pip uses the base's CAs.
COPY requirements-image.lock /tmp/requirements-image.lock
RUN --mount=type=secret,id=ca-bundle,required=false \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/venv/bin/pip install --quiet --require-hashes --no-deps --only-binary=:all: \
        -r /tmp/requirements-image.lock

# pip and setuptools are dropped afterwards: nothing installs at run time.
COPY . /src
RUN /opt/venv/bin/pip install --quiet --no-deps --no-build-isolation --no-index /src \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --quiet -y pip setuptools \
 && chmod -R a+rX,go-w /opt/venv

FROM ${BASE_IMAGE}

# The same for this stage: an older image that a rebuild untags goes too.
LABEL io.bulkjob.stage=image

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only at run time and
# the venv's modules are compiled at build time.
# HOME and the working directory are /tmp: UID 1002 has no passwd entry, and
# anything written to a relative path (the default ./bulkjob-state manifest)
# lands on the writable /tmp mount rather than the read-only root.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp \
    HOME=/tmp

COPY --from=build /usr/bin/tini /usr/bin/tini
COPY --from=build /opt/venv /opt/venv
COPY LICENSE /usr/share/doc/bulkjob/LICENSE

# Any UID in group 0 works too (OpenShift's arbitrary UIDs): the venv is
# owned by root:0 and readable by group and others, writable by neither.
USER 1002:0
WORKDIR /tmp
EXPOSE 8799

# tini is PID 1: it forwards SIGTERM to bulkjob, which drains its workers
# itself, and reaps any child that exits after its parent. Kubernetes and
# Airflow pass only arguments, so tini stays in front.
ENTRYPOINT ["tini", "--", "bulkjob"]
CMD ["--help"]

# Last, so that a new revision does not invalidate the layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="bulkjob" \
      org.opencontainers.image.description="Run thousands of work items inside one Kubernetes pod: a worker pool, in-process retry, a resumable S3 progress manifest and Prometheus metrics." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
