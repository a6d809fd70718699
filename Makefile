# Developer shortcuts. CI runs .ci/run.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: dev pgo pgo-profile test lint docs wheel guests bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $$(python3 .ci/requirements dev)

dev: $(PY)
	. $(VENV)/bin/activate && maturin develop -q --release

# The release build: optimised with the committed profile (pgo/build.sh), as wheels are.
pgo: $(PY)
	. $(VENV)/bin/activate && bash pgo/build.sh develop -q --release

# Makes pgo/kvmpy.profdata again (needs /dev/kvm and `rustup component add llvm-tools`).
pgo-profile: $(PY) guests
	bash pgo/profile.sh

test: dev guests
	$(PY) -m pytest

lint: $(PY)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(PY) -m ruff check python tests benchmarks examples docs_ext
	$(PY) -m ruff format --check python tests benchmarks examples docs_ext
	$(PY) -m mypy
	$(PY) -m mypy.stubtest kvmpy._native

docs: $(PY)
	$(PY) -m pip install -q $$(python3 .ci/requirements docs)
	$(VENV)/bin/mkdocs build --strict

wheel: $(PY)
	MATURIN=$(VENV)/bin/maturin bash pgo/build.sh build --release --out dist
	$(VENV)/bin/maturin sdist --out dist

guests:
	$(MAKE) -C guests

bench: dev guests
	$(PY) -m benchmarks

clean:
	$(MAKE) -C guests clean
	cargo clean
