# keyfuse: `make demo` runs the main job end to end, `make test` builds and runs every test.
# Both set everything up on a fresh machine: a local virtual environment, the Python and
# Rust dependencies and a release build of the extension.
#
# `make test` tests what users install: the abi3 wheel (built once, tagged for glibc 2.28
# and later) installed with pip into a fresh virtual environment outside the repository,
# where the Python suite and the lint gates run. `make dev` / `make demo` use the editable
# install in .venv instead.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# uv installs the wheel's test environment in seconds where pip takes a minute
UV     := $(VENV)/bin/uv
# 2-core machines: keep test and build parallelism modest and predictable
export CARGO_TERM_COLOR ?= never

# The oldest glibc the wheel supports: manylinux_2_28 (RHEL/Rocky/Alma 8, Debian 10,
# Ubuntu 18.10 and later). zig links against that glibc's symbol versions.
MANYLINUX := manylinux_2_28
DIST      := dist
# The wheel's test environment: outside the repository (so nothing in it can import the
# source tree), one per checkout, made anew for every `make test`.
WHEEL_VENV ?= $(or $(TMPDIR),/tmp)/keyfuse-wheel-venv-$(shell printf '%s' "$(CURDIR)" | sha1sum | cut -c1-12)
WHEEL_PY   := $(WHEEL_VENV)/bin/python

.PHONY: all setup build dev test test-deps test-rust test-venv test-python lint lint-run lint-rust lint-py lint-py-wheel fmt demo bench wheel clean

all: test

# The build tools (maturin, and zig as the wheel's linker), without building keyfuse.
$(VENV)/.tools: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "uv>=0.9,<1"
	$(UV) pip install -q --python $(PY) "maturin>=1.9.4,<2" "ziglang>=0.13"
	touch $@

# The development install: the Python dependencies and keyfuse, editable, in .venv.
$(VENV)/.installed: $(VENV)/.tools
	$(VENV)/bin/maturin develop -q --release --extras all,test
	touch $@

setup: $(VENV)/.installed

# Release build of the extension, installed (editable) into the venv.
build: setup
	$(VENV)/bin/maturin develop -q --release --extras all,test

# A quicker optimised build for development (no LTO).
dev: setup
	$(VENV)/bin/maturin develop -q --profile fastbuild --extras all,test

test-rust:
	$(RUST_NICE) cargo test --workspace --exclude keyfuse-py -q

# The abi3 wheel for clusters, its tags checked (cp310-abi3, manylinux_2_N with N <= 28).
wheel: $(VENV)/.tools
	rm -f $(DIST)/keyfuse-*.whl
	# the venv first on PATH: maturin runs zig as `python3 -m ziglang`
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/maturin build -q --release --zig \
	    --compatibility $(MANYLINUX) -o $(DIST)
	$(PY) .ci/check_wheel.py $(DIST)

# Test-only system tools: Chromium renders the HTML reports in tests/report (a headless
# browser check and screenshots). Installed with apt where missing and permitted; when it
# cannot be, the browser test skips with a message saying so and everything else runs.
CHROMIUM := $(firstword $(foreach b,chromium chromium-browser google-chrome,$(shell command -v $(b) 2>/dev/null)))
test-deps:
ifeq ($(CHROMIUM),)
	@if command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	    echo "installing chromium for the report browser test"; \
	    ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null ) \
	    || echo "warning: could not install chromium; the report browser test will be skipped"; \
	else \
	    echo "note: chromium missing and apt-get unavailable or not permitted;" \
	         "the report browser test will be skipped"; \
	fi
else
	@echo "chromium: $(CHROMIUM)"
endif

# The wheel in a fresh venv outside the repository, made anew for every `make test`.
test-venv: wheel test-deps
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(UV) pip install -q --python $(WHEEL_PY) "$$(ls $(CURDIR)/$(DIST)/keyfuse-*.whl)[all,test]"

# Byte code, compiled once per run into a cache beside the wheel's venv (outside the
# checkout): every Python process of the tests (the xdist workers, the benches' and the CLI
# tests' subprocesses, Dask's workers) then loads numpy, scipy, scikit-learn, pandas and
# matplotlib from .pyc files. uv installs no .pyc, and where PYTHONDONTWRITEBYTECODE is set
# every process would compile them again (docs/decisions.md).
PYCACHE_ENV := PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(WHEEL_VENV)/pycache

# The suite against the installed wheel, on two pytest-xdist workers. pytest runs in the
# process that first checked where keyfuse is imported from, with the venv as its working
# directory; KEYFUSE_TEST_INSTALLED makes every worker check it again (tests/conftest.py).
PYTEST_WORKERS ?= 2
test-python: test-venv
	cd $(WHEEL_VENV) && $(PYCACHE_ENV) KEYFUSE_TEST_INSTALLED=$(WHEEL_VENV) $(WHEEL_PY) -c "import sys, keyfuse, pytest; \
	    assert keyfuse.__file__.startswith(sys.prefix), keyfuse.__file__; \
	    print('testing the installed wheel:', keyfuse.__file__); \
	    sys.exit(pytest.main(sys.argv[1:]))" \
	    -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal --hypothesis-profile=ci \
	    --rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml $(CURDIR)/tests

# The Python lint gates with the wheel's venv (ruff, mypy and stubtest come with `test`).
lint-py-wheel: test-venv
	$(PYCACHE_ENV) $(MAKE) --no-print-directory lint-py LINT_BIN=$(WHEEL_VENV)/bin

# Every test as one job graph on three slots, so that both cores stay busy to the end:
# cargo's tests, clippy (its own target directory, so it never waits on cargo test's build
# lock) and the release wheel start together; pytest and the Python lint gates start as
# soon as the wheel is installed. The two Rust builds run at lower priority: the wheel and
# pytest are the longest chain, so they get the cores first. Cargo skips incremental
# caches, which a fresh clone never reuses.
test:
	CARGO_INCREMENTAL=0 $(MAKE) --no-print-directory -j3 --output-sync=target \
	    RUST_NICE="nice -n 10" CLIPPY_TARGET_DIR=target/clippy \
	    test-rust lint-rust test-python lint-py-wheel

# rustfmt, clippy -D warnings, ruff, mypy and the stub check of the installed keyfuse._core
LINT_BIN ?= $(VENV)/bin
lint: setup lint-run

lint-run: lint-rust lint-py

# (make test sets RUST_NICE and CLIPPY_TARGET_DIR; see `test`)
lint-rust:
	cargo fmt --all -- --check
	$(if $(CLIPPY_TARGET_DIR),CARGO_TARGET_DIR=$(CLIPPY_TARGET_DIR)) $(RUST_NICE) \
	    cargo clippy --workspace --all-targets -q -- -D warnings

lint-py:
	$(LINT_BIN)/ruff check python tests benches
	$(LINT_BIN)/ruff format --check python tests benches
	$(LINT_BIN)/mypy
	$(LINT_BIN)/python -m mypy.stubtest keyfuse._core --allowlist .stubtest-allowlist

fmt: setup
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

demo: build
	$(VENV)/bin/keyfuse demo

# Every benchmark at full size (minutes each; `make test` runs each once with --quick),
# then the core crate's Rust benches.
BENCHES := $(filter-out benches/_%,$(wildcard benches/*.py))
bench: build
	set -e; for b in $(BENCHES); do echo "== $$b"; $(PY) $$b; done
	if [ -d rust/keyfuse-core/benches ]; then cargo bench -p keyfuse-core; fi

clean:
	rm -rf target $(DIST) $(VENV) $(WHEEL_VENV) python/keyfuse/*.so test-artifacts
