# keyfuse: `make demo` runs the main job end to end, `make test` builds and runs every test.
# Both set everything up on a fresh machine: a local virtual environment, the Python and
# Rust dependencies and a release build of the extension.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# 2-core machines: keep test and build parallelism modest and predictable
export CARGO_TERM_COLOR ?= never

.PHONY: all setup build dev test test-rust test-python lint fmt demo bench wheel clean

all: test

# The venv and the Python dependencies (re-run when pyproject.toml changes).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.9.4,<2"
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
	cargo test --workspace --exclude keyfuse-py -q

test-python: build
	$(PY) -m pytest -q

# every test, then the lint gates (rustfmt, clippy -D warnings, ruff, mypy, stub check)
test: test-rust test-python lint

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest keyfuse._core --allowlist .stubtest-allowlist

fmt: setup
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

demo: build
	$(VENV)/bin/keyfuse demo

# the quick benchmarks; benches/{index,segment,fusion,cohort,gpu}.py take minutes each
bench: build
	$(PY) benches/extract.py
	$(PY) benches/matching.py

wheel: setup
	$(VENV)/bin/maturin build --release -o dist

clean:
	rm -rf target dist $(VENV) python/keyfuse/*.so
