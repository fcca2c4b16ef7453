# Deployment: the container image, the Kubernetes manifests and the Airflow
# DAG. Included by the top-level Makefile, which defines VENV, PY and `venv`.
#
#   make image            build $(IMAGE) (podman; a debootstrap base unless BASE_IMAGE is given)
#   make lock             rewrite requirements-image.lock, the image's pinned dependencies
#   make test-deploy      the k8s, Airflow and container tests
#   make airflow-venv     the separate virtualenv the Airflow DAG tests run in

#: Built by scripts/base-image.sh where no registry can be reached.
LOCAL_BASE_IMAGE ?= localhost/bulkjob-base:bookworm
#: Any Debian bookworm image with python3 and venv, e.g. docker.io/library/python:3.11-slim-bookworm.
BASE_IMAGE ?= $(LOCAL_BASE_IMAGE)
IMAGE ?= bulkjob:dev
#: chroot isolation and host networking build without a container network or
#: user namespaces, which is what a root-only CI host offers.
PODMAN_BUILD_FLAGS ?= --isolation chroot --network host
#: The CAs pip trusts on this host, handed to the build as a secret so that
#: a TLS-intercepting proxy works inside it too; empty to use the base's CAs.
CA_BUNDLE ?= $(or $(PIP_CERT),$(wildcard /etc/ssl/certs/ca-certificates.crt))
IMAGE_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REVISION = $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)

#: Airflow (and kubectl for the k8s tests) live in a virtualenv of their own;
#: the pins are in mk/airflow-requirements.txt.
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_PYTHON ?= python3

deploy_comma := ,

.PHONY: image base-image lock system-deps test-deploy airflow-venv

system-deps:
	@scripts/install-system-deps.sh

# The base is rebuilt when scripts/base-image.sh (which holds its package list)
# changes or the base is a week old: the script compares the hash it stamped
# on the image with its own.
base-image:
	@scripts/install-system-deps.sh podman runc debootstrap uidmap
	@scripts/base-image.sh $(LOCAL_BASE_IMAGE)

# The build stage's image and the images a rebuild untags (an older $(IMAGE),
# an older base) carry the label io.bulkjob.stage: remove those left untagged,
# and only those, so that no dangling image is left behind.
image:
	@scripts/install-system-deps.sh podman runc debootstrap uidmap
	@if [ "$(BASE_IMAGE)" = "$(LOCAL_BASE_IMAGE)" ]; then scripts/base-image.sh $(LOCAL_BASE_IMAGE); fi
	podman build $(PODMAN_BUILD_FLAGS) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg VERSION=$(IMAGE_VERSION) \
		--build-arg REVISION=$(IMAGE_REVISION) \
		$(if $(CA_BUNDLE),--secret id=ca-bundle$(deploy_comma)src=$(CA_BUNDLE)) \
		--tag $(IMAGE) .
	@podman image prune --force --filter label=io.bulkjob.stage >/dev/null
	@podman image inspect $(IMAGE) --format '$(IMAGE): {{.Size}} bytes'

# Resolves in a throwaway virtualenv, from PyPI: see the script's docstring.
lock:
	$(PYTHON) scripts/lock-image-deps.py

airflow-venv: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed: mk/airflow-requirements.txt
	rm -rf $(AIRFLOW_VENV)
	$(AIRFLOW_PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --disable-pip-version-check -r mk/airflow-requirements.txt
	touch $@

test-deploy: venv
	$(PY) -m pytest -q -rs tests/test_k8s.py tests/test_airflow_dag.py tests/test_container.py
