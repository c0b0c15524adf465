# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GATEWAY := $(VENV)/bin/relion-gateway

.PHONY: install stack browser demo test unit integration reliability bench stack-down clean image image-test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Installs missing Debian packages, writes the Slurm configs, starts every daemon (idempotent).
stack: install
	$(GATEWAY) stack up --with-rest --with-postgres

# A real 2D classification through the REST API, Slurm and S3; prints the result.
demo: stack
	$(GATEWAY) demo

# Debian's Chromium, for the docs-page test (headless).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The whole suite, in two phases. The stack tests mostly wait on Slurm; the unit tests (fakes at
# the seams) and the image build are CPU and disk, so they share the first phase:
# 1. the stack tests that stop, kill, restart or cut off what the others share (marker `serial`:
#    tests/integration/test_stack.py, tests/reliability, a slurmctld restart, /readyz), one at a
#    time; beside them the unit tests on every CPU, then `image build` (their output follows);
# 2. the other stack tests two at a time (pytest-xdist, one test file per worker: each worker has
#    its own gateway and store), the container tests among them. This phase is CPU-bound (RELION):
#    three workers took longer than two here.
# (The unit tests beside test_continue's RELION, in phase 2, ran out of time: tried, see git log.)
# A failure in phase 1 fails the target once both halves have run.
STACK_WORKERS ?= 2
STACK_TESTS := tests/integration tests/hostile tests/reliability tests/container
TEST_LOGS := .test-logs
test: stack browser
	@mkdir -p $(TEST_LOGS)
	@( $(PY) -m pytest -n auto tests/unit && $(GATEWAY) image build ) > $(TEST_LOGS)/unit-and-image.log 2>&1 & beside=$$!; \
	serial=0; $(PY) -m pytest -m serial $(STACK_TESTS) || serial=$$?; \
	unit=0; wait $$beside || unit=$$?; \
	echo "== run beside them: the unit tests, then the image build"; cat $(TEST_LOGS)/unit-and-image.log; \
	test $$serial = 0 -a $$unit = 0
	RELION_GATEWAY_TEST_IMAGE_REQUIRED=1 $(PY) -m pytest -n $(STACK_WORKERS) --dist loadfile -m "not serial" $(STACK_TESTS)

unit: install
	$(PY) -m pytest tests/unit

integration: stack
	$(PY) -m pytest tests/integration

# Fault injection on the real stack (kills the gateway, slurmctld, slurmd, the S3 server).
reliability: stack
	$(PY) -m pytest tests/reliability

# The service's container image, built offline with podman (a debootstrap base; reused per commit).
image: install
	$(GATEWAY) image build

# The image run on the local stack (health, readiness, non-root, a token across a restart, the demo 2D job): ~30 s.
image-test: image stack
	$(PY) -m pytest -m container tests/container

bench: stack
	$(PY) bench/run.py

stack-down: install
	$(GATEWAY) stack down

clean:
	rm -rf $(VENV) build *.egg-info
